"""Small random models of the real architectures (150 ADE-like labels), saved like hub checkpoints.

They stand in for hub ids where there is no network: the tests and the demo fine-tune them through the same
``from_pretrained`` path as a real checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BeitConfig,
    ConvNextConfig,
    DPTConfig,
    EfficientNetConfig,
    Mask2FormerConfig,
    SegformerConfig,
    SwinConfig,
    UperNetConfig,
)

from giseg.models.families import auto_class, make_image_processor
from giseg.models.registry import FAMILIES, list_families
from giseg.models.volume import require_monai
from giseg.utils.claims import claim_output_dir, write_output_mark
from giseg.utils.errors import UserError
from giseg.utils.files import atomic_dir

ADE_LIKE_LABELS = {i: f"ade_class_{i}" for i in range(150)}


def tiny_segformer(id2label: dict, width: int = 1):
    return SegformerConfig(hidden_sizes=[16 * width, 32 * width, 80 * width, 128 * width], depths=[1, 1, 1, 1],
                           num_attention_heads=[1, 2, 5, 8], decoder_hidden_size=64 * width, id2label=id2label)


def tiny_upernet(id2label: dict, width: int = 1):
    backbone = ConvNextConfig(hidden_sizes=[16 * width, 32 * width, 64 * width, 128 * width], depths=[1, 1, 2, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    return UperNetConfig(backbone_config=backbone, hidden_size=64 * width, auxiliary_channels=32 * width,
                         use_auxiliary_head=True, id2label=id2label)


def tiny_dpt(id2label: dict, width: int = 1):
    return DPTConfig(hidden_size=64 * width, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128 * width,
                     image_size=128, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                     neck_hidden_sizes=[16 * width, 32 * width, 64 * width, 64 * width], fusion_hidden_size=32 * width,
                     use_auxiliary_head=True, id2label=id2label)


def tiny_beit(id2label: dict, width: int = 1):
    return BeitConfig(hidden_size=64 * width, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128 * width,
                      image_size=128, patch_size=16, out_indices=[0, 1, 2, 3], use_relative_position_bias=True,
                      use_auxiliary_head=True, pool_scales=[1, 2, 3, 6], auxiliary_channels=32 * width,
                      id2label=id2label)


def tiny_mask2former(id2label: dict, width: int = 1):
    backbone = SwinConfig(image_size=128, patch_size=4, embed_dim=16 * width, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 2, 2], window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerConfig(backbone_config=backbone, hidden_dim=32 * width, mask_feature_size=32 * width,
                             feature_size=32 * width, num_queries=16, encoder_layers=1, decoder_layers=3,
                             num_attention_heads=2, dim_feedforward=64 * width, encoder_feedforward_dim=64 * width,
                             train_num_points=1024, id2label=id2label)


def tiny_convnext(id2label: dict, width: int = 1):
    return ConvNextConfig(hidden_sizes=[16 * width, 32 * width, 64 * width, 128 * width], depths=[1, 1, 2, 1],
                          id2label=id2label)


def tiny_swin(id2label: dict, width: int = 1):
    return SwinConfig(image_size=128, patch_size=4, embed_dim=16 * width, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                      window_size=2, id2label=id2label)  # (a window of 4 fails in stages smaller than it)


def tiny_efficientnet(id2label: dict, width: int = 1):
    return EfficientNetConfig(image_size=128, width_coefficient=0.25 * width, depth_coefficient=0.25,
                              hidden_dim=320 * width, id2label=id2label)  # (= the top conv: 1280 x width)


def make_tiny(family: str, out_dir: str | Path, width: int = 1, seed: int = 0) -> Path:
    """Save a randomly initialised model of ``family`` with 150 ADE-like labels (so loading it for our classes
    exercises the head replacement) plus its image processor, with ``save_pretrained``."""
    spec = FAMILIES.get(family)
    if spec is None or not spec.tiny:
        raise UserError(f"unknown --family {family!r}; choose from {list_families(tiny=True)}")
    torch.manual_seed(seed)
    if spec.kind == "classifier":  # an image classifier with 1000 ImageNet-like labels (--task presence)
        from transformers import AutoModelForImageClassification

        config = spec.tiny_config({i: f"imagenet_class_{i}" for i in range(1000)}, width)
        config.label2id = {v: k for k, v in config.id2label.items()}
        model = AutoModelForImageClassification.from_config(config)
    else:
        if spec.kind == "volume":
            require_monai(f"--family {family}")
        config = spec.tiny_config(ADE_LIKE_LABELS, width)
        config.label2id = {v: k for k, v in config.id2label.items()}
        model = auto_class(config.model_type).from_config(config)
    out = claim_output_dir(out_dir, "--out", "make-tiny", create=False,
                           ours=lambda p: (p / "config.json").is_file() and not (p / "inference_spec.json").exists())
    with atomic_dir(out) as tmp:
        write_output_mark(tmp, "make-tiny")
        model.save_pretrained(tmp)
        mean, std = spec.stats
        make_image_processor(512, mean, std).save_pretrained(tmp)
    return out
