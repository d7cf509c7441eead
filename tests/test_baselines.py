import pytest
import torch

from baselines import BASELINES, build_baseline
from data import GI_CLASSES as GI
from model import SegmentationModel, freeze_unused_parameters, load_model


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


def test_baseline_saves_and_loads_like_a_transformers_model(tmp_path):
    from transformers import AutoModelForSemanticSegmentation

    loaded = load_model("unet", "multiclass", GI)
    assert loaded.family == "gi_unet" and "random weights" in loaded.reinitialised[0]
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
