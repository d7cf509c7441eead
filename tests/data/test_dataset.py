import warnings

import numpy as np
import pytest
import torch

from giseg.data.registry import DATASETS
from giseg.data.augment import train_transform
from giseg.data.cache import build_cache
from giseg.data.gi import build_index
from giseg.data.volumes import neighbour_table
from giseg.data.dataset import SliceDataset


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


def _epoch(ds, workers: int, epoch: int = 0) -> torch.Tensor:
    ds.set_epoch(epoch)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers)
    return torch.cat([b["pixel_values"] for b in dl])


def test_augmentation_is_a_function_of_seed_epoch_and_row_only(cached):
    index, cache = cached
    make = lambda seed=3: SliceDataset(cache, np.arange(16), neighbour_table(index, 1),  # noqa: E731
                                       train_transform(64, seed=0), seed=seed)
    a = _epoch(make(), 0)
    assert torch.equal(a, _epoch(make(), 0))  # repeats
    assert torch.equal(a, _epoch(make(), 2))  # the same with two workers: worker count does not matter
    assert not torch.equal(a, _epoch(make(), 0, epoch=1))  # a new epoch, new augmentations (set in the workers too)
    assert torch.equal(_epoch(make(), 2, epoch=1), _epoch(make(), 0, epoch=1))
    assert not torch.equal(a, _epoch(make(seed=4), 0))
    # one item alone (as after a resume that skips the first batches) equals the same item in the full epoch
    ds = make()
    ds.set_epoch(0)
    assert torch.equal(ds[9]["pixel_values"], a[9])
    # the seed is per row: a row drawn twice in one epoch (no sampler does) would be augmented alike
    same = SliceDataset(cache, np.zeros(16, dtype=int), neighbour_table(index, 1), train_transform(64), seed=3)
    assert torch.equal(_epoch(same, 0)[0], _epoch(same, 0)[1])  # same row, same epoch: same augmentation


def test_the_transforms_of_a_pipeline_draw_independently():
    # albumentations' own set_random_seed seeds every transform alike: two flips at p=0.5 then always cancel
    import albumentations as A

    from giseg.data.dataset import seed_pipeline

    image = np.zeros((8, 8), np.float32)
    image[:, :2] = 1
    two_flips = A.Compose([A.HorizontalFlip(p=0.5), A.HorizontalFlip(p=0.5)])
    net = []
    for seed in range(40):
        seed_pipeline(two_flips, seed)
        net.append(two_flips(image=image)["image"][0, -1] == 1)
    assert 8 <= sum(net) <= 32  # one flip of the two: about half the time (14 of 40 here), never with A's seeding


def test_5_slice_context_stacks_five_neighbours_and_augments_them_together(cached):
    index, cache = cached
    nb = neighbour_table(index, 5, stride=1)
    ds = SliceDataset(cache, np.arange(len(index)), nb, None, (0,) * 5, (1,) * 5)
    px = ds[4]["pixel_values"].numpy()
    assert px.shape == (5, 64, 64)
    for ch, j in enumerate(range(2, 7)):
        np.testing.assert_allclose(px[ch], cache.images[j].astype(np.float32))
    aug = SliceDataset(cache, np.arange(len(index)), nb, train_transform(64, strong=True, seed=0), (0,) * 5, (1,) * 5)
    assert aug[4]["pixel_values"].shape == (5, 64, 64)


def test_organ_free_slices_are_drawn_anew_each_epoch_and_deterministically(cached):
    index, cache = cached
    rows = np.arange(len(index))
    shown = np.array([cache.masks[r].any() for r in rows])
    ds = SliceDataset(cache, rows[shown], neighbour_table(index, 1), None, seed=3, draw_from=rows[~shown], draws=2)
    assert (~shown).sum() > 2 and len(ds) == shown.sum() + 2

    def epoch_rows(epoch):
        ds.set_epoch(epoch)
        return [ds[i]["index"] for i in range(len(ds))]

    first, second = epoch_rows(0), epoch_rows(1)
    assert first[:shown.sum()] == second[:shown.sum()] == list(rows[shown])  # every slice with an organ, each epoch
    assert set(first[shown.sum():]) <= set(rows[~shown]) and len(set(first[shown.sum():])) == 2
    assert first[shown.sum():] != second[shown.sum():] or set(first) != set(second)
    again = SliceDataset(cache, rows[shown], neighbour_table(index, 1), None, seed=3, draw_from=rows[~shown], draws=2)
    again.set_epoch(1)
    assert [again[i]["index"] for i in range(len(again))] == second  # a function of (seed, epoch) alone
