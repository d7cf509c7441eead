import torch

from giseg.training.losses import make_loss, tversky_loss
from giseg.inference.segmenter import upsample_like

GI = ("large_bowel", "small_bowel", "stomach")
PRIORITY = ("stomach", "large_bowel", "small_bowel")


def soft_dice_loss(probs, targets, smooth=1.0):
    return tversky_loss(probs, targets, 0.5, 0.5, smooth)  # Tversky with alpha = beta = 0.5 is the soft Dice


def test_loss_is_small_for_confident_correct_logits_and_large_for_wrong_ones():
    packed = torch.zeros(2, 8, 8, dtype=torch.uint8)
    packed[:, 2:5, 2:5] = 1 | 2  # large and small bowel overlap
    target = torch.stack([((packed >> c) & 1).float() for c in range(3)], 1)
    good = (target * 2 - 1) * 20
    loss = make_loss("bce_dice", "multilabel", GI)
    assert loss(good, packed) < 0.05
    assert loss(-good, packed) > 1.5


def test_multiclass_loss_prefers_the_priority_label():
    packed = torch.zeros(1, 4, 4, dtype=torch.uint8)
    packed[0, :2] = 4  # stomach
    logits = torch.full((1, 4, 4, 4), -10.0)
    logits[0, 0, 2:] = 10
    logits[0, 3, :2] = 10
    assert make_loss("bce_dice", "multiclass", GI, PRIORITY)(logits, packed) < 0.05


def test_soft_dice_loss_bounds_and_upsampling():
    t = torch.ones(1, 1, 4, 4)
    assert soft_dice_loss(t, t) == 0
    assert soft_dice_loss(torch.zeros_like(t), t, smooth=0) == 1
    assert upsample_like(torch.randn(1, 3, 4, 4), (16, 16)).shape == (1, 3, 16, 16)


import pytest  # noqa: E402

from giseg.training.losses import LOSSES, focal_loss, lovasz_hinge


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_prefers_the_right_answer(task, name):
    if task not in LOSSES[name].tasks:
        with pytest.raises(ValueError, match="multilabel"):
            make_loss(name, task, GI, PRIORITY)
        return
    packed = torch.zeros(2, 8, 8, dtype=torch.uint8)
    packed[:, 2:5, 2:5] = 4
    packed[:, 5:7, 1:7] = 1
    if task == "multilabel":
        target = torch.stack([((packed >> c) & 1).float() for c in range(3)], 1)
        good = (target * 2 - 1) * 8
    else:
        from giseg.data.masks import multiclass_targets

        good = torch.nn.functional.one_hot(multiclass_targets(packed, GI, PRIORITY), 4).permute(0, 3, 1, 2).float() * 16 - 8
    loss = make_loss(name, task, GI, PRIORITY)
    right, wrong = loss(good, packed), loss(-good, packed)
    assert torch.isfinite(right) and right < wrong


def test_tversky_weights_false_negatives_with_beta():
    t = torch.zeros(1, 1, 4, 4)
    t[..., :2, :] = 1
    miss = torch.zeros_like(t)  # all false negatives
    assert tversky_loss(miss, t, alpha=0.3, beta=0.7, smooth=0) == 1
    half = t.clone()
    half[..., 1, :] = 0  # half missed
    assert tversky_loss(half, t, 0.3, 0.7, smooth=0) > tversky_loss(half, t, 0.7, 0.3, smooth=0)


def test_focal_loss_down_weights_easy_pixels():
    t = torch.ones(1, 1, 2, 2)
    easy, hard = torch.full_like(t, 4.0), torch.full_like(t, -1.0)
    assert focal_loss(easy, t) < 0.01 * focal_loss(hard, t)


def test_unlabelled_pixels_count_in_no_loss_term_and_labelled_data_gets_the_plain_loss():
    import pytest

    from giseg.data.masks import IGNORE_BIT

    torch.manual_seed(0)
    packed = torch.randint(0, 8, (2, 8, 8), dtype=torch.uint8)
    ignored = torch.zeros_like(packed, dtype=torch.bool)
    ignored[:, :3] = True
    marked = packed | (ignored.to(torch.uint8) << IGNORE_BIT)
    for task, channels in (("multilabel", 3), ("multiclass", 4)):
        for recipe in ("bce_dice", "focal", "tversky"):
            loss = make_loss(recipe, task, GI, PRIORITY, unlabelled=True)
            logits = torch.randn(2, channels, 8, 8)
            changed = logits.clone()
            changed[:, :, :3] = torch.randn(2, channels, 3, 8) * 50  # anything, where unlabelled
            assert loss(logits, marked) == pytest.approx(float(loss(changed, marked)), abs=1e-6), (task, recipe)
            assert loss(logits, marked) != pytest.approx(float(loss(logits, packed)), abs=1e-4)
    # a dataset without unlabelled pixels gets the plain BCE mean + soft Dice, bit for bit; so does the masked
    # loss on a batch whose pixels are all labelled, up to the order of the sums
    logits = torch.randn(2, 3, 8, 8)
    targets = torch.stack([((packed >> c) & 1).float() for c in range(3)], 1)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets) + \
        soft_dice_loss(torch.sigmoid(logits), targets)
    assert float(make_loss("bce_dice", "multilabel", GI)(logits, packed)) == float(plain)
    masked = make_loss("bce_dice", "multilabel", GI, unlabelled=True)(logits, packed)
    assert masked == pytest.approx(float(plain), abs=1e-6)


def test_dice_absent_skip_leaves_classes_absent_from_the_batch_out_of_the_overlap_term():
    """--dice_absent count (default): a class with no pixel in the batch scores best with nothing predicted, so a
    prediction of it costs; skip: it adds nothing, and the present class's term is the same as alone."""
    from giseg.training.losses import tversky_loss

    targets = torch.zeros(2, 2, 4, 4)
    targets[:, 0, :2, :2] = 1  # class 0 present, class 1 absent from the whole batch
    probs = torch.full_like(targets, 0.3)
    counted = tversky_loss(probs, targets, 0.5, 0.5, absent="count")
    skipped = tversky_loss(probs, targets, 0.5, 0.5, absent="skip")
    alone = tversky_loss(probs[:, :1], targets[:, :1], 0.5, 0.5)
    assert skipped == pytest.approx(alone.item()) and counted > skipped
    assert tversky_loss(probs, torch.zeros_like(targets), 0.5, 0.5, absent="skip") == 0  # no class in the batch


def test_lovasz_hinge_is_the_hand_computed_value_on_four_pixels():
    # errors 1 - logit * sign: [-1, 0, 1.5, 3]; sorted [3, 1.5, 0, -1] with labels [1, 0, 0, 1]; Jaccard losses of
    # the prefixes [1/2, 2/3, 3/4, 1], their differences [1/2, 1/6, 1/12, 1/4]; relu(errors) . grad = 1.5 + 0.25
    logits = torch.tensor([2.0, -1.0, 0.5, -2.0]).view(1, 1, 2, 2)
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2)
    assert lovasz_hinge(logits, labels).item() == pytest.approx(1.75)


def reference_lovasz(logits, labels):
    """Berman et al.'s lovasz_hinge(per_image=True), written out pair by pair."""
    losses = []
    for lg, lb in zip(logits.reshape(-1, logits.shape[-2] * logits.shape[-1]),
                      labels.reshape(-1, labels.shape[-2] * labels.shape[-1])):
        errors = 1 - lg * (2 * lb - 1)
        errors_sorted, perm = torch.sort(errors, descending=True)
        gt = lb[perm]
        gts = gt.sum()
        jaccard = 1 - (gts - gt.cumsum(0)) / (gts + (1 - gt).cumsum(0))
        jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
        losses.append(torch.dot(torch.relu(errors_sorted), jaccard))
    return torch.stack(losses).mean()


def test_lovasz_hinge_matches_the_per_pair_reference_and_leaves_unlabelled_pixels_out():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 6, 5, generator=g) * 3
    labels = (torch.rand(3, 2, 6, 5, generator=g) > 0.6).float()
    labels[1, 1] = 0  # a pair with no pixel of its class
    assert lovasz_hinge(logits, labels).item() == pytest.approx(reference_lovasz(logits, labels).item(), rel=1e-6)
    valid = torch.ones(3, 1, 6, 5, dtype=torch.bool)
    valid[:, :, :, 3:] = False  # the last two columns unlabelled: the loss is that of the first three
    assert lovasz_hinge(logits, labels, valid).item() == pytest.approx(
        reference_lovasz(logits[..., :3], labels[..., :3]).item(), rel=1e-6)


def test_bce_dice_lovasz_adds_the_weighted_hinge_to_bce_dice():
    packed = torch.zeros(2, 8, 8, dtype=torch.uint8)
    packed[:, 2:5, 2:5] = 1 | 4
    logits = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    target = torch.stack([((packed >> c) & 1).float() for c in range(3)], 1)
    mixed = make_loss("bce_dice_lovasz", "multilabel", GI, lovasz_weight=0.5)(logits, packed)
    plain = make_loss("bce_dice", "multilabel", GI)(logits, packed)
    assert mixed.item() == pytest.approx(plain.item() + 0.5 * lovasz_hinge(logits, target).item(), rel=1e-6)
    assert make_loss("lovasz", "multilabel", GI)(logits, packed).item() == pytest.approx(
        lovasz_hinge(logits, target).item())
    mixed.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_a_lovasz_loss_with_a_multiclass_task_is_refused_by_name():
    from giseg.training.config import TrainConfig, validate_config
    from giseg.utils.errors import UserError

    with pytest.raises(UserError, match="--loss lovasz: defined for --task multilabel, not multiclass"):
        validate_config(TrainConfig(loss="lovasz", task="multiclass"))


@pytest.mark.parametrize("name", LOSSES)
def test_every_registered_loss_is_a_module_of_its_own_and_a_documented_choice_of_the_flag(name):
    """A recipe is one module and one registry line: --loss offers it, with its docstring as its help."""
    import inspect

    from giseg.training.config import build_parser

    cls = LOSSES[name]
    assert cls.name == name and inspect.getmodule(cls).__name__ == f"giseg.training.losses.{name}"
    action = next(a for a in build_parser()._actions if "--loss" in a.option_strings)
    assert name in action.choices and " ".join(cls.__doc__.split()) in " ".join(action.help.split())
