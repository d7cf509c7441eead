import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from giseg.data.gi import GI_CLASSES, build_index
from giseg.data.folds import case_folds, split_by_case
from giseg.data.volumes import neighbour_table
from giseg.data.base import ScanFormatWarning, read_scan
from giseg.data.preprocess import normalise_scan
from giseg.data.rle import decode_rle, encode_rle
from giseg.utils.errors import UserError


def test_index_has_one_row_per_slice_with_sizes_from_file_names(demo_dir):
    index = build_index(demo_dir)
    assert index["id"].is_unique
    assert len(index) == len(pd.read_csv(demo_dir / "train.csv")) // 3
    assert {(360, 310), (266, 266)} <= set(zip(index["width"], index["height"]))
    assert {f"rle_{c}" for c in GI_CLASSES} <= set(index.columns)


def test_width_and_height_order_on_a_non_square_scan(tmp_path):
    """A 360 wide x 310 high scan reads as a (310, 360) array and its mask lands on the drawn pixels."""
    scans = tmp_path / "train" / "case1" / "case1_day1" / "scans"
    scans.mkdir(parents=True)
    img = np.zeros((310, 360), np.uint16)
    img[20:40, 300:350] = 5000  # a bright block near the right edge, only possible in a wide image
    cv2.imwrite(str(scans / "slice_0001_360_310_1.50_1.50.png"), img)
    organ = (img > 0).astype(np.uint8)
    (tmp_path / "train.csv").write_text("id,class,segmentation\n" + "".join(
        f"case1_day1_slice_0001,{c},{encode_rle(organ) if c == 'stomach' else ''}\n" for c in GI_CLASSES))
    row = build_index(tmp_path).iloc[0]
    assert (row.width, row.height) == (360, 310)
    scan = read_scan(row.path, row.width, row.height)
    assert scan.shape == (310, 360)
    mask = decode_rle(row.rle_stomach, (row.height, row.width))
    np.testing.assert_array_equal(mask.astype(bool), scan > 0)


def test_split_never_puts_a_case_in_train_and_validation(demo_dir):
    index = build_index(demo_dir)
    seen_val = []
    for fold in range(3):
        tr, va = split_by_case(index, fold, 3)
        assert len(va) and len(tr)
        assert not set(index["case"].iloc[tr]) & set(index["case"].iloc[va])
        assert len(tr) + len(va) == len(index)
        seen_val += list(index["case"].iloc[va].unique())
    assert sorted(seen_val) == sorted(index["case"].unique())  # every case validated exactly once


def test_folds_are_deterministic_and_seed_dependent(demo_dir):
    index = build_index(demo_dir)
    assert case_folds(index, 3, seed=1) == case_folds(index, 3, seed=1)
    assert len({tuple(sorted(case_folds(index, 3, seed=s).items())) for s in range(6)}) > 1


def test_split_rejects_bad_fold_and_too_many_folds(demo_dir):
    index = build_index(demo_dir)
    with pytest.raises(UserError, match="--fold must be in"):
        split_by_case(index, 3, 3)
    with pytest.raises(UserError, match="validation of some folds"):
        split_by_case(index, 0, 50)


def test_neighbours_stack_same_case_day_and_clamp_at_volume_ends():
    index = pd.DataFrame({"case": [1] * 5 + [2] * 3, "day": [1] * 5 + [1] * 3,
                          "slice": [1, 2, 3, 4, 5, 1, 2, 3]})
    nb = neighbour_table(index, 3, stride=2)
    assert nb[2].tolist() == [0, 2, 4]  # slice 3 -> slices 1, 3, 5
    assert nb[0].tolist() == [0, 0, 2]  # slice 1 has no slice -1: uses itself
    assert nb[4].tolist() == [2, 4, 4]
    assert nb[6].tolist() == [5, 6, 7]  # case 2 never borrows from case 1
    assert nb[5].tolist() == [5, 5, 7]
    assert neighbour_table(index, 1).tolist() == [[i] for i in range(8)]


def test_normalise_scan_is_robust_to_a_hot_pixel():
    img = np.tile(np.arange(100, dtype=np.uint16), (100, 1)) * 10
    img[0, 0] = 65535
    out = normalise_scan(img)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert out[50, 50] == pytest.approx(0.5, abs=0.02)  # the hot pixel did not squash the range
    assert normalise_scan(np.full((4, 4), 7, np.uint16)).max() == 0.0


def _copy(demo_dir, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(demo_dir, dst)
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda df: df.drop(columns=["segmentation"]), "missing column"),
    (lambda df: df.replace({"class": {"stomach": "liver"}}), "unknown class 'liver'"),
    (lambda df: pd.concat([df, df.iloc[[5]]]), "duplicate row for id"),
    (lambda df: pd.concat([df, pd.DataFrame({"id": ["case99_day1_slice_0001"] * 3, "class": list(GI_CLASSES),
                                             "segmentation": [""] * 3})]), "have no scan file"),
    (lambda df: df[~df["id"].str.endswith("slice_0002")], "have no rows"),
    (lambda df: df.assign(segmentation=df["segmentation"].where(df.index != 40, "5 5 1 1")), "overlaps"),
    # a missing class row used to be read as "organ absent" (scoring a perfect submission 0.5 against it)
    (lambda df: df.drop(index=[3, 7]), r"2 id\(s\) lack a row for some class, e.g. .* has no \['.*'\]"),
])
def test_bad_train_csv_gets_a_clear_error(demo_dir, tmp_path, edit, message):
    data = _copy(demo_dir, tmp_path)
    df = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    edit(df).to_csv(data / "train.csv", index=False)
    with pytest.raises(UserError, match=message):
        build_index(data)


def test_missing_data_dir_and_missing_scans_are_clear(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_index(tmp_path / "nope")
    (tmp_path / "train.csv").write_text("id,class,segmentation\n")
    with pytest.raises(UserError, match="not found"):
        build_index(tmp_path)


def test_unparsable_scan_name_is_named(demo_dir, tmp_path):
    data = _copy(demo_dir, tmp_path)
    some = next((data / "train").glob("case*/case*_day*/scans/*.png"))
    some.rename(some.with_name("slice_x.png"))
    with pytest.raises(UserError, match="slice_x.png: scan file name does not parse"):
        build_index(data)


def test_corrupt_png_is_named(tmp_path):
    bad = tmp_path / "slice_0001_10_10_1.50_1.50.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UserError, match="cannot decode"):
        read_scan(bad)


def test_8bit_scan_is_accepted_with_a_warning(tmp_path):
    path = tmp_path / "s.png"
    cv2.imwrite(str(path), np.full((6, 8), 200, np.uint8))
    with pytest.warns(ScanFormatWarning, match="8-bit"):
        img = read_scan(path, 8, 6)
    assert img.shape == (6, 8)


def test_rgb_scan_is_converted_to_gray_with_a_warning(tmp_path):
    path = tmp_path / "rgb.png"
    cv2.imwrite(str(path), np.full((6, 8, 3), 90, np.uint8))
    with pytest.warns(ScanFormatWarning) as caught:  # (an 8-bit colour PNG: both of its formats are said)
        img = read_scan(path, 8, 6)
    assert img.shape == (6, 8)
    assert [str(w.message).split(" (")[0] for w in caught] == ["colour scans converted to gray", "8-bit scans"]


def test_missing_train_csv_is_named(demo_dir, tmp_path):
    data = _copy(demo_dir, tmp_path)
    (data / "train.csv").unlink()
    with pytest.raises(UserError, match="train.csv not found"):
        build_index(data)


def test_scan_symlink_leading_outside_the_data_folder_is_refused(demo_dir, tmp_path):
    data = _copy(demo_dir, tmp_path)
    outside = tmp_path / "elsewhere.png"
    victim = next((data / "train").glob("case*/case*_day*/scans/*.png"))
    victim.rename(outside)
    victim.symlink_to(outside)
    with pytest.raises(UserError, match="leads outside"):
        build_index(data)


def test_zero_byte_train_csv_is_one_line_not_a_traceback(demo_dir, tmp_path):
    data = _copy(demo_dir, tmp_path)
    (data / "train.csv").write_bytes(b"")
    with pytest.raises(UserError, match=r"train.csv is empty \(0 bytes\)"):
        build_index(data)


def test_a_volume_mixing_scan_sizes_is_named(demo_dir):
    from giseg.data.volumes import check_volume_sizes

    index = build_index(demo_dir)
    check_volume_sizes(index, ("case", "day"), "demo")  # the demo's volumes are uniform
    index.loc[3, "width"] += 16
    with pytest.raises(UserError, match=r"demo: 1 volume\(s\) mix scan sizes, e.g. \{'case': .*, 'day': .*\} has"):
        check_volume_sizes(index, ("case", "day"), "demo")


def test_a_scan_format_warning_is_shown_once_for_many_slices(tmp_path):
    """Python's default filter shows a ScanFormatWarning once, not once per slice of an 8-bit dataset."""
    import warnings

    paths = []
    for k in range(3):
        paths.append(tmp_path / f"s{k}.png")
        cv2.imwrite(str(paths[-1]), np.full((6, 8), 100 + k, np.uint8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for path in paths:
            read_scan(path, 8, 6)
    assert [str(w.message) for w in caught if w.category is ScanFormatWarning] == [
        "8-bit scans (expected 16-bit): intensities are normalised per slice, so they still work"]
