"""Slice classifiers (--task presence): every image-classification family and our CNN encoders load with a fresh
multi-label head for our classes, through the same safe loading path."""
import pytest
import torch

from giseg.models.load import load_model
from giseg.models.registry import list_families
from giseg.models.tiny import make_tiny
from giseg.models.wrapper import SegmentationModel, freeze_unused_parameters
from giseg.utils.errors import UserError

CLASSES = ("large_bowel", "small_bowel", "stomach")


@pytest.mark.parametrize("family", list_families("classifier", tiny=True))
def test_each_tiny_classifier_family_gets_a_multilabel_head_for_our_classes_and_widens_for_2_5d(family, tmp_path):
    folder = make_tiny(family, tmp_path / family)
    for channels in (3, 5):
        loaded = load_model(str(folder), "presence", CLASSES, in_channels=channels)
        assert loaded.model.config.problem_type == "multi_label_classification"
        assert list(loaded.model.config.id2label.values()) == list(CLASSES)
        assert any(line.startswith("classifier.weight") for line in loaded.reinitialised)  # 1000 labels -> 3
        assert len(loaded.mean) == channels
        model = SegmentationModel(loaded.model)
        assert freeze_unused_parameters(model) == []
        logits, aux = model(torch.zeros(2, channels, 96, 96))
        assert logits.shape == (2, 3) and aux is None


def test_a_cnn_baseline_encoder_classifier_saves_and_loads_with_the_auto_class(tmp_path):
    from transformers import AutoModelForImageClassification

    loaded = load_model("unet", "presence", CLASSES)
    x = torch.randn(2, 3, 64, 64)
    loaded.model.eval()
    before = loaded.model(pixel_values=x).logits
    loaded.model.save_pretrained(tmp_path / "m")
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "m", trust_remote_code=False).eval()
    assert torch.equal(again(pixel_values=x).logits, before)


def test_a_segmentation_only_family_or_unext_is_refused_for_presence_with_what_to_pass(tmp_path):
    folder = make_tiny("upernet", tmp_path / "upernet")
    with pytest.raises(UserError, match="has no image-classification class; pass an image-classification checkpoint"):
        load_model(str(folder), "presence", CLASSES)
    with pytest.raises(UserError, match="UNeXt's encoder has no classifier here"):
        load_model("unext", "presence", CLASSES)
