import numpy as np
import pytest
import torch

from giseg.data.gi import GI_CLASSES as GI
from giseg.evaluation.metrics import dice_from_stats, mask_stats, summarise


def _stats(pred, true):
    return mask_stats(torch.as_tensor(pred)[None, None], torch.as_tensor(true)[None, None])


def test_dice_of_hand_computed_cases():
    a = np.zeros((4, 4), bool)
    a[0, :2] = True  # 2 pixels
    b = np.zeros((4, 4), bool)
    b[0, 1:4] = True  # 3 pixels, 1 shared
    assert dice_from_stats(_stats(a, b))[0, 0] == pytest.approx(2 * 1 / 5)
    assert dice_from_stats(_stats(a, a))[0, 0] == 1.0
    assert dice_from_stats(_stats(a, np.zeros_like(a)))[0, 0] == 0.0  # prediction on an empty truth


@pytest.mark.parametrize("rule, expected", [("1", 1.0), ("0", 0.0), ("skip", None)])
def test_empty_prediction_on_empty_truth_follows_the_rule(rule, expected):
    z = np.zeros((3, 3), bool)
    d = dice_from_stats(_stats(z, z), rule)[0, 0]
    assert np.isnan(d) if expected is None else d == expected


def test_summary_means_per_slice_and_pools_globally():
    # slice 0: class 0 perfect (4 px); slice 1: class 0 misses 1 of 1 px; class 1,2 empty everywhere
    stats = np.zeros((2, 3, 3))
    stats[0, 0] = [4, 4, 4]
    stats[1, 0] = [0, 0, 1]
    out = summarise(stats, "1", GI)
    assert out["dice_large_bowel"] == pytest.approx(0.5)
    assert out["global_dice_large_bowel"] == pytest.approx(8 / 9)
    assert out["dice_stomach"] == 1.0
    assert out["dice_mean"] == pytest.approx((0.5 + 1 + 1) / 3)
    skip = summarise(stats, "skip", GI)
    assert skip["dice_large_bowel"] == pytest.approx(0.5) and np.isnan(skip["dice_stomach"])
    assert skip["dice_mean"] == pytest.approx(0.5)


def test_mask_stats_agree_between_numpy_and_torch():
    rng = np.random.default_rng(2)
    pred, truth = rng.random((4, 3, 6, 7)) < 0.4, rng.random((4, 3, 6, 7)) < 0.4
    got = mask_stats(pred, truth)
    assert got.shape == (4, 3, 3)
    np.testing.assert_array_equal(got, mask_stats(torch.from_numpy(pred), torch.from_numpy(truth)).numpy())
    assert got[1, 2, 0] == (pred[1, 2] & truth[1, 2]).sum() and got[1, 2, 2] == truth[1, 2].sum()


def test_a_new_metric_is_one_entry_of_the_table(monkeypatch):
    from giseg.evaluation import metrics

    recall = metrics.Metric("recall", lambda s, empty: s[..., 0] / np.maximum(s[..., 2], 1), pooled=False)
    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS, recall))
    stats = np.zeros((2, 3, 3))
    stats[0, 0] = [1, 2, 4]
    out = metrics.summarise(stats, "1", GI)
    assert out["recall_large_bowel"] == pytest.approx(0.125) and "| recall 0.0417" in metrics.describe(out, GI)


from giseg.evaluation.metrics import competition_score, hausdorff_3d, time_saved


def test_hausdorff_empty_rules():
    z = np.zeros((4, 5, 6), bool)
    one = z.copy()
    one[1, 2, 3] = True
    assert np.isnan(hausdorff_3d(z, z))
    assert hausdorff_3d(one, z) == 1.0 and hausdorff_3d(z, one) == 1.0
    assert hausdorff_3d(one, one) == 0.0


def test_hausdorff_one_voxel_off_along_each_axis_is_normalised_by_axis_size():
    shape = (4, 5, 8)
    for axis in range(3):
        a = np.zeros(shape, bool)
        b = np.zeros(shape, bool)
        a[1, 1, 1] = True
        pos = [1, 1, 1]
        pos[axis] += 1
        b[tuple(pos)] = True
        assert hausdorff_3d(a, b) == pytest.approx((1 / shape[axis]) / np.sqrt(3))


def test_hausdorff_of_a_shifted_cube():
    shape = (10, 20, 20)
    a = np.zeros(shape, bool)
    a[2:5, 4:8, 4:8] = True
    b = np.roll(a, 3, axis=2)  # shifted 3 voxels along W
    assert hausdorff_3d(a, b) == pytest.approx((3 / 20) / np.sqrt(3))


def test_hausdorff_matches_scipy_directed_hausdorff_on_random_volumes():
    from scipy.spatial.distance import directed_hausdorff

    rng = np.random.default_rng(0)
    for _ in range(5):
        shape = tuple(rng.integers(3, 12, size=3))
        a, b = rng.random(shape) < 0.05, rng.random(shape) < 0.05
        a[0, 0, 0] = b[-1, -1, -1] = True
        pa, pb = np.argwhere(a) / np.array(shape), np.argwhere(b) / np.array(shape)
        expected = max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0]) / np.sqrt(3)
        assert hausdorff_3d(a, b) == pytest.approx(expected)


def test_time_saved_counts_only_slices_showing_the_organ():
    dice = np.array([[0.95, 1.0], [0.5, 1.0], [1.0, 0.0], [np.nan, 0.95]])
    present = np.array([[True, False], [True, False], [False, True], [True, True]])
    np.testing.assert_allclose(time_saved(dice, present, 0.9), [1 / 3, 1 / 2])


def test_competition_score_weights():
    assert competition_score(1.0, 0.0) == 1.0
    assert competition_score(0.5, 0.5) == pytest.approx(0.4 * 0.5 + 0.6 * 0.5)


def test_hausdorff_in_mm_uses_the_voxel_spacing_and_skips_a_missing_organ():
    from giseg.evaluation.metrics import hausdorff_mm

    a = np.zeros((4, 10, 12), bool)
    b = np.zeros_like(a)
    a[1, 2, 3] = True
    b[3, 2, 7] = True  # 2 slices and 4 columns away
    assert hausdorff_mm(a, b, (3.0, 1.5, 1.5)) == pytest.approx(np.hypot(2 * 3.0, 4 * 1.5))
    assert hausdorff_mm(a, b, (1.0, 1.0, 1.0)) == pytest.approx(np.hypot(2, 4))
    assert np.isnan(hausdorff_mm(a, np.zeros_like(a), (1.0, 1.0, 1.0)))
