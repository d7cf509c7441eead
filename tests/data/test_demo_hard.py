"""The hard demo (giseg/data/demo_hard.py): the real data's organ sizes and volume ends kept, each knob doing
something, one line for a bad knob, and its calibration figures in the docs as recorded."""
import dataclasses
import json

import numpy as np
import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    from giseg.data.demo import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("hard") / "data", anatomy="hard")  # the demo's 360 slices


def test_the_hard_demo_keeps_the_real_datas_organ_sizes_organ_free_ends_and_overlap(hard):
    from giseg.data.demo import REAL_MEDIAN_AREA
    from giseg.data.gi import build_index
    from giseg.data.registry import DATASETS

    index = build_index(hard)
    masks = [DATASETS["gi"].read_masks(r).astype(bool) for r in index.itertuples()]
    area = np.stack([m.mean((-2, -1)) for m in masks])
    for c, name in enumerate(("large_bowel", "small_bowel", "stomach")):
        median = np.median(area[area[:, c] > 0, c])
        assert abs(median - REAL_MEDIAN_AREA[name]) <= 0.2 * REAL_MEDIAN_AREA[name], (name, median)
    shown = area.sum(1) > 0
    for _, grp in index.groupby(["case", "day"]):
        rows = grp.sort_values("slice").index.to_numpy()
        n = len(rows)
        assert not shown[rows[:n // 6]].any() and not shown[rows[-(n // 6):]].any()
    assert any((m[0] & m[1]).any() for m in masks)  # the small bowel's loops touch and overlap the colon


def test_the_days_of_a_case_share_its_anatomy_but_not_their_images(hard):
    import cv2

    from giseg.data.demo_hard import case_anatomy

    a, b = (case_anatomy(np.random.default_rng([0, 2])) for _ in range(2))
    assert json.dumps(a, default=str) == json.dumps(b, default=str)  # drawn from (seed, case) alone
    day1, day7 = (sorted((hard / "train" / "case2" / f"case2_day{d}" / "scans").iterdir())[20] for d in (1, 7))
    one, seven = (cv2.imread(str(p), cv2.IMREAD_UNCHANGED).astype(float) for p in (day1, day7))
    assert np.abs(one - seven).mean() > 0.05 * one.mean()


def test_every_knob_changes_the_slice_and_zero_turns_it_off():
    from giseg.data.demo_hard import HardKnobs, case_anatomy, day_state, draw_hard_slice

    def draw(knobs):
        anatomy = case_anatomy(np.random.default_rng([0, 2]))
        day = day_state(np.random.default_rng([0, 2, 1]), knobs)
        return draw_hard_slice(np.random.default_rng(5), (96, 96), 0.5, 20, anatomy, day, knobs)

    img, masks = draw(HardKnobs())
    for f in dataclasses.fields(HardKnobs):
        off_img, off_masks = draw(HardKnobs(**{f.name: 0.0}))
        changed = not np.array_equal(off_img, img) or any(not np.array_equal(off_masks[k], masks[k]) for k in masks)
        assert changed, f"knob {f.name} does nothing"
    clean, _ = draw(HardKnobs(noise=0, bias=0, confounders=0))
    body = img > np.percentile(img, 60)
    assert clean[body].std() < img[body].std()


def test_a_bad_knob_is_one_line_naming_it(tmp_path, capsys):
    from giseg.commands.demo_data import main

    for args, message in ((["--hard_knobs", "nois=1"], "--hard_knobs: unknown knob 'nois' (knobs: bias, "),
                          (["--hard_knobs", "noise=-1"], "--hard_knobs: knob noise=-1: must be >= 0"),
                          (["--hard_knobs", "noise=x"], "expected a number"),
                          (["--anatomy", "large"], "--difficulty hard draws the real data's organ sizes")):
        assert main(["--difficulty", "hard", "--out", str(tmp_path / "x"), *args]) == 2
        assert message in capsys.readouterr().err
    assert main(["--hard_knobs", "noise=0", "--out", str(tmp_path / "x")]) == 2
    assert "--hard_knobs is for --difficulty hard" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_docs_state_every_knob_and_the_recorded_calibration():
    import sys

    from giseg.data.demo_hard import HardKnobs

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import hard_demo

    doc = (ROOT / "docs" / "hard-demo.md").read_text()
    for f in dataclasses.fields(HardKnobs):
        assert f"| `{f.name}` | {f.default} | {f.metadata['help']} |" in doc, f.name
    recording = json.loads(hard_demo.RECORDING.read_text())
    block = doc[doc.index(hard_demo.START):doc.index(hard_demo.END) + len(hard_demo.END)]
    assert block == hard_demo.render(recording)  # (python benchmarks/hard_demo.py --render rewrites it)
    assert len(recording["runs"]) >= 3


def test_the_docs_ablation_table_is_the_recording_of_its_parts_and_the_preset_is_its_best_row():
    """docs/hard-demo.md's technique table is benchmarks/hard_ablation_cpu.json's, which is its parts' (each (row,
    seed) as measured: benchmarks/hard_ablation_parts/), over 3 folds and at least 3 seeds; giseg cv --preset
    competition, named by what it runs now, is the row with the best competition score, and the docs' real-data
    command runs it."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import hard_ablation
    from ablation import summary

    recording = json.loads(hard_ablation.RECORDING.read_text())
    doc = (ROOT / "docs" / "hard-demo.md").read_text()
    block = doc[doc.index(hard_ablation.START):doc.index(hard_ablation.END) + len(hard_ablation.END)]
    assert block == f"{hard_ablation.START}\n{hard_ablation.table(recording)}\n{hard_ablation.END}"
    seeds, rows = recording["seeds"], recording["rows"]
    assert len(seeds) >= 3 and recording["folds"] == 3
    assert all(len(row["figures"]) == len(seeds) * 3 for row in rows.values())
    again = hard_ablation.assemble(hard_ablation.PARTS, list(rows), seeds, 3, recording["command"])
    assert again["rows"] == rows and again["commits"] == recording["commits"]
    scores = {name: summary(row["figures"])["mean"]["score"] for name, row in rows.items()}
    best = max(scores, key=scores.get)
    assert best == hard_ablation.preset_label(), scores  # (a changed preset is a new row, to be measured)
    competition = (ROOT / "docs" / "competition.md").read_text()
    assert "giseg cv --output_dir runs/competition --preset competition" in competition
