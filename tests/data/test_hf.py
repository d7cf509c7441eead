"""--dataset hf (Hugging Face datasets in) and export_hf.py (out)."""
import json

import numpy as np
import pytest

from giseg.data.registry import get_adapter
from giseg.data.masks import IGNORE_BIT
from giseg.utils.errors import UserError

INDEX_COLUMNS = ["id", "case", "day", "slice", "width", "height", "spacing_x", "spacing_y"]


@pytest.fixture(scope="module")
def exported(demo_dir, tmp_path_factory):
    from giseg.commands.export_hf import main

    out = tmp_path_factory.mktemp("hf") / "gi-demo"
    assert main(["--data_dir", str(demo_dir), "--out", str(out)]) == 0
    return out


def _label_map_dataset(folder, labels: list[np.ndarray], id2label: dict | None, image_column="image",
                       label_column="label", extra: dict | None = None):
    """A parquet folder as load_dataset reads it: one image and one label map (uint8 PNG) per row."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, lab.shape, dtype=np.uint8)) for lab in labels]
    ds = datasets.Dataset.from_dict({image_column: images, label_column: [Image.fromarray(lab) for lab in labels],
                                     **(extra or {})},
                                    features=datasets.Features({image_column: datasets.Image(),
                                                                label_column: datasets.Image(),
                                                                **{k: datasets.Value("string") for k in extra or {}}}))
    folder.mkdir(parents=True)
    ds.to_parquet(str(folder / "train.parquet"))
    if id2label is not None:
        (folder / "id2label.json").write_text(json.dumps({str(k): v for k, v in id2label.items()}))
    return folder


def test_the_export_reads_back_as_the_same_index_scans_and_overlapping_masks(demo_dir, exported):
    gi = get_adapter("gi")
    hf = get_adapter("hf").bind(exported)
    assert hf.classes == gi.classes and hf.volume_columns == gi.volume_columns
    a, b = gi.build_index(demo_dir), hf.build_index(exported)
    assert a[INDEX_COLUMNS].equals(b[INDEX_COLUMNS])
    overlaps = 0
    for ra, rb in zip(a.itertuples(), b.itertuples()):
        scan = hf.read_image(rb)
        assert scan.dtype == np.uint16 and np.array_equal(scan, gi.read_image(ra))  # 16-bit, as stored
        assert np.array_equal(hf.read_packed(rb), gi.read_packed(ra))
        overlaps += int((gi.read_masks(ra).sum(0) > 1).any())
    assert overlaps > 0  # the demo has overlapping organs, and they survive the export
    assert json.loads((exported / "id2label.json").read_text()) == {"0": "large_bowel", "1": "small_bowel",
                                                                     "2": "stomach"}


def test_training_on_the_export_matches_training_on_the_kaggle_folder(demo_dir, exported, tiny_models, tmp_path):
    """Same seed: the same cache masks and the same first-epoch losses; predict.py and score.py read it too."""
    from giseg.data.cache import build_cache
    from giseg.commands.predict import main as predict_main
    from giseg.commands.score import main as score_main
    from giseg.training.config import TrainConfig
    from giseg.training.loop import train

    runs = {}
    for name, dataset, data in (("kaggle", "gi", demo_dir), ("hf", "hf", exported)):
        cfg = TrainConfig(base_model=str(tiny_models["segformer"]), data_dir=str(data), dataset=dataset,
                          output_dir=str(tmp_path / name), image_size=64, epochs=1, train_batch_size=8, lr=2e-3,
                          num_workers=0, n_folds=3, cache_dir=str(tmp_path / "cache"))
        train(cfg)
        runs[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("train_loss", "val_loss", "dice_mean"):
        assert runs["hf"][key] == pytest.approx(runs["kaggle"][key], abs=1e-6), key
    gi, hf = get_adapter("gi"), get_adapter("hf").bind(exported)
    caches = [build_cache(a, a.build_index(d), 64, tmp_path / "cache") for a, d in ((gi, demo_dir), (hf, exported))]
    assert caches[0].path != caches[1].path and np.array_equal(caches[0].masks, caches[1].masks)
    spec = json.loads((tmp_path / "hf" / "best" / "inference_spec.json").read_text())
    assert spec["dataset"] == "hf" and spec["dataset_options"]["hf_split"] == "train"
    sub = tmp_path / "sub.csv"
    assert predict_main(["--model", str(tmp_path / "hf" / "best"), "--data_dir", str(exported), "--out", str(sub),
                         "--cache_dir", str(tmp_path / "cache")]) == 0
    assert score_main(["--pred", str(sub), "--data_dir", str(exported), "--dataset", "hf",
                       "--json", str(tmp_path / "s.json")]) == 0
    assert 0 <= json.loads((tmp_path / "s.json").read_text())["score"] <= 1
    from giseg.commands.app import Analyser
    from giseg.evaluation.figures import run_adapter

    analyser = Analyser(tmp_path / "hf" / "best", exported)  # the app, on the export's slices
    assert list(analyser.analyse_id(analyser.slice_ids()[0]).table["organ"]) == list(gi.classes)
    assert run_adapter(tmp_path / "hf")[1].classes == gi.classes  # the notebook's figures read the run's data
    assert not (tmp_path / "hf" / "trackers").exists()  # --report_to none: no tracker


def test_label_maps_follow_the_hf_conventions_reduce_labels_and_255_unlabelled(tmp_path):
    lab = np.array([[0, 1, 2, 255], [3, 0, 1, 2]], np.uint8).repeat(4, 0).repeat(4, 1)
    folder = _label_map_dataset(tmp_path / "maps", [lab], {0: "road", 1: "car", 2: "tree"})
    reduced = get_adapter("hf").bind(folder, {"reduce_labels": True})
    assert reduced.classes == ("road", "car", "tree") and reduced.volume_columns == ("case",)
    row = next(reduced.build_index(folder).itertuples())
    packed = reduced.read_packed(row)
    # reduce: 0 -> 255 (unlabelled), v -> v - 1; so 1 -> road (bit 0), 2 -> car (bit 1), 3 -> tree (bit 2)
    want = np.select([lab == 0, lab == 255, lab == 1, lab == 2, lab == 3],
                     [1 << IGNORE_BIT, 1 << IGNORE_BIT, 1, 2, 4])
    assert np.array_equal(packed, want)
    assert np.array_equal(reduced.ignored(row), (lab == 0) | (lab == 255))
    plain = get_adapter("hf").bind(folder)  # not reduced: 0 is road, 3 is not in id2label
    with pytest.raises(UserError, match=r"label value\(s\) \[3\] are not in id2label.json"):
        plain.read_packed(next(plain.build_index(folder).itertuples()))


def test_a_background_label_is_no_class_and_each_image_is_its_own_case_without_a_case_column(tmp_path):
    labs = [np.full((8, 8), v, np.uint8) for v in (0, 1, 2)]
    folder = _label_map_dataset(tmp_path / "bg", labs, {0: "background", 1: "liver", 2: "kidney"})
    adapter = get_adapter("hf").bind(folder)
    assert adapter.classes == ("liver", "kidney")
    index = adapter.build_index(folder)
    assert list(index["case"]) == [0, 1, 2] and list(index["slice"]) == [0, 0, 0]
    assert [int(adapter.read_packed(r).max()) for r in index.itertuples()] == [0, 1, 2]


def test_a_case_column_groups_images_for_the_case_level_folds(tmp_path):
    from giseg.data.folds import split_by_case

    labs = [np.full((8, 8), 1, np.uint8)] * 6
    folder = _label_map_dataset(tmp_path / "cases", labs, {1: "lesion"},
                                extra={"patient": ["p1", "p1", "p2", "p2", "p3", "p3"]})
    adapter = get_adapter("hf").bind(folder, {"case_column": "patient"})
    index = adapter.build_index(folder)
    assert list(index["case_name"]) == ["p1", "p1", "p2", "p2", "p3", "p3"] and index["case"].nunique() == 3
    train, val = split_by_case(index, 0, 3)
    assert not set(index["case"].iloc[train]) & set(index["case"].iloc[val])


@pytest.mark.parametrize("problem, options, message", [
    ("no id2label", {}, "needs class names: put an id2label.json"),
    ("no such image column", {"image_column": "scan"}, "--image_column: .* has no column 'scan'"),
    ("no such label column", {"label_column": "seg"}, "--label_column seg: .* has no such column"),
    ("too many classes", {}, "8 classes .* takes 1 to 7"),
])
def test_a_dataset_the_adapter_cannot_read_is_refused_in_one_line(tmp_path, problem, options, message):
    id2label = None if problem == "no id2label" else {i: f"c{i}" for i in range(8 if "many" in problem else 2)}
    folder = _label_map_dataset(tmp_path / "bad", [np.zeros((8, 8), np.uint8)], id2label)
    with pytest.raises(UserError, match=message):
        get_adapter("hf").bind(folder, options)


def test_a_split_the_folder_lacks_is_refused_naming_the_splits_it_has(exported, tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.load_from_disk(str(exported)).select(range(2))})
    dd.save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "dd" / "id2label.json").write_text((exported / "id2label.json").read_text())
    assert get_adapter("hf").bind(tmp_path / "dd").classes == ("large_bowel", "small_bowel", "stomach")
    with pytest.raises(UserError, match="--hf_split validation: .* has the splits train"):
        get_adapter("hf").bind(tmp_path / "dd", {"hf_split": "validation"})


def test_unlabelled_pixels_are_left_out_of_the_score(tmp_path):
    """score.py: a prediction over 255 pixels neither helps nor hurts."""
    import pandas as pd

    from giseg.data.rle import encode_rle
    from giseg.evaluation.score import score_predictions

    lab = np.zeros((16, 16), np.uint8)
    lab[4:8, 4:8] = 1
    lab[10:14, :] = 255
    folder = _label_map_dataset(tmp_path / "ign", [lab], {1: "organ"})
    adapter = get_adapter("hf").bind(folder)
    index = adapter.build_index(folder)
    pred = (lab > 0).astype(np.uint8)  # the organ, and every unlabelled pixel too
    overall, _ = score_predictions(adapter, index, pd.DataFrame({"id": index["id"], "pred_organ": [encode_rle(pred)]}))
    assert overall["dice_organ"] == pytest.approx(1.0)


def test_pushing_an_export_with_the_hub_unreachable_keeps_the_folder_and_says_how_to_push(exported):
    import io
    import logging

    from giseg.commands.export_hf import push_dataset
    from giseg.utils.log import logger

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        assert push_dataset(exported, "me/gi-demo", private=True) is False
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "push to the Hub failed" in text and f"load_from_disk('{exported}').push_to_hub('me/gi-demo', private=True)" in text
    assert (exported / "id2label.json").is_file() and (exported / "state.json").is_file()


def test_a_label_map_dataset_with_unlabelled_pixels_trains_multiclass_end_to_end(tiny_models, tmp_path):
    """Parquet label maps with 255 borders, grouped by a patient column: the cache keeps the ignore bit and the
    run trains and evaluates through it."""
    from giseg.data.cache import build_cache
    from giseg.training.config import TrainConfig
    from giseg.training.loop import train

    rng = np.random.default_rng(1)
    labs = []
    for _ in range(9):
        lab = np.zeros((48, 48), np.uint8)
        y, x = rng.integers(8, 30, 2)
        lab[y:y + 12, x:x + 12] = rng.integers(1, 3)
        lab[:, :4] = 255  # unlabelled border
        labs.append(lab)
    folder = _label_map_dataset(tmp_path / "maps", labs, {0: "background", 1: "liver", 2: "kidney"},
                                extra={"case": [f"p{i // 3}" for i in range(9)]})
    out = tmp_path / "run"
    last = train(TrainConfig(base_model=str(tiny_models["segformer"]), data_dir=str(folder), dataset="hf",
                             task="multiclass", output_dir=str(out), image_size=64, epochs=1, train_batch_size=3,
                             lr=2e-3, num_workers=0, n_folds=3, cache_dir=str(tmp_path / "cache")))
    assert np.isfinite(last["train_loss"]) and 0 <= last["dice_mean"] <= 1
    assert set(last) >= {"dice_liver", "dice_kidney"}
    adapter = get_adapter("hf").bind(folder)
    cache = build_cache(adapter, adapter.build_index(folder), 64, tmp_path / "cache")
    assert ((cache.masks >> IGNORE_BIT) & 1)[:, :, :4].all()  # the unlabelled border, at the training size
    assert adapter.may_have_unlabelled and not get_adapter("gi").may_have_unlabelled


def _dataset(folder, columns: dict, features: dict, id2label=None):
    import datasets

    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    folder.mkdir(parents=True)
    ds.to_parquet(str(folder / "train.parquet"))
    if id2label is not None:
        (folder / "id2label.json").write_text(json.dumps({str(k): v for k, v in id2label.items()}))
    return folder


@pytest.mark.parametrize("problem, options, message", [
    ("duplicate names", {}, r"the name 'car' is given to ids \[1, 2\]"),
    ("a path as a class name", {}, r"class name '../../x' cannot be used"),
    ("a mistyped case column", {"case_column": "patiant"}, r"--case_column patiant: .* has no such column"),
])
def test_labels_and_cases_that_would_be_silently_wrong_are_refused(tmp_path, problem, options, message):
    names = {"duplicate names": {0: "road", 1: "car", 2: "car"}, "a path as a class name": {0: "road", 1: "../../x"},
             "a mistyped case column": {0: "road", 1: "car"}}[problem]
    folder = _label_map_dataset(tmp_path / "bad", [np.zeros((8, 8), np.uint8)], names, extra={"patient": ["p1"]})
    with pytest.raises(UserError, match=message):
        get_adapter("hf").bind(folder, options).build_index(folder)


def test_reduce_labels_on_mask_columns_is_refused_not_ignored(exported):
    with pytest.raises(UserError, match="--reduce_labels applies to a label map only"):
        get_adapter("hf").bind(exported, {"reduce_labels": True})


def test_a_float_label_map_with_fractions_is_refused_not_truncated(tmp_path):
    import datasets

    lab = np.full((8, 8), 1.0, np.float32)
    lab[0, 0] = 1.5
    folder = _dataset(tmp_path / "f", {"image": [np.zeros((8, 8), np.uint8)], "label": [lab]},
                      {"image": datasets.Array2D((8, 8), "uint8"), "label": datasets.Array2D((8, 8), "float32")},
                      {0: "background", 1: "lesion"})
    adapter = get_adapter("hf").bind(folder)
    with pytest.raises(UserError, match=r"row 0 .*fractional values such as 1.5"):
        adapter.read_packed(next(adapter.build_index(folder).itertuples()))


def test_width_and_height_columns_that_disagree_with_the_image_are_named(tmp_path):
    from PIL import Image

    import datasets

    folder = _dataset(tmp_path / "wh", {"image": [Image.fromarray(np.zeros((8, 12), np.uint8))],
                                        "label": [Image.fromarray(np.zeros((8, 12), np.uint8))],
                                        "width": [8], "height": [12]},
                      {"image": datasets.Image(), "label": datasets.Image(), "width": datasets.Value("int64"),
                       "height": datasets.Value("int64")}, {0: "background", 1: "lesion"})
    adapter = get_adapter("hf").bind(folder)
    with pytest.raises(UserError, match=r"the image is 12 wide x 8 high but the row's width/height say 8 x 12"):
        adapter.read_image(next(adapter.build_index(folder).itertuples()))


def test_an_image_path_outside_the_dataset_folder_is_refused(tmp_path):
    from PIL import Image

    import datasets

    outside = tmp_path / "secret.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside)
    folder = _dataset(tmp_path / "p", {"image": [{"path": str(outside), "bytes": None}],
                                       "label": [Image.fromarray(np.zeros((8, 8), np.uint8))]},
                      {"image": datasets.Image(), "label": datasets.Image()}, {0: "background", 1: "lesion"})
    with pytest.raises(UserError, match=r"row 0 column image: its image is the file .*secret.png, outside"):
        get_adapter("hf").bind(folder).build_index(folder)


def test_an_empty_dataset_and_a_folder_of_images_are_one_line(tmp_path, demo_dir):
    import shutil

    import datasets

    folder = tmp_path / "empty"
    datasets.Dataset.from_dict({"image": [], "label": []}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.Image()})).save_to_disk(str(folder))
    (folder / "id2label.json").write_text('{"0": "background", "1": "lesion"}')
    with pytest.raises(UserError, match="split train has no rows"):
        get_adapter("hf").bind(folder).build_index(folder)
    shutil.copytree(demo_dir / "train", tmp_path / "gi-test" / "test")  # GI's test layout: PNGs only
    with pytest.raises(UserError, match="not a Hugging Face dataset folder"):
        get_adapter("hf").bind(tmp_path / "gi-test", classes=("large_bowel", "small_bowel", "stomach"))


def test_augmentation_pads_data_that_may_be_unlabelled_with_the_ignore_label():
    from giseg.data.augment import train_transform

    image, mask = np.ones((64, 64), np.float32), np.zeros((64, 64), np.uint8)
    padded = {flag: [train_transform(64, seed=s, unlabelled=flag)(image=image, mask=mask)["mask"] for s in range(12)]
              for flag in (False, True)}
    assert all(m.max() == 0 for m in padded[False])  # GI: the padding is background
    assert any((m == 1 << IGNORE_BIT).any() for m in padded[True])  # a label map with 255: unlabelled, not background


def test_export_never_writes_into_its_data_or_a_folder_it_did_not_create(demo_dir, tmp_path, capsys):
    import shutil

    from giseg.commands.export_hf import main

    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    assert main(["--data_dir", str(data), "--out", str(data)]) == 2
    assert "--out " + str(data.resolve()) + " is --data_dir" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["--data_dir", str(data), "--out", str(mine)]) == 2
    assert "already holds files that giseg export-hf did not write" in capsys.readouterr().err
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before and (mine / "notes.txt").is_file()


def test_data_whose_labels_are_all_unlabelled_is_refused_not_scored_as_dice_1(tiny_models, tmp_path):
    from giseg.training.config import TrainConfig
    from giseg.training.loop import train

    labs = [np.full((32, 32), 255, np.uint8)] * 4
    folder = _label_map_dataset(tmp_path / "none", labs, {0: "background", 1: "liver"},
                                extra={"case": ["p0", "p1", "p2", "p3"]})
    with pytest.raises(UserError, match=r"every pixel of the 2 training slices \(fold 0\) is unlabelled"):
        train(TrainConfig(base_model=str(tiny_models["segformer"]), data_dir=str(folder), dataset="hf",
                          output_dir=str(tmp_path / "run"), image_size=32, epochs=1, num_workers=0, n_folds=2,
                          cache_dir=str(tmp_path / "cache")))


def test_a_full_disk_during_export_is_one_line_and_leaves_no_temporary_folder(demo_dir, tmp_path, capsys, monkeypatch):
    import errno

    import datasets
    from datasets.exceptions import DatasetGenerationError

    from giseg.commands.export_hf import main

    def full_disk(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:  # datasets wraps what the generator meets in its own error
            raise DatasetGenerationError("An error occurred while generating the dataset") from e

    monkeypatch.setattr(datasets.Dataset, "from_generator", full_disk)
    assert main(["--data_dir", str(demo_dir), "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot save the export to") and "No space left on device" in err
    assert "run the export again" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_nan_image_and_a_string_volume_column_are_one_line_not_a_nan_loss_or_a_traceback(tmp_path):
    import datasets

    from giseg.data.cache import build_cache

    image = np.ones((8, 8), np.float32)
    image[2, 3] = np.nan
    folder = _dataset(tmp_path / "nan", {"image": [image], "label": [np.zeros((8, 8), np.uint8)]},
                      {"image": datasets.Array2D((8, 8), "float32"), "label": datasets.Array2D((8, 8), "uint8")},
                      {0: "background", 1: "lesion"})
    adapter = get_adapter("hf").bind(folder)
    with pytest.raises(UserError, match=r"the image holds NaN or infinite values"):
        build_cache(adapter, adapter.build_index(folder), 32, tmp_path / "cache")
    folder = _label_map_dataset(tmp_path / "day", [np.zeros((8, 8), np.uint8)], {0: "background", 1: "lesion"},
                                extra={"day": ["monday"]})
    with pytest.raises(UserError, match=r"column 'day' must hold numbers in every row"):
        get_adapter("hf").bind(folder).build_index(folder)


def test_sigterm_during_export_removes_its_temporary_folders_and_is_one_line(demo_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "exports" / "gi"
    proc = subprocess.Popen([sys.executable, "-m", "giseg", "export-hf", "--data_dir", str(demo_dir), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not list(out.parent.glob(".gi.*.work.tmp")):
        time.sleep(0.05)
    assert proc.poll() is None, "the export ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and err.strip().splitlines()[-1].startswith("stopped by SIGTERM")
    assert "Traceback" not in err and list(out.parent.iterdir()) == []  # (it used to leave its work folder behind)
