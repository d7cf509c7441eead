import pytest
import torch

from giseg.models.baselines import BASELINES, build_baseline
from giseg.data.gi import GI_CLASSES as GI
from giseg.models.wrapper import SegmentationModel, freeze_unused_parameters
from giseg.models.load import load_model


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_forward_backward_at_input_size(name):
    torch.manual_seed(0)
    model = SegmentationModel(build_baseline(name, {0: "large_bowel", 1: "small_bowel", 2: "stomach"}, 8
                                             if name in ("unet", "dense-unet") else 32))
    assert not freeze_unused_parameters(model)  # every weight is used: DDP-safe without a search
    logits, aux = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3, 64, 64) and aux is None
    logits.mean().backward()


def test_resnet_encoders_match_the_reference_sizes():
    # segmentation_models_pytorch's Unet(resnet34) has 24.4M parameters and Unet(resnext50_32x4d) 32.0M
    n34 = sum(p.numel() for p in build_baseline("unet-resnet34", {0: "a", 1: "b", 2: "c"}).parameters())
    n50 = sum(p.numel() for p in build_baseline("unet-resnext50", {0: "a", 1: "b", 2: "c"}).parameters())
    assert 24.0e6 < n34 < 24.9e6 and 31.5e6 < n50 < 32.5e6


@pytest.mark.parametrize("name, family", [("unet", "gi_unet"), ("unext", "gi_unext")])
def test_baseline_saves_and_loads_like_a_transformers_model(tmp_path, name, family):
    from transformers import AutoModelForSemanticSegmentation

    loaded = load_model(name, "multiclass", GI)
    assert loaded.family == family and "random weights" in loaded.reinitialised[0]
    loaded.model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    again = AutoModelForSemanticSegmentation.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 32, 32)
    loaded.model.eval()
    again.eval()
    torch.testing.assert_close(again(pixel_values=x).logits, loaded.model(pixel_values=x).logits)
    assert again.config.id2label[0] == "background"
    relabelled = load_model(str(tmp_path), "multilabel", GI)  # a saved baseline fine-tunes like any checkpoint
    assert relabelled.model.config.num_labels == 3


def test_unext_has_the_papers_size_and_cost_and_keeps_the_input_size():
    from torch.utils.flop_counter import FlopCounterMode

    model = build_baseline("unext", {0: "large_bowel", 1: "small_bowel", 2: "stomach"}).eval()
    # the paper: 1.47M parameters and 0.57 G(MAC) at 256 x 256 (its head has 1 class; ours 3: 34 more weights)
    assert sum(p.numel() for p in model.parameters()) == 1_471_921 + 2 * 17
    x = torch.randn(1, 3, 256, 256)
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        logits = model(pixel_values=x).logits
    assert logits.shape == (1, 3, 256, 256)
    assert abs(flops.get_total_flops() / 2e9 - 0.562) < 0.005  # multiply-accumulates, as the paper counts
    assert model.config.model_type == "gi_unext"


def test_unext_shift_moves_each_channel_group_by_its_own_offset():
    from giseg.models.unext import shift

    x = torch.zeros(1, 5, 7, 7)
    x[:, :, 3, 3] = 1  # one pixel in each of 5 groups of one channel
    moved = shift(x, 5, 2)  # along the height: group g by g - 2, zeros coming in
    assert [int(moved[0, g, :, 3].argmax()) for g in range(5)] == [1, 2, 3, 4, 5]
    assert moved.sum() == 5 and torch.equal(shift(x, 5, 3)[0, :, 3, :].argmax(1), torch.tensor([1, 2, 3, 4, 5]))
