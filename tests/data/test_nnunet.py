"""--dataset nnunet: nnU-Net raw datasets (dataset.json + NIfTI) through the same trainer, predict, score, tune and cv."""
import json
import re

import numpy as np
import pandas as pd
import pytest

nib = pytest.importorskip("nibabel")

from giseg.data.folds import case_folds  # noqa: E402
from giseg.data.gi import GIAdapter  # noqa: E402
from giseg.data.nnunet.export import export_nnunet  # noqa: E402
from giseg.data.registry import get_adapter  # noqa: E402
from giseg.training.config import TrainConfig  # noqa: E402
from giseg.utils.errors import UserError  # noqa: E402
from giseg.training.loop import train  # noqa: E402

INDEX_COLUMNS = ["id", "case", "day", "slice", "width", "height", "spacing_x", "spacing_y"]


@pytest.fixture(scope="module")
def nnunet_dir(demo_dir, tmp_path_factory):
    """The tests' GI demo written as an nnU-Net dataset."""
    out = tmp_path_factory.mktemp("nnunet") / "Dataset001_GI"
    export_nnunet(GIAdapter(), demo_dir, out)
    return out


def adapter(folder):
    return get_adapter("nnunet").bind(folder)


def test_the_gi_demo_as_an_nnunet_dataset_reads_back_to_the_same_index_scans_and_overlapping_masks(
        demo_dir, nnunet_dir):
    gi, nn = GIAdapter(), adapter(nnunet_dir)
    assert nn.classes == gi.classes
    a, b = gi.build_index(demo_dir), nn.build_index(nnunet_dir)
    pd.testing.assert_frame_equal(a[INDEX_COLUMNS], b[INDEX_COLUMNS], check_dtype=False)
    assert case_folds(a, 3) == case_folds(b, 3)  # case_pattern: the days of a case stay one case of the folds
    overlaps = 0
    for ra, rb in zip(a.itertuples(), b.itertuples()):
        assert np.array_equal(gi.read_image(ra), nn.read_image(rb))
        ma, mb = gi.read_masks(ra), nn.read_masks(rb)
        assert np.array_equal(ma, mb)
        overlaps += int((mb.sum(0) > 1).any())
    assert overlaps > 0  # organs that overlap survive the label map (as nnU-Net regions)
    assert json.loads((nnunet_dir / "dataset.json").read_text())["labels"]["stomach"] == [4, 5, 6, 7]


def test_training_on_the_nnunet_copy_gives_the_loss_of_training_on_the_kaggle_layout(demo_dir, nnunet_dir, tmp_path,
                                                                                      tiny_models):
    def run(dataset, data):
        out = tmp_path / dataset
        train(TrainConfig(base_model=str(tiny_models["segformer"]), dataset=dataset, data_dir=str(data),
                          output_dir=str(out), image_size=32, epochs=1, train_batch_size=8, num_workers=0, n_folds=3,
                          cache_dir=str(tmp_path / "cache"), seed=3))
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][0]

    gi, nn = run("gi", demo_dir), run("nnunet", nnunet_dir)
    for key in ("train_loss", "val_loss", "dice_mean", "val_slices"):
        assert nn[key] == pytest.approx(gi[key], rel=1e-6, abs=1e-7), key


# predict, score, tune and cv on an nnU-Net dataset: tests/test_docs.py::test_the_own_data_commands_run runs the
# commands of docs/own-data.md


# ---------------------------------------------------------------- small hand-made datasets
def make_dataset(root, labels=None, cases=("a", "b"), shape=(12, 10, 5), spacing=(1.0, 1.0, 3.0), label_fn=None,
                 meta=None):
    """A tiny nnU-Net dataset: a bright square on each slice, label 1 inside it (``label_fn`` overrides)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([*spacing, 1.0])
    for n, case in enumerate(cases):
        img = np.full(shape, 100, np.int16)
        lab = np.zeros(shape, np.uint8)
        img[2:6, 3:7, :] = 900 + n
        lab[2:6, 3:7, :] = 1
        if label_fn is not None:
            lab = label_fn(lab)
        nib.save(nib.Nifti1Image(img, affine), root / "imagesTr" / f"{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), root / "labelsTr" / f"{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
                                                   "labels": labels or {"background": 0, "organ": 1},
                                                   **(meta or {})}))
    return root


def test_slices_are_cut_across_the_largest_spacing_as_h_by_w_and_the_axis_can_be_set(tmp_path):
    root = make_dataset(tmp_path / "d", shape=(6, 10, 12), spacing=(4.0, 1.0, 1.5))
    index = adapter(root).build_index(root)
    assert (index["axis"] == 0).all() and len(index) == 2 * 6
    assert (index["width"] == 10).all() and (index["height"] == 12).all() and (index["spacing_z"] == 4.0).all()
    row = next(index.itertuples())
    vol = nib.load(row.path).get_fdata()
    assert np.array_equal(adapter(root).read_image(row), vol[0].T)  # (H, W) = (third axis, second axis)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "slice_axis": 2}))
    index = adapter(root).build_index(root)
    assert (index["axis"] == 2).all() and len(index) == 2 * 12 and (index["width"] == 6).all()


def test_region_labels_are_overlapping_classes_and_the_later_region_wins_in_multiclass(tmp_path):
    def two_values(lab):
        lab[3:5, 4:6, :] = 2  # the core: value 2, inside the value-1 region
        return lab

    root = make_dataset(tmp_path / "d", labels={"background": 0, "whole": [1, 2], "core": 2}, label_fn=two_values)
    nn = adapter(root)
    assert nn.classes == ("whole", "core") and nn.priority == ("core", "whole")
    row = next(nn.build_index(root).itertuples())
    masks = nn.read_masks(row)
    assert masks[0].sum() == 16 and masks[1].sum() == 4 and (masks[1] <= masks[0]).all()


def test_case_pattern_makes_the_days_of_one_patient_one_case_of_the_folds(tmp_path):
    root = make_dataset(tmp_path / "d", cases=("p1_day1", "p1_day2", "p2_day1"),
                        meta={"case_pattern": r"^p(?P<case>\d+)_day(?P<day>\d+)$"})
    index = adapter(root).build_index(root)
    assert sorted(set(zip(index["case"], index["day"]))) == [(1, 1), (1, 2), (2, 1)]
    plain = make_dataset(tmp_path / "e", cases=("x", "y"))
    assert sorted(adapter(plain).build_index(plain)["case"].unique()) == [0, 1]  # one case per file by default


@pytest.mark.parametrize("damage, message", [
    ("no dataset.json", "dataset.json not found"),
    ("a channel file missing", "its channel 1 file a_0001.nii.gz is missing"),
    ("bad case_pattern", "group (?P<case>"),
    ("label of another shape", "label map of shape"),
    ("label on another grid", "affine differs"),
    ("label value not in dataset.json", "label value(s) [5]"),
    ("fractional labels", "fractional label values"),
    ("image without its label", "no label map"),
])
def test_bad_nnunet_input_gets_one_line_naming_the_file(tmp_path, damage, message):
    root = make_dataset(tmp_path / "d")
    lab = root / "labelsTr" / "b.nii.gz"
    meta = json.loads((root / "dataset.json").read_text())
    if damage == "no dataset.json":
        (root / "dataset.json").unlink()
    elif damage == "a channel file missing":
        (root / "dataset.json").write_text(json.dumps({**meta, "channel_names": {"0": "T1", "1": "T2"}}))
    elif damage == "bad case_pattern":
        (root / "dataset.json").write_text(json.dumps({**meta, "case_pattern": "^(.*)$"}))
    elif damage == "label of another shape":
        nib.save(nib.Nifti1Image(np.zeros((12, 10, 4), np.uint8), np.diag([1.0, 1, 3, 1])), lab)
    elif damage == "label on another grid":
        nib.save(nib.Nifti1Image(np.zeros((12, 10, 5), np.uint8), np.diag([1.0, 1, 2, 1])), lab)
    elif damage == "label value not in dataset.json":
        nib.save(nib.Nifti1Image(np.full((12, 10, 5), 5, np.uint8), np.diag([1.0, 1, 3, 1])), lab)
    elif damage == "fractional labels":
        nib.save(nib.Nifti1Image(np.full((12, 10, 5), 0.5, np.float32), np.diag([1.0, 1, 3, 1])), lab)
    elif damage == "image without its label":
        lab.unlink()
    with pytest.raises(UserError, match=re.escape(message)) as err:
        nn = adapter(root)
        index = nn.build_index(root)
        for row in index.itertuples():
            nn.read_masks(row)
    assert "\n" not in str(err.value)
    if damage not in ("no dataset.json", "bad case_pattern"):
        assert str(root) in str(err.value)


@pytest.mark.parametrize("meta, raw, message", [
    ({"slice_axis": 2.0}, None, '"slice_axis" must be 0, 1 or 2'),
    ({"labels": {"background": 0, "organ": 1, "tumour": 1}}, None, "labels 'organ' and 'tumour' are both [1]"),
    ({"labels": {"background": 0, "organ": 10 ** 12}}, None, "label 'organ' is 1000000000000; a label is an integer"),
    ({"labels": {"background": 0, "organ": 1, "ignore": 1}}, None, "the 'ignore' label (1) must be the highest"),
    ({"case_pattern": r"^(?P<day>[a-z])(?P<case>\d)$"}, None, "the day group must match digits"),
    (None, '{"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1, "organ": 2}}',
     "the key 'organ' is given 2 times in one object"),
])
def test_dataset_json_meanings_are_checked_not_taken_silently(tmp_path, meta, raw, message):
    """dataset.json fields of the wrong type or range, a repeated key (JSON keeps the last, silently), one value
    under two class names, a non-numeric day group: one line each (some were tracebacks, the huge label value a
    931 GiB allocation; issue #38)."""
    root = make_dataset(tmp_path / "d", cases=("a1", "b2"))
    if raw is not None:
        (root / "dataset.json").write_text(raw)
    else:
        base = json.loads((root / "dataset.json").read_text())
        (root / "dataset.json").write_text(json.dumps({**base, **meta}))
    with pytest.raises(UserError, match=re.escape(message)) as err:
        nn = adapter(root)
        nn.build_index(root)
    assert "\n" not in str(err.value) and "dataset.json" in str(err.value)


def test_the_nnunet_ignore_label_is_unlabelled_pixels_not_a_class(tmp_path):
    """nnU-Net v2's "ignore" label was trained as an organ named "ignore": its pixels are now the unlabelled ones
    (the ignore bit of the packed masks, which the loss and the metrics leave out), as nnU-Net treats them."""
    def with_ignored(lab):
        lab[0:2, :, :] = 2  # the first rows: not annotated
        return lab

    root = make_dataset(tmp_path / "d", labels={"background": 0, "organ": 1, "ignore": 2}, label_fn=with_ignored)
    nn = adapter(root)
    assert nn.classes == ("organ",) and nn.may_have_unlabelled
    row = next(nn.build_index(root).itertuples())
    ignored = nn.ignored(row)
    assert ignored.sum() == 2 * 10 and not nn.read_masks(row)[0][ignored].any()
    assert nn.read_masks(row)[0].sum() == 16


def test_an_image_without_its_label_is_fine_for_prediction(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "labelsTr" / "b.nii.gz").unlink()
    nn = adapter(root)
    index = nn.build_index(root, require_labels=False)
    assert len(index) == 10 and not nn.has_labels(index) and nn.read_image(next(index.itertuples())).shape == (10, 12)


def test_the_default_run_and_predict_never_import_nibabel_or_pydicom():
    """--dataset nnunet is registered beside GI, and predict knows --input; neither costs the default run an import."""
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys, trainer, model; import giseg.data.registry, giseg.commands.predict, giseg.commands.score, "
            "giseg.commands.demo_data; print([m for m in ('nibabel', 'pydicom') if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


def test_hausdorff_in_mm_is_refused_for_data_without_its_through_plane_spacing(demo_dir):
    from giseg.evaluation.score import score_predictions

    gi = GIAdapter()
    index = gi.build_index(demo_dir)
    pred = pd.DataFrame({"id": index["id"], **{f"pred_{c}": "" for c in gi.classes}})
    with pytest.raises(UserError, match="--hausdorff_mm: gi data does not say its voxel spacing"):
        score_predictions(gi, index, pred, in_mm=True)


def test_a_two_channel_dataset_trains_a_two_channel_model_and_predicts_folders_and_volumes(tmp_path, tiny_models):
    """channel_names with T1 and T2: each slice's two channels are the model's input (its first layer narrowed to
    2 channels, pretrained weights shared out), normalised one by one; predict reads the channels back per case."""
    from giseg.commands.predict import main as predict
    from giseg.data.cache import build_cache
    from giseg.inference.spec import InferenceSpec

    root = make_dataset(tmp_path / "d", cases=("a", "b", "c"), shape=(32, 32, 6), meta={
        "channel_names": {"0": "T1", "1": "T2"}})
    for f in sorted((root / "imagesTr").glob("*_0000.nii.gz")):  # T2: the inverse contrast, ten times brighter
        img = nib.load(f)
        nib.save(nib.Nifti1Image((10 * (1000 - np.asanyarray(img.dataobj))).astype(np.int16), img.affine),
                 f.with_name(f.name.replace("_0000", "_0001")))
    nn = adapter(root)
    index = nn.build_index(root)
    assert nn.channels == 2 and nn.read_image(next(index.itertuples())).shape == (2, 32, 32)
    cache = build_cache(nn, index, 32, tmp_path / "cache")
    assert cache.images.shape == (2 * len(index), 32, 32)
    first, second = np.asarray(cache.images[0], np.float32), np.asarray(cache.images[1], np.float32)
    assert first.max() == second.max() == 1.0 and np.allclose(first + second, 1.0, atol=2e-3)  # each on its own
    run = tmp_path / "run"
    train(TrainConfig(base_model=str(tiny_models["segformer"]), dataset="nnunet", data_dir=str(root),
                      output_dir=str(run), image_size=32, epochs=1, train_batch_size=4, num_workers=0, n_folds=3,
                      cache_dir=str(tmp_path / "cache")))
    spec = InferenceSpec.load(run / "best")
    assert spec.channels == 2 and len(spec.mean) == 2
    assert json.loads((run / "best" / "config.json").read_text())["num_channels"] == 2
    assert predict(["--model", str(run / "best"), "--data_dir", str(root), "--out", str(tmp_path / "p.csv"),
                    "--cache_dir", str(tmp_path / "cache")]) == 0
    assert predict(["--model", str(run / "best"), "--input", str(root / "imagesTr"), "--out", str(tmp_path / "v"),
                    "--cache_dir", str(tmp_path / "cache")]) == 0
    assert sorted(f.name for f in (tmp_path / "v").glob("*.nii.gz")) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    from giseg.commands.app import Analyser  # the app's path: a slice of the folder, its two channels read

    analysis = Analyser(run / "best", root, "cpu").analyse_id(index["id"].iloc[2])
    assert analysis.masks.shape == (1, 32, 32) and analysis.overlay.shape == (32, 32, 3)
    (root / "imagesTr" / "c_0001.nii.gz").unlink()
    with pytest.raises(UserError, match="c_0001.nii.gz missing beside it"):
        predict.__wrapped__(["--model", str(run / "best"), "--input", str(root / "imagesTr"), "--out",
                             str(tmp_path / "w")])


def test_input_mixing_shares_every_pretrained_filter_out_over_the_channels():
    import torch

    from giseg.models.widen import input_mixing

    for channels, modalities in ((2, 2), (4, 4), (6, 2), (15, 3), (5, 1), (3, 1)):
        mixing = input_mixing(channels, modalities)
        assert mixing.shape == (channels, 3) and torch.allclose(mixing.sum(0), torch.ones(3))
    assert torch.equal(input_mixing(3), torch.eye(3))
