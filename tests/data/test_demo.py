import pandas as pd

from giseg.data.registry import DATASETS
from giseg.data.gi import build_index
from giseg.data.demo import make_demo_data


def test_demo_data_is_in_the_kaggle_layout_with_overlaps_and_empty_slices(demo_dir):
    df = pd.read_csv(demo_dir / "train.csv", keep_default_na=False)
    assert list(df.columns) == ["id", "class", "segmentation"]
    assert df.groupby("id").size().eq(3).all()
    index = build_index(demo_dir)  # validates every code against its scan size
    assert index["case"].nunique() >= 5 and len(index.groupby(["case", "day"])) > index["case"].nunique()
    assert {(360, 310), (266, 266)} <= set(zip(index["width"], index["height"]))
    masks = [DATASETS["gi"].read_masks(r) for r in index.itertuples()]
    empty = sum(not m.any() for m in masks)
    assert empty >= len(index) // 5
    assert any((m.sum(0) > 1).any() for m in masks)  # organs overlap somewhere
    for c in range(3):
        assert sum(m[c].any() for m in masks) > 0


def test_demo_data_is_deterministic(tmp_path):
    a = make_demo_data(tmp_path / "a", slices_per_day=3)
    b = make_demo_data(tmp_path / "b", slices_per_day=3)
    assert (a / "train.csv").read_text() == (b / "train.csv").read_text()
    fa = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert fa == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in fa[:5])


def test_the_full_size_layout_has_the_competitions_shape():
    from collections import Counter

    from giseg.data.demo import competition_layout

    layout = competition_layout()
    assert len(layout) == 274 and len({case for case, *_ in layout}) == 85
    assert len({(case, day) for case, day, *_ in layout}) == 274
    assert sum(n for _, _, n, _ in layout) == 38_496  # x 3 classes = 115,488 rows of train.csv
    by_size = Counter()
    for _, _, n, size in layout:
        by_size[size] += n
    assert by_size == {(266, 266): 25_920, (360, 310): 11_232, (276, 276): 1_200, (234, 234): 144}
    assert {n for _, _, n, size in layout if size == (276, 276)} == {80}


def test_drawing_case_days_in_parallel_writes_the_same_files(tmp_path):
    from giseg.data.demo import make_demo_data

    serial = make_demo_data(tmp_path / "serial", slices_per_day=3)
    parallel = make_demo_data(tmp_path / "parallel", slices_per_day=3, workers=2)
    assert (serial / "train.csv").read_text() == (parallel / "train.csv").read_text()
    files = sorted(p.relative_to(serial) for p in serial.rglob("*.png"))
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*.png"))
    assert all((serial / f).read_bytes() == (parallel / f).read_bytes() for f in files)


def test_the_demos_organs_have_the_real_datas_sizes_and_organ_free_volume_ends(tmp_path):
    import numpy as np

    from giseg.data.demo import REAL_MEDIAN_AREA

    data = make_demo_data(tmp_path / "demo", slices_per_day=40)  # the demo's own settings (anatomy "real")
    index = build_index(data)
    masks = [DATASETS["gi"].read_masks(r).astype(bool) for r in index.itertuples()]  # (C, H, W), sizes differ
    area = np.stack([m.mean((-2, -1)) for m in masks])  # (N, C) fraction of each slice
    present = area > 0
    for c, name in enumerate(("large_bowel", "small_bowel", "stomach")):
        median = np.median(area[area[:, c] > 0, c])
        assert abs(median - REAL_MEDIAN_AREA[name]) <= 0.2 * REAL_MEDIAN_AREA[name], (name, median)
    shown = present.any(1)
    for _, grp in index.groupby(["case", "day"]):
        rows = grp.sort_values("slice").index.to_numpy()
        n = len(rows)
        assert not shown[rows[:n // 6]].any() and not shown[rows[-(n // 6):]].any()  # organ-free ends
        assert shown[rows[n // 3:2 * n // 3]].all()
    assert 0.3 < 1 - shown.mean() < 0.6  # a large share of organ-free slices, as in the real volumes
    assert any((m[0] & m[1]).any() for m in masks)  # the overlap survives
    # organs come and go: some slice shows the small bowel without the stomach and the other way round
    assert (present[:, 1] & ~present[:, 2]).any() and (present[:, 2] & ~present[:, 1]).any()


def test_demo_data_is_never_written_among_other_files_and_an_earlier_demo_is_kept(tmp_path, capsys):
    from giseg.commands.demo_data import main

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep")
    assert main(["--out", str(tmp_path / "mine")]) == 2
    assert "already holds files that giseg demo-data did not write (e.g. thesis.tex)" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]
    assert main(["--dataset", "lgg", "--out", str(tmp_path / "lgg")]) == 0
    assert main(["--dataset", "lgg", "--out", str(tmp_path / "lgg")]) == 0  # its own folder: kept, not refused
