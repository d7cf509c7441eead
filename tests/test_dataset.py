import warnings

import numpy as np
import pytest
import torch

from adapters import DATASETS
from augment import train_transform
from cache import build_cache
from data import build_index, neighbour_table
from dataset import SliceDataset


@pytest.fixture(scope="module")
def cached(demo_dir, tmp_path_factory):
    index = build_index(demo_dir)
    return index, build_cache(DATASETS["gi"], index, 64, tmp_path_factory.mktemp("cache"))


def test_item_shapes_and_plain_mode_repeats_the_slice(cached):
    index, cache = cached
    ds = SliceDataset(cache, np.arange(len(index)), neighbour_table(index, 1), None, (0, 0, 0), (1, 1, 1))
    item = ds[3]
    assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].dtype == torch.float32
    assert item["mask"].shape == (64, 64) and item["mask"].dtype == torch.uint8
    px = item["pixel_values"]
    assert torch.equal(px[0], px[1]) and torch.equal(px[1], px[2])
    np.testing.assert_allclose(px[0].numpy(), cache.images[3].astype(np.float32))


def test_25d_mode_stacks_neighbouring_slices(cached):
    index, cache = cached
    nb = neighbour_table(index, 3, stride=1)
    ds = SliceDataset(cache, np.arange(len(index)), nb, None, (0, 0, 0), (1, 1, 1))
    i = 4  # inside the first volume
    px = ds[i]["pixel_values"].numpy()
    for ch, j in enumerate((i - 1, i, i + 1)):
        np.testing.assert_allclose(px[ch], cache.images[j].astype(np.float32))


def test_normalisation_uses_the_model_statistics(cached):
    index, cache = cached
    ds = SliceDataset(cache, np.arange(len(index)), neighbour_table(index, 1), None, (0.5, 0.5, 0.5), (0.25,) * 3)
    np.testing.assert_allclose(ds[0]["pixel_values"][0].numpy(), (cache.images[0].astype(np.float32) - 0.5) / 0.25,
                               rtol=1e-6)


@pytest.mark.parametrize("strong", [False, True])
def test_augmentation_keeps_packed_mask_values_and_warns_nothing(cached, strong):
    index, cache = cached
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warnings from albumentations 2.x argument names
        tf = train_transform(64, strong=strong)
        ds = SliceDataset(cache, np.arange(len(index)), neighbour_table(index, 1), tf)
        for i in range(len(index)):
            m = ds[i]["mask"].numpy()
            assert set(np.unique(m)) <= set(np.unique(cache.masks))  # nearest neighbour: no blended bit patterns


def _epoch(ds, workers: int, seed: int) -> torch.Tensor:
    from dataset import seed_worker

    torch.manual_seed(seed)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers, worker_init_fn=seed_worker)
    return torch.cat([b["pixel_values"] for b in dl])


def test_augmentation_repeats_for_a_seed_and_differs_between_workers(cached):
    index, cache = cached
    make = lambda: SliceDataset(cache, np.arange(16), neighbour_table(index, 1), train_transform(64, seed=3))  # noqa: E731
    assert torch.equal(_epoch(make(), 0, 0), _epoch(make(), 0, 0))  # single process: the pipeline's own seed
    a, b = _epoch(make(), 2, 0), _epoch(make(), 2, 0)
    assert torch.equal(a, b)  # two workers: seeded from torch's seed
    assert not torch.equal(a, _epoch(make(), 2, 1))
    # the two workers do not replay one stream: same samples, seeded alike, would match
    same = SliceDataset(cache, np.zeros(16, dtype=int), neighbour_table(index, 1), train_transform(64, seed=3))
    batches = _epoch(same, 2, 0).view(4, 4, *a.shape[1:])
    assert not torch.equal(batches[0], batches[1])
