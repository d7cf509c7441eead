import numpy as np
import torch

from giseg.data.masks import classes_present, multiclass_targets, pack_masks, unpack_masks, unpack_targets

GI = ("large_bowel", "small_bowel", "stomach")


def test_pack_unpack_keeps_overlapping_organs():
    rng = np.random.default_rng(0)
    masks = (rng.random((3, 7, 9)) < 0.5).astype(np.uint8)
    assert (masks.sum(0) > 1).any()  # some pixels carry two or three organs
    np.testing.assert_array_equal(unpack_masks(pack_masks(masks), 3), masks)


def test_numpy_and_torch_unpacking_agree():
    packed = np.random.default_rng(1).integers(0, 8, (2, 5, 6), dtype=np.uint8)
    np.testing.assert_array_equal(unpack_targets(torch.from_numpy(packed), 3).numpy(), unpack_masks(packed, 3))


def test_classes_present_reads_each_slices_bits_in_chunks():
    packed = np.zeros((5, 4, 4), np.uint8)
    packed[1, 0, 0] = 1  # class 0
    packed[2, 3, 3] = 4  # class 2
    packed[3, 1, 1], packed[3, 2, 2] = 2, 3  # classes 0 and 1
    got = classes_present(packed, np.array([3, 1, 0, 2]), 3, chunk=3)  # rows out of order, across two chunks
    assert got.tolist() == [[True, True, False], [True, False, False], [False, False, False], [False, False, True]]


def test_unpack_and_multiclass_priority():
    packed = torch.tensor([[[0, 1, 2, 4], [3, 5, 6, 7]]], dtype=torch.uint8)  # bits: lb=1, sb=2, st=4
    ml = unpack_targets(packed, 3)
    assert ml.shape == (1, 3, 2, 4)
    assert ml[0, :, 1, 0].tolist() == [1, 1, 0]  # large and small bowel overlap, both kept
    mc = multiclass_targets(packed, GI, ("stomach", "large_bowel", "small_bowel"))
    # 0 background, 1 large_bowel, 2 small_bowel, 3 stomach; priority stomach > large_bowel > small_bowel
    assert mc[0].tolist() == [[0, 1, 2, 3], [1, 3, 3, 3]]
