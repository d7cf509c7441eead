"""3D models (models/volume.py, the [3d] extra): patches from the cache, training through the same trainer, exact
resume, and inference by sliding window whose slices are what predict writes."""
import dataclasses
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from giseg.data.cache import SliceCache
from giseg.data.patches import PatchDataset, pad_to, patch_start, volume_rows
from giseg.utils.errors import UserError

PATCH = "8,32,32"  # the demo fixture's case-days have 8 slices; tiny SegResNet's sides are multiples of 4


def test_volume_rows_puts_each_volume_in_slice_order():
    index = pd.DataFrame({"case": [1, 1, 2, 1, 2, 1], "day": [1, 1, 1, 2, 1, 1], "slice": [3, 1, 2, 1, 1, 2]})
    got = volume_rows(index, np.arange(6), ("case", "day"))
    assert [list(v) for v in got] == [[1, 5, 0], [4, 2], [3]]
    assert [list(v) for v in volume_rows(index, np.array([2, 5, 0]), ("case", "day"))] == [[2], [5, 0]]


def _cache(depth: int = 10, size: int = 16) -> SliceCache:
    rng = np.random.default_rng(0)
    masks = np.zeros((depth, size, size), np.uint8)
    masks[6, 3:5, 9:11] = 0b10  # one small organ of class 1 on one slice
    return SliceCache(rng.random((depth, size, size)).astype(np.float16), masks, path=None)


def test_a_patch_is_a_function_of_seed_epoch_and_item():
    ds = PatchDataset(_cache(), [np.arange(10)], (4, 8, 8), 1, 3, (0.5,), (0.5,), seed=3, length=4)
    a, b = ds[1], ds[1]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["mask"], b["mask"])
    assert a["pixel_values"].shape == (1, 4, 8, 8) and a["mask"].shape == (4, 8, 8)
    ds.set_epoch(1)  # another epoch, another patch or augmentation
    assert not torch.equal(a["pixel_values"], ds[1]["pixel_values"])


def test_foreground_sampling_centres_patches_on_the_organ_even_when_it_is_tiny():
    ds = PatchDataset(_cache(), [np.arange(10)], (4, 8, 8), 1, 3, (0.5,), (0.5,), seed=3, length=4)
    masks, where = ds.cache.masks, ds.locations(0)
    assert [len(w) for w in where] == [0, 4, 0]  # the organ's 4 voxels, class 1
    rng = np.random.default_rng(0)
    starts = [patch_start(masks.shape, where, (4, 8, 8), rng, 1.0) for _ in range(20)]
    assert all(masks[s[0]:s[0] + 4, s[1]:s[1] + 8, s[2]:s[2] + 8].any() for s in starts)
    plain = [patch_start(masks.shape, where, (4, 8, 8), rng, 0.0) for _ in range(200)]
    assert 0 < sum(masks[s[0]:s[0] + 4, s[1]:s[1] + 8, s[2]:s[2] + 8].any() for s in plain) < 200


def test_a_volume_smaller_than_the_patch_is_padded_with_background():
    image = np.ones((1, 3, 4, 4), np.float32)
    out = pad_to(image, (5, 4, 6), np.array([-1.0], np.float32))
    assert out.shape == (1, 5, 4, 6) and out[0, :3, :, :4].min() == 1 and out[0, 3:].max() == -1


def test_without_monai_a_3d_model_is_one_line_naming_the_extra(monkeypatch):
    from giseg.models.volume import require_monai

    monkeypatch.setitem(sys.modules, "monai", None)  # import monai now raises ImportError
    with pytest.raises(UserError, match=r"needs the \[3d\] extra.*pip install 'giseg\[3d\]'"):
        require_monai("--base_model segresnet3d")


def _cfg(demo_dir, tmp_path, **kw):
    from giseg.training.config import TrainConfig

    base = dict(base_model="segresnet3d", data_dir=str(demo_dir), output_dir=str(tmp_path / "run"),
                cache_dir=str(tmp_path.parent / "cache3d"), image_size=32, patch_size=PATCH, epochs=2,
                train_batch_size=2, num_workers=0, lr=2e-3, save_every_steps=3, log_every=1000)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_volume_model(tmp_path_factory):
    from giseg.models.tiny import make_tiny

    return make_tiny("segresnet3d", tmp_path_factory.mktemp("tiny3d") / "tiny-segresnet3d")


@pytest.fixture(scope="module")
def volume_run(demo_dir, tiny_volume_model, tmp_path_factory):
    """Two epochs of the tiny SegResNet on the demo fixture, checkpoints every 3 steps."""
    from giseg.training.loop import train

    cfg = _cfg(demo_dir, tmp_path_factory.mktemp("v3d"), base_model=str(tiny_volume_model))
    train(cfg)
    return cfg


@pytest.mark.parametrize("flags, message", [
    (dict(context_slices=3), "--context_slices does not apply to a 3D model"),
    (dict(cutmix_prob=0.5), "--cutmix_prob / --mixup_prob does not apply to a 3D model"),
    (dict(patch_size="6,32,32"), "--patch_size 6,32,32: three integers D,H,W, each a multiple of 4 and at least 4"),
    (dict(patch_size="8,64,64"), "rows and columns at most --image_size 32"),
])
def test_flags_a_3d_model_cannot_honour_are_one_line(demo_dir, tiny_volume_model, tmp_path, flags, message):
    from giseg.training.loop import train

    with pytest.raises(UserError, match=message):
        train(_cfg(demo_dir, tmp_path, base_model=str(tiny_volume_model), **flags))


def test_patch_size_on_a_2d_model_is_refused(demo_dir, tiny_models, tmp_path):
    from giseg.training.loop import train

    with pytest.raises(UserError, match="--patch_size 8,32,32: only for a 3D model"):
        train(_cfg(demo_dir, tmp_path, base_model=str(tiny_models["segformer"])))


def test_a_3d_run_scores_whole_volumes_per_slice_and_saves_a_loadable_folder(volume_run):
    import json
    from pathlib import Path

    from giseg.inference.spec import InferenceSpec

    out = Path(volume_run.output_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["val_slices"] == records[0]["val_slices"] > 0 for r in records)  # every validation slice, once
    spec = InferenceSpec.load(out / "best")
    assert spec.patch_size == PATCH and spec.mean == (0.5,) and spec.input_channels() == 1


def test_a_3d_run_that_dies_after_a_checkpoint_resumes_to_the_uninterrupted_weights(volume_run, tmp_path,
                                                                                    monkeypatch):
    import giseg.training.loop as loop

    real = loop.save_state

    def die_after_first(run, meter):
        real(run, meter)
        raise RuntimeError("killed")

    cfg = dataclasses.replace(volume_run, output_dir=str(tmp_path / "crashed"))
    monkeypatch.setattr(loop, "save_state", die_after_first)
    with pytest.raises(RuntimeError, match="killed"):
        loop.train(cfg)
    monkeypatch.setattr(loop, "save_state", real)
    loop.train(dataclasses.replace(cfg, resume_from_checkpoint="latest"))
    a = load_file(f"{volume_run.output_dir}/last/model.safetensors")
    b = load_file(f"{cfg.output_dir}/last/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_predict_writes_the_slices_of_the_sliding_window_probabilities(volume_run, tmp_path):
    from pathlib import Path

    from giseg.data.cache import build_cache
    from giseg.data.patches import read_volume
    from giseg.data.registry import get_adapter
    from giseg.data.rle import decode_rle
    from giseg.inference.segmenter import Segmenter
    from giseg.inference.volume import sliding_logits

    seg = Segmenter.load(Path(volume_run.output_dir) / "best")
    adapter = get_adapter("gi")
    index = adapter.build_index(volume_run.data_dir)
    cache = build_cache(adapter, index, seg.spec.image_size, tmp_path / "cache")
    sub = tmp_path / "sub.csv"
    from giseg.commands.predict import main as predict

    predict(["--model", str(Path(volume_run.output_dir) / "best"), "--data_dir", volume_run.data_dir, "--out",
             str(sub), "--cache_dir", str(tmp_path / "cache")])
    rows = pd.read_csv(sub).fillna("")
    first = volume_rows(index, np.arange(len(index)), adapter.volume_columns)[0]
    x = torch.from_numpy(read_volume(cache, first, 1, seg.spec.mean, seg.spec.std))[None]
    with torch.no_grad():
        probs = torch.sigmoid(sliding_logits(seg.model, x, seg.spec.patch(), seg.spec.sw_overlap))  # (D, K, S, S)
    for j, r in enumerate(first):
        h, w = int(index["height"].iloc[r]), int(index["width"].iloc[r])
        up = torch.nn.functional.interpolate(torch.logit(probs[j:j + 1].clamp(1e-7, 1 - 1e-7)), size=(h, w),
                                             mode="bilinear", align_corners=False)
        want = (torch.sigmoid(up)[0] > 0.5).numpy()
        for k, c in enumerate(seg.spec.classes):
            code = rows[(rows["id"] == index["id"].iloc[r]) & (rows["class"] == c)]["predicted"].iloc[0]
            got = decode_rle(code, (h, w)) if code else np.zeros((h, w), np.uint8)
            assert np.array_equal(got.astype(bool), want[k]), (index["id"].iloc[r], c)


def test_a_2d_and_3d_ensemble_gets_its_blend_out_of_fold_and_predict_uses_it(volume_run, demo_dir, tiny_models,
                                                                              tmp_path):
    import json

    from giseg.commands.predict import build_parser, load_models
    from giseg.commands.predict import main as predict
    from giseg.commands.tune import main as tune
    from giseg.evaluation.tuning import BLEND
    from giseg.training.loop import train

    flat = dataclasses.replace(volume_run, base_model=str(tiny_models["segformer"]), patch_size="",
                               output_dir=str(tmp_path / "flat"), max_train_steps=2)
    train(flat)
    models = [f"{flat.output_dir}/best", f"{volume_run.output_dir}/best"]
    common = ["--data_dir", str(demo_dir), "--cache_dir", str(tmp_path / "cache"), "--num_workers", "0"]
    assert tune(["--model", *models, "--out", str(tmp_path / "ens.json"), "--search", "blend,thresholds",
                 *common]) == 0
    report = json.loads((tmp_path / "ens.json").read_text())
    scores = {float(k): v for k, v in report["blend"]["scores"].items()}
    assert sorted(scores) == sorted(BLEND)
    better = [s for s in BLEND[1:] if scores[s] > scores[BLEND[0]] + 1e-12]
    share = max(better, key=lambda s: (scores[s], -BLEND.index(s))) if better else BLEND[0]  # the start, unless beaten
    assert report["blend"]["share_2d"] == share and report["weights"] == pytest.approx([share, 1 - share])
    argv = ["--model", *models, "--tuned", str(tmp_path / "ens.json"), "--out", str(tmp_path / "sub.csv"), *common]
    assert load_models(build_parser().parse_args(argv), "cpu").weights == pytest.approx([share, 1 - share])
    assert predict(argv) == 0 and (tmp_path / "sub.csv").read_text().count("\n") == 1 + 3 * len(
        pd.read_csv(demo_dir / "train.csv")) // 3


@pytest.mark.slow
def test_two_processes_share_the_validation_volumes_and_score_each_slice_once(demo_dir, tiny_volume_model, tmp_path):
    """Under DDP each process scores its share of the validation volumes (not Accelerate's even batches, which
    would repeat one): the gathered evaluation counts every validation slice exactly once."""
    import json
    import subprocess

    from conftest import ACCELERATE_CONFIG, ROOT, distributed_env, free_port

    from giseg.data.folds import split_by_case
    from giseg.data.registry import get_adapter

    config = tmp_path / "accelerate.yaml"
    config.write_text(ACCELERATE_CONFIG.format(port=free_port()))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(ROOT / "trainer.py"),
           "--base_model", str(tiny_volume_model), "--data_dir", str(demo_dir), "--output_dir", str(out),
           "--cache_dir", str(tmp_path / "cache"), "--image_size", "32", "--patch_size", PATCH, "--epochs", "1",
           "--train_batch_size", "2", "--n_folds", "3", "--num_workers", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT, env=distributed_env())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    index = get_adapter("gi").build_index(demo_dir)
    _, val = split_by_case(index, 0, 3)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "world size 2" in (out / "train.log").read_text()
    assert record["val_slices"] == len(val) and 0 <= record["dice_mean"] <= 1


def test_a_3d_model_predicts_a_nifti_volume_slice_by_slice_from_its_sliding_window(volume_run, tmp_path):
    """giseg predict --input with a 3D model: the label map on the scan's grid has a class wherever the
    sliding-window masks of the whole volume (Segmenter.prepare_volume, the model card's path) have one."""
    from pathlib import Path

    nib = pytest.importorskip("nibabel", reason="the [medical] extra (part of the dev install)")
    from giseg.commands.predict import main as predict
    from giseg.data.nifti import cut
    from giseg.inference.segmenter import Segmenter, upsample_like

    scan = np.random.default_rng(0).integers(0, 3000, (40, 36, 12)).astype(np.int16)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])  # slices 3 mm apart along the last axis
    src = tmp_path / "in" / "pat_001_0000.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(scan, affine), src)
    best = Path(volume_run.output_dir) / "best"
    seg = Segmenter.load(best)
    slices = [cut(scan, 2, k).astype(np.float32) for k in range(scan.shape[2])]
    with torch.no_grad():  # (12, 3, H, W) probabilities at the scan's size
        probs = torch.sigmoid(upsample_like(seg.logits(seg.prepare_volume(slices)), slices[0].shape)).numpy()
    # thresholds at each class's median (rounded): about half the voxels on, so the comparison cannot pass empty
    thresholds = [round(float(np.median(probs[:, c])), 3) for c in range(probs.shape[1])]
    assert predict(["--model", str(best), "--input", str(src.parent), "--out", str(tmp_path / "out"),
                    "--cache_dir", str(tmp_path / "cache"), "--thresholds", ",".join(map(str, thresholds))]) == 0
    pred = np.asanyarray(nib.load(tmp_path / "out" / "pat_001.nii.gz").dataobj)
    want = (probs > np.array(thresholds, np.float32)[None, :, None, None]).any(1)
    assert pred.shape == scan.shape and 0.2 < want.mean() < 0.99
    assert all(np.array_equal(cut(pred, 2, k) > 0, want[k]) for k in range(scan.shape[2]))
