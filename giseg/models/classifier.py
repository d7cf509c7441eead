"""Slice classifiers (--task presence): is each class present on this slice? Multi-label image classification.

    python trainer.py --task presence --base_model <image-classification hub id or folder> ...
    python trainer.py --task presence --base_model unet-resnet34 ...     # our CNN encoders with a pooled head

Any ``AutoModelForImageClassification`` family loads (ConvNeXt, Swin, EfficientNet, SegFormer's encoder, BEiT ...;
``giseg make-tiny --family convnext-classifier`` saves a small random one: models/tiny.py), its classifier
re-initialised for our classes with ``problem_type`` multi-label. A CNN baseline name builds that U-Net's encoder with global average
pooling and a linear layer (random weights). The top UW-Madison solutions gated their segmenters with such
classifiers (giseg predict --gate_model; giseg tune chooses the gate's thresholds).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

from giseg.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from giseg.models.baselines import BASELINES, build_encoder
from giseg.models.hub import LoadedModel, loaded_model, read_config, weights_errors
from giseg.models.registry import FAMILIES, IMAGENET
from giseg.models.safe import loading_kwargs
from giseg.models.tasks import PRESENCE
from giseg.utils.errors import UserError

# pretrained with ImageNet's statistics (else (0.5, 0.5)): the registry's families, and hub classifiers of other
# model types that share a registered backbone (ConvNeXt V2) or our CNN encoder
IMAGENET_FAMILIES = (*(f.model_type for f in FAMILIES.values() if f.stats == IMAGENET), "convnextv2", "gi_encoder")


class GIEncoderClassifierConfig(PretrainedConfig):
    model_type = "gi_encoder"

    def __init__(self, encoder: str = "plain", base_channels: int = 32, num_channels: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.encoder, self.base_channels, self.num_channels = encoder, base_channels, num_channels


class GIEncoderClassifier(PreTrainedModel):
    """A CNN baseline's encoder (models/baselines.py), global average pooling of its deepest features, a linear
    layer: (B, C) logits."""
    config_class = GIEncoderClassifierConfig
    base_model_prefix = "classifier_encoder"
    main_input_name = "pixel_values"

    def __init__(self, config: GIEncoderClassifierConfig):
        super().__init__(config)
        self.encoder = build_encoder(config.encoder, config.num_channels, config.base_channels)
        self.classifier = nn.Linear(self.encoder.channels[-1], config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> ImageClassifierOutput:
        return ImageClassifierOutput(logits=self.classifier(self.encoder(pixel_values)[-1].mean((2, 3))))


AutoConfig.register("gi_encoder", GIEncoderClassifierConfig, exist_ok=True)
AutoModelForImageClassification.register(GIEncoderClassifierConfig, GIEncoderClassifier, exist_ok=True)


def load_classifier(base_model: str, classes: tuple[str, ...], allow_bin: bool = False) -> LoadedModel:
    """``base_model`` (an image-classification hub id or folder, or a CNN baseline name) with a fresh multi-label
    classifier for ``classes``."""
    id2label = PRESENCE.labels(classes)
    label2id = {v: k for k, v in id2label.items()}
    if base_model in BASELINES:
        encoder = BASELINES[base_model]
        if encoder == "unext":
            raise UserError("--task presence --base_model unext: UNeXt's encoder has no classifier here; use unet, "
                            "unet-resnet34, unet-resnext50, dense-unet or an image-classification checkpoint")
        model = GIEncoderClassifier(GIEncoderClassifierConfig(encoder=encoder, id2label=id2label, label2id=label2id,
                                                              problem_type="multi_label_classification"))
        return LoadedModel(model, "gi_encoder", [f"all weights ({base_model}'s encoder + pooled linear classifier, "
                                                 "random weights)"], IMAGENET_MEAN, IMAGENET_STD,
                           "ImageNet (a CNN baseline's choice)")
    config = read_config(base_model, allow_bin)
    family = config.model_type
    if family not in (*MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, "gi_encoder"):
        raise UserError(f"--task presence --base_model {base_model!r} is a {family!r} model, which has no image-"
                        "classification class; pass an image-classification checkpoint (ConvNeXt, Swin, "
                        "EfficientNet, SegFormer, BEiT ...; giseg make-tiny --family convnext-classifier) or a CNN "
                        f"baseline ({', '.join(b for b in BASELINES if b != 'unext')})")
    with weights_errors(base_model, allow_bin):
        model, info = AutoModelForImageClassification.from_pretrained(
            base_model, id2label=id2label, label2id=label2id, problem_type="multi_label_classification",
            ignore_mismatched_sizes=True, output_loading_info=True, **loading_kwargs(allow_bin))
    mean, std, source = ((IMAGENET_MEAN, IMAGENET_STD, "ImageNet") if family in IMAGENET_FAMILIES
                         else ((0.5,) * 3, (0.5,) * 3, f"the {family} family's"))
    return loaded_model(model, family, info, base_model, mean, std, source)
