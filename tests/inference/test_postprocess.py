import numpy as np

from giseg.inference.postprocess import drop_small_components, gate, largest_component, masks_from_probabilities, postprocess_volume, valid_rule


def test_largest_component_keeps_the_biggest_3d_blob_and_nothing_else():
    v = np.zeros((4, 8, 8), bool)
    v[0:3, 1:4, 1:4] = True  # 27 voxels across three slices
    v[3, 6:8, 6:8] = True  # 4 voxels, not touching
    out = largest_component(v)
    assert out.sum() == 27 and out[0:3, 1:4, 1:4].all() and not out[3].any()
    assert np.array_equal(largest_component(np.zeros_like(v)), np.zeros_like(v))


def test_post_processing_applies_each_classes_rule_to_its_own_channel():
    m = np.zeros((2, 2, 6, 6), bool)
    m[:, :, 0, 0] = True
    m[:, :, 3:6, 3:6] = True
    out = postprocess_volume(m, ("largest", "none"))
    assert not out[:, 0, 0, 0].any() and out[:, 0, 3:6, 3:6].all()
    assert np.array_equal(out[:, 1], m[:, 1])


def test_gates_drop_a_class_from_a_slice_only_below_its_area_or_peak_probability():
    probs = np.zeros((2, 2, 10, 10), np.float32)  # (slices, classes, H, W)
    probs[0, 0, :2, :2] = 0.9  # 4 % of the slice, confident
    probs[1, 0, :5, :5] = 0.55  # 25 %, unsure
    probs[:, 1, :5, :] = 0.8
    masks = probs > 0.5
    kept = gate(masks, probs, min_area=(0.05, 0.0), min_prob=(0.0, 0.0))
    assert not kept[0, 0].any() and kept[1, 0].sum() == 25 and np.array_equal(kept[:, 1], masks[:, 1])
    kept = gate(masks, probs, min_area=(0.0, 0.0), min_prob=(0.6, 0.0))
    assert kept[0, 0].sum() == 4 and not kept[1, 0].any()
    assert gate(masks, probs, (0.0, 0.0), (0.0, 0.0)) is masks  # zero gates: nothing to do


def test_multiclass_masks_are_the_argmax_over_background_and_classes():
    p = np.zeros((3, 1, 2), np.float32)  # background, class 1, class 2
    p[:, 0, 0] = (0.2, 0.7, 0.1)
    p[:, 0, 1] = (0.5, 0.2, 0.3)
    m = masks_from_probabilities(p, "multiclass", ())
    assert m.shape == (2, 1, 2) and m[0, 0, 0] and not m[1, 0, 0] and not m[:, 0, 1].any()
    assert np.array_equal(masks_from_probabilities(p[1:], "multilabel", (0.5, 0.25)), p[1:] > np.array([0.5, 0.25])
                          .reshape(-1, 1, 1))


def test_small_components_are_dropped_below_the_voxel_count_and_the_rest_kept():
    v = np.zeros((4, 8, 8), bool)
    v[0:3, 1:4, 1:4] = True  # 27 voxels
    v[3, 6:8, 6:8] = True  # 4 voxels
    v[0, 6, 0] = True  # 1 voxel
    expected = v.copy()
    expected[0, 6, 0] = False
    assert np.array_equal(drop_small_components(v, 2), expected)  # only the single voxel goes
    assert drop_small_components(v, 5).sum() == 27 and drop_small_components(v, 28).sum() == 0
    out = postprocess_volume(v[:, None], ("min:5",))
    assert out.sum() == 27
    assert valid_rule("min:100") and valid_rule("largest") and not valid_rule("min:0") and not valid_rule("min:x")
