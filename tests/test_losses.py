import torch

from losses import SegmentationLoss, soft_dice_loss, upsample_like


def test_loss_is_small_for_confident_correct_logits_and_large_for_wrong_ones():
    packed = torch.zeros(2, 8, 8, dtype=torch.uint8)
    packed[:, 2:5, 2:5] = 1 | 2  # large and small bowel overlap
    target = torch.stack([((packed >> c) & 1).float() for c in range(3)], 1)
    good = (target * 2 - 1) * 20
    loss = SegmentationLoss("multilabel")
    assert loss(good, packed) < 0.05
    assert loss(-good, packed) > 1.5


def test_multiclass_loss_prefers_the_priority_label():
    packed = torch.zeros(1, 4, 4, dtype=torch.uint8)
    packed[0, :2] = 4  # stomach
    logits = torch.full((1, 4, 4, 4), -10.0)
    logits[0, 0, 2:] = 10
    logits[0, 3, :2] = 10
    assert SegmentationLoss("multiclass")(logits, packed) < 0.05


def test_soft_dice_loss_bounds_and_upsampling():
    t = torch.ones(1, 1, 4, 4)
    assert soft_dice_loss(t, t) == 0
    assert soft_dice_loss(torch.zeros_like(t), t, smooth=0) == 1
    assert upsample_like(torch.randn(1, 3, 4, 4), (16, 16)).shape == (1, 3, 16, 16)
