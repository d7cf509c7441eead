import os

import numpy as np

from adapters import DATASETS
from cache import build_cache
from data import build_index

GI = DATASETS["gi"]


def test_cache_holds_resized_scans_and_masks_and_is_reused(demo_dir, tmp_path):
    index = build_index(demo_dir)
    cache = build_cache(GI, index, 64, tmp_path)
    assert cache.images.shape == (len(index), 64, 64) and cache.images.dtype == np.float16
    assert cache.masks.shape == (len(index), 64, 64) and cache.masks.dtype == np.uint8
    assert 0.0 <= float(cache.images.min()) and float(cache.images.max()) <= 1.0
    # every slice with an organ keeps it after resizing; empty slices stay empty
    has_organ = np.array([GI.read_masks(r).any() for r in index.itertuples()])
    np.testing.assert_array_equal(cache.masks.reshape(len(index), -1).any(1), has_organ)
    assert (cache.masks >= 3).any()  # overlap of two organs survives (bits 0 and 1, or more)
    again = build_cache(GI, index, 64, tmp_path)
    assert again.path == cache.path and len(os.listdir(tmp_path)) == 1


def test_cache_is_rebuilt_when_size_or_labels_change(demo_dir, tmp_path):
    index = build_index(demo_dir)
    a = build_cache(GI, index, 64, tmp_path).path
    b = build_cache(GI, index, 96, tmp_path).path
    changed = index.copy()
    changed.loc[0, "rle_stomach"] = "1 5"
    c = build_cache(GI, changed, 64, tmp_path)
    assert len({a, b, c.path}) == 3
    assert c.masks[0].any()
