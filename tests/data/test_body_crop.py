"""--body_crop: the body's box (largest bright component), one per volume, kept in the cache; predictions pasted
back to the full slice at original size."""
import numpy as np
import pytest
import torch

from giseg.data.cache import build_cache
from giseg.data.gi import build_index
from giseg.data.preprocess import body_box, crop_box, normalise_scan, prepare_scan, resize_mask
from giseg.data.registry import DATASETS

GI = DATASETS["gi"]


def test_the_body_box_is_the_torso_not_an_arm_beside_it():
    scan = np.zeros((120, 160), np.float32)
    yy, xx = np.ogrid[:120, :160]
    scan[((yy - 60) / 40) ** 2 + ((xx - 70) / 50) ** 2 <= 1] = 0.6  # the torso: rows 20-100, columns 20-120
    scan[50:70, 140:150] = 1.0  # a brighter arm, apart from it
    assert body_box(scan) == (20, 101, 20, 121)
    assert body_box(np.zeros((30, 40), np.float32)) == (0, 30, 0, 40)  # nothing bright: the whole slice


def test_the_crop_box_grows_by_the_margin_becomes_square_and_stays_inside_the_slice():
    assert crop_box((20, 101, 20, 121), (120, 160), 5) == (5, 116, 15, 126)  # 111 x 111, centred on the body
    y0, y1, x0, x1 = crop_box((0, 80, 30, 60), (120, 160), 8)  # taller than wide, at the top edge
    assert (y0, y1 - y0) == (0, x1 - x0) and 0 <= x0 and x1 <= 160
    assert crop_box((0, 120, 0, 160), (120, 160), 8) == (0, 120, 0, 160)  # cannot grow: the slice itself


def test_a_cropped_cache_keeps_one_box_per_volume_and_the_masks_of_that_crop(demo_dir, tmp_path):
    index = build_index(demo_dir)
    plain = build_cache(GI, index, 64, tmp_path)
    cache = build_cache(GI, index, 64, tmp_path, crop_margin=4)
    assert plain.boxes is None and cache.path != plain.path and cache.path.name.startswith("64px-crop4-")
    assert cache.boxes.shape == (len(index), 4)
    for _, rows in index.groupby(list(GI.volume_columns)).indices.items():
        assert (cache.boxes[rows] == cache.boxes[rows[0]]).all()  # 2.5D neighbours stay aligned
    r = int(np.flatnonzero([GI.read_masks(row).any() for row in index.itertuples()])[0])
    row = next(index.iloc[[r]].itertuples())
    y0, y1, x0, x1 = cache.boxes[r]
    assert 0 <= y0 < y1 <= row.height and 0 <= x0 < x1 <= row.width
    np.testing.assert_array_equal(cache.masks[r], resize_mask(np.ascontiguousarray(GI.read_packed(row)[y0:y1, x0:x1]), 64))
    crop = (slice(y0, y1), slice(x0, x1))
    np.testing.assert_array_equal(cache.images[r], prepare_scan(GI.read_image(row), 64, crop))
    scan = normalise_scan(GI.read_image(row))
    assert (body_box(scan)[0] >= y0) and body_box(scan)[1] <= y1  # the slice's own body is inside its volume's box


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_logits_of_a_crop_are_pasted_into_a_slice_that_is_background_around_them(task):
    from giseg.inference.segmenter import Segmenter
    from giseg.inference.spec import InferenceSpec

    spec = InferenceSpec("gi", task, ("a", "b"), 32, 1, 2, (0, 0, 0), (1, 1, 1),
                         (0.5, 0.5) if task == "multilabel" else (), body_crop=True, crop_margin=2)
    seg = Segmenter(torch.nn.Identity(), spec, torch.device("cpu"))
    k = 2 if task == "multilabel" else 3
    logits = torch.full((1, k, 8, 8), 5.0)  # every class "on" in the whole crop
    full = seg.paste(logits, (40, 50), (10, 30, 5, 25))
    masks = seg.masks(full, (40, 50))[0]
    inside = np.zeros((40, 50), bool)
    inside[10:30, 5:25] = True
    if task == "multilabel":
        assert all(np.array_equal(masks[c].numpy(), inside) for c in range(2))
    else:  # equal logits inside: argmax takes the first (background); outside the background wins
        assert not masks.any()
    assert seg.paste(logits, (40, 50)).shape == (1, k, 40, 50)  # no box: plain upsampling


def test_a_body_cropped_run_predicts_and_scores_at_original_size_as_its_final_eval(demo_dir, tiny_models, tmp_path):
    import json

    from giseg.commands.predict import main as predict_main
    from giseg.commands.score import main as score_main
    from giseg.training.config import TrainConfig
    from giseg.training.loop import train

    run = tmp_path / "run"
    train(TrainConfig(base_model=str(tiny_models["segformer"]), data_dir=str(demo_dir), output_dir=str(run),
                      image_size=64, epochs=1, lr=2e-3, num_workers=0, n_folds=2, head_prior=0.0, body_crop=True,
                      crop_margin=4, final_eval=True, cache_dir=str(tmp_path / "cache")))
    spec = json.loads((run / "best" / "inference_spec.json").read_text())
    assert spec["body_crop"] is True and spec["crop_margin"] == 4
    assert "body crop:" in (run / "train.log").read_text()
    final = json.loads((run / "val_scores.json").read_text())
    assert final["dice_mean"] > 0  # (head_prior 0: it predicts organs from the first epoch, inside the crop)
    out = tmp_path / "sub.csv"
    assert predict_main(["--model", str(run / "best"), "--data_dir", str(demo_dir), "--fold", "0", "--out", str(out),
                         "--cache_dir", str(tmp_path / "cache"), "--num_workers", "0"]) == 0
    assert score_main(["--pred", str(out), "--data_dir", str(demo_dir), "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["score"] == pytest.approx(final["score"], abs=1e-9)
