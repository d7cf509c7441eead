"""CutMix and MixUp of training batches: images and masks alike, seeded, soft targets for MixUp, exact resumes."""
import json

import pytest
import torch

from giseg.training.config import TrainConfig
from giseg.training.losses import make_loss, tversky_loss
from giseg.training.mixing import BatchMixer
from giseg.training.loop import train

GI = ("large_bowel", "small_bowel", "stomach")


def batch(n=4, size=16):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(n, 3, size, size, generator=g)
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    for i in range(n):
        masks[i, 2 + i:8 + i, 3:9] = 1 << (i % 3)
    return pixels, masks


def test_no_mixing_leaves_the_batch_alone_and_draws_depend_on_epoch_batch_and_process_only():
    pixels, masks = batch()
    p, m, mix = BatchMixer(0.0, 0.0, 1.0, seed=3)(pixels, masks, epoch=0, batch=0)
    assert p is pixels and m is masks and mix is None
    mixer = BatchMixer(0.4, 0.4, 1.0, seed=3)
    draws = [mixer.draw(e, b, r, 4, (16, 16)) for e, b, r in ((0, 0, 0), (0, 1, 0), (1, 0, 0), (0, 0, 1))]
    again = mixer.draw(0, 0, 0, 4, (16, 16))
    assert again[0] == draws[0][0] and (again[1] == draws[0][1]).all() and again[2] == draws[0][2]
    assert len({(d[0], tuple(d[1]), d[2]) for d in draws}) == 4
    kinds = [mixer.draw(0, b, 0, 4, (16, 16))[0] for b in range(400)]
    assert 0.3 < kinds.count("cutmix") / 400 < 0.5 and 0.3 < kinds.count("mixup") / 400 < 0.5


def test_cutmix_pastes_one_box_of_a_partner_into_images_and_masks_alike():
    pixels, masks = batch()
    mixer = BatchMixer(1.0, 0.0, 1.0, seed=0)
    kind, perm, lam, (y0, y1, x0, x1) = mixer.draw(2, 5, 0, 4, (16, 16))
    p, m, mix = mixer(pixels, masks, epoch=2, batch=5)
    assert kind == "cutmix" and mix is None and 0 < (y1 - y0) * (x1 - x0) < 256
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    for i, j in enumerate(perm):
        assert torch.equal(p[i][:, inside], pixels[j][:, inside]) and torch.equal(m[i][inside], masks[j][inside])
        assert torch.equal(p[i][:, ~inside], pixels[i][:, ~inside]) and torch.equal(m[i][~inside], masks[i][~inside])
    assert m.dtype == torch.uint8  # hard masks: the packed bits of one slice or the other


def test_mixup_blends_images_and_the_loss_takes_the_blended_masks_as_soft_targets():
    pixels, masks = batch()
    mixer = BatchMixer(0.0, 1.0, 0.4, seed=0)
    _, perm, lam, _ = mixer.draw(0, 0, 0, 4, (16, 16))
    p, m, (partner, got_lam) = mixer(pixels, masks, epoch=0, batch=0)
    assert got_lam == lam and torch.equal(m, masks) and torch.equal(partner, masks[torch.as_tensor(perm)])
    assert torch.allclose(p, lam * pixels + (1 - lam) * pixels[torch.as_tensor(perm)])
    logits = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    own = torch.stack([((masks >> c) & 1).float() for c in range(3)], 1)
    other = torch.stack([((partner >> c) & 1).float() for c in range(3)], 1)
    soft = lam * own + (1 - lam) * other
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits, soft) + tversky_loss(
        torch.sigmoid(logits), soft, 0.5, 0.5)
    got = make_loss("bce_dice", "multilabel", GI)(logits, masks, (partner, lam))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def _cfg(demo_dir, model, out, tmp_path, **kw):
    return TrainConfig(**{**dict(base_model=str(model), data_dir=str(demo_dir), output_dir=str(out), image_size=64,
                                 epochs=2, train_batch_size=8, lr=2e-3, num_workers=0, n_folds=3, log_every=2,
                                 cache_dir=str(tmp_path / "cache"), cutmix_prob=0.5, mixup_prob=0.5,
                                 scheduler_name="constant"), **kw})


def test_a_mixed_run_trains_and_a_resumed_one_replays_the_same_mixes(demo_dir, tiny_models, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(_cfg(demo_dir, tiny_models["segformer"], whole, tmp_path))
    assert "batch mixing: CutMix with probability 0.5, else MixUp with probability 0.5" in (
        whole / "train.log").read_text()
    train(_cfg(demo_dir, tiny_models["segformer"], split, tmp_path, max_train_steps=5, save_every_steps=3))
    train(_cfg(demo_dir, tiny_models["segformer"], split, tmp_path, resume_from_checkpoint="latest"))
    first = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    rows = {r["step"]: r for r in map(json.loads, (split / "metrics.jsonl").read_text().splitlines())}
    for r in first:
        assert rows[r["step"]]["val_loss"] == pytest.approx(r["val_loss"], abs=1e-9)
    plain = tmp_path / "plain"  # the mixing changed the training
    train(_cfg(demo_dir, tiny_models["segformer"], plain, tmp_path, cutmix_prob=0.0, mixup_prob=0.0))
    last = json.loads((plain / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val_loss"] != pytest.approx(first[-1]["val_loss"], abs=1e-9)


def test_mixing_probabilities_out_of_range_are_refused_by_name():
    from giseg.training.config import validate_config
    from giseg.utils.errors import UserError

    with pytest.raises(UserError, match="add up to at most 1"):
        validate_config(TrainConfig(cutmix_prob=0.7, mixup_prob=0.5))
    with pytest.raises(UserError, match="--mix_alpha must be > 0"):
        validate_config(TrainConfig(mix_alpha=0))
