"""Pretrained Hugging Face segmentation models with a new head for our classes.

    python model.py make-tiny --family segformer --out demo/models/tiny-segformer

``load_model`` calls ``AutoModelForSemanticSegmentation.from_pretrained(<hub id or folder>, id2label=...,
ignore_mismatched_sizes=True)``: everything loads except the classifier layers of the decode head and the
auxiliary head, which are re-initialised for our labels (and reported). ``SegmentationModel`` returns the
auxiliary head's logits too, so they can join the loss (every parameter gets a gradient under DDP).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForSemanticSegmentation, AutoModelForUniversalSegmentation, BeitConfig,
                          ConvNextConfig, DPTConfig, Mask2FormerConfig, SegformerConfig, SegformerImageProcessorPil,
                          SwinConfig, UperNetConfig)
from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES

from baselines import BASELINE_FAMILIES, BASELINES, build_baseline  # also registers them with the Auto classes
from inference import InferenceSpec, task_labels
from masks import multiclass_targets, unpack_targets
from preprocess import IMAGENET_MEAN, IMAGENET_STD
from utils import UserError, atomic_dir, command, quiet_third_party

# Input statistics each family was pretrained with (used when the checkpoint has no preprocessor config).
FAMILY_STATS = {"segformer": (IMAGENET_MEAN, IMAGENET_STD),
                "upernet": (IMAGENET_MEAN, IMAGENET_STD),
                "dpt": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                "beit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                "mask2former": (IMAGENET_MEAN, IMAGENET_STD)}
# mask-classification families: one mask per object query and a class per mask, trained with their own
# Hungarian-matched loss; not AutoModelForSemanticSegmentation models
QUERY_FAMILIES = ("mask2former",)
ADE_LIKE_LABELS = {i: f"ade_class_{i}" for i in range(150)}


def _tiny_segformer(id2label: dict, width: int = 1):
    return SegformerConfig(hidden_sizes=[16 * width, 32 * width, 80 * width, 128 * width], depths=[1, 1, 1, 1],
                           num_attention_heads=[1, 2, 5, 8], decoder_hidden_size=64 * width, id2label=id2label)


def _tiny_upernet(id2label: dict, width: int = 1):
    backbone = ConvNextConfig(hidden_sizes=[16 * width, 32 * width, 64 * width, 128 * width], depths=[1, 1, 2, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    return UperNetConfig(backbone_config=backbone, hidden_size=64 * width, auxiliary_channels=32 * width,
                         use_auxiliary_head=True, id2label=id2label)


def _tiny_dpt(id2label: dict, width: int = 1):
    return DPTConfig(hidden_size=64 * width, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128 * width,
                     image_size=128, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                     neck_hidden_sizes=[16 * width, 32 * width, 64 * width, 64 * width], fusion_hidden_size=32 * width,
                     use_auxiliary_head=True, id2label=id2label)


def _tiny_beit(id2label: dict, width: int = 1):
    return BeitConfig(hidden_size=64 * width, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128 * width,
                      image_size=128, patch_size=16, out_indices=[0, 1, 2, 3], use_relative_position_bias=True,
                      use_auxiliary_head=True, pool_scales=[1, 2, 3, 6], auxiliary_channels=32 * width,
                      id2label=id2label)


def _tiny_mask2former(id2label: dict, width: int = 1):
    backbone = SwinConfig(image_size=128, patch_size=4, embed_dim=16 * width, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 2, 2], window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerConfig(backbone_config=backbone, hidden_dim=32 * width, mask_feature_size=32 * width,
                             feature_size=32 * width, num_queries=16, encoder_layers=1, decoder_layers=3,
                             num_attention_heads=2, dim_feedforward=64 * width, encoder_feedforward_dim=64 * width,
                             train_num_points=1024, id2label=id2label)


# family -> builder of a small, randomly initialised config of the real architecture
TINY_CONFIGS: dict[str, Callable] = {"segformer": _tiny_segformer, "upernet": _tiny_upernet, "dpt": _tiny_dpt,
                                     "beit": _tiny_beit, "mask2former": _tiny_mask2former}


def auto_class(model_type: str):
    """The Auto class that loads a ``model_type``: mask classification (Mask2Former) or semantic segmentation."""
    return AutoModelForUniversalSegmentation if model_type in QUERY_FAMILIES else AutoModelForSemanticSegmentation


def make_tiny(family: str, out_dir: str | Path, width: int = 1, seed: int = 0) -> Path:
    """Save a randomly initialised model of ``family`` with 150 ADE-like labels (so loading it for our classes
    exercises the head replacement) plus its image processor, with ``save_pretrained``."""
    if family not in TINY_CONFIGS:
        raise UserError(f"unknown --family {family!r}; choose from {sorted(TINY_CONFIGS)}")
    torch.manual_seed(seed)
    config = TINY_CONFIGS[family](ADE_LIKE_LABELS, width)
    config.label2id = {v: k for k, v in config.id2label.items()}
    model = auto_class(config.model_type).from_config(config)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        mean, std = FAMILY_STATS[family]
        make_image_processor(512, mean, std).save_pretrained(tmp)
    return out


def make_image_processor(image_size: int, mean, std):
    """Resize to image_size and normalise; inputs are scans already scaled to [0, 1] (data.normalise_scan)."""
    return SegformerImageProcessorPil(size={"height": image_size, "width": image_size}, do_rescale=False,
                                      do_reduce_labels=False, image_mean=list(mean), image_std=list(std))


@dataclass
class LoadedModel:
    model: nn.Module  # the transformers model
    family: str
    reinitialised: list[str]  # "name: old shape -> new shape"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stats_source: str  # where mean/std came from, for the log


def _hub_hint(name: str) -> str:
    if Path(name).exists():
        return ""
    return (" If this is a hub id, the Hugging Face hub may be unreachable from here (no network, or "
            "HF_HUB_OFFLINE=1): on a machine with network run `hf download " + name + " --local-dir <folder>` "
            "(or from_pretrained(...).save_pretrained(<folder>)), copy the folder here and pass --base_model <folder>.")


def channel_sources(channels: int) -> list[int]:
    """For an input of ``channels`` slices (odd; offsets -k..k around the centre), the pretrained RGB channel each
    one takes its weights and statistics from: 0 below the centre, 1 the centre, 2 above (3 -> [0, 1, 2])."""
    half = channels // 2
    return [0 if j < half else 1 if j == half else 2 for j in range(channels)]


def widen_channels(values, channels: int) -> tuple:
    """A 3-channel mean or std as ``channels`` values (channel_sources)."""
    return tuple(values[src] for src in channel_sources(channels))


def _config_with_channels(config):
    """The config whose ``num_channels`` builds the input layer (the backbone's, for UperNet and Mask2Former)."""
    backbone = getattr(config, "backbone_config", None)
    return backbone if backbone is not None and hasattr(backbone, "num_channels") else config


def input_channels(hf_model: nn.Module) -> int:
    return int(getattr(_config_with_channels(hf_model.config), "num_channels", 3))


def widen_input(hf_model: nn.Module, channels: int) -> str:
    """Give the model's first 3-channel convolution ``channels`` input channels (an odd number of slices): each new
    channel takes the pretrained weights of its source channel (channel_sources) divided by how many share them,
    so an input with the same image in every channel (normalised with widen_channels' statistics) gives exactly
    the 3-channel model's output; the pretrained weights are kept. Sets ``num_channels`` in the config, so the
    saved folder loads with the Auto class. Returns the layer's name."""
    conv = next(((name, m) for name, m in hf_model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3),
                None)
    if conv is None:
        raise UserError(f"--context_slices {channels}: no 3-channel input convolution found in this "
                        f"{hf_model.config.model_type} model to widen")
    name, old = conv
    src = torch.tensor(channel_sources(channels))
    share = torch.bincount(src, minlength=3).to(old.weight.dtype)[src].view(1, -1, 1, 1)
    new = nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation, old.groups,
                    old.bias is not None, old.padding_mode, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight[:, src] / share)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    parent, _, attr = name.rpartition(".")
    setattr(hf_model.get_submodule(parent) if parent else hf_model, attr, new)
    _config_with_channels(hf_model.config).num_channels = channels
    for m in hf_model.modules():  # embeddings that check the channel count of their input
        if getattr(m, "num_channels", None) == 3:
            m.num_channels = channels
    return name


def load_model(base_model: str, task: str, classes: tuple[str, ...], aux_weight: float = 0.4,
               trust_remote_code: bool = False, in_channels: int = 3) -> LoadedModel:
    """Load ``base_model`` (hub id or local folder) with a fresh head for ``task``'s labels of ``classes``; with
    ``in_channels`` > 3 (--context_slices 5, 7 ...) its input layer widened (widen_input) and its statistics too."""
    loaded = _load_model(base_model, task, classes, aux_weight, trust_remote_code)
    if in_channels > 3 and input_channels(loaded.model) != in_channels:
        layer = widen_input(loaded.model, in_channels)
        loaded.reinitialised.append(f"{layer}: widened to {in_channels} input channels (pretrained weights shared "
                                    "out; same output for the same image in every channel)")
        loaded.mean, loaded.std = widen_channels(loaded.mean, in_channels), widen_channels(loaded.std, in_channels)
    return loaded


def _load_model(base_model: str, task: str, classes: tuple[str, ...], aux_weight: float = 0.4,
                trust_remote_code: bool = False) -> LoadedModel:
    id2label = task_labels(task, classes)
    if base_model in BASELINES:
        model = build_baseline(base_model, id2label)
        return LoadedModel(model, model.config.model_type,
                           ["all weights (a CNN baseline starts from random weights: no pretrained encoder offline)"],
                           IMAGENET_MEAN, IMAGENET_STD, "ImageNet (a CNN baseline's choice)")
    try:
        config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load --base_model {base_model!r}: {first}.{_hub_hint(base_model)}") from None
    family = config.model_type
    if family not in MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES and family not in (*BASELINE_FAMILIES,
                                                                                       *QUERY_FAMILIES):  # any AutoModelForSemanticSegmentation family loads
        raise UserError(f"--base_model {base_model!r} is a {family!r} model, not a semantic-segmentation model; "
                        f"tested families: {sorted(TINY_CONFIGS)}, baselines: {sorted(BASELINES)}")
    kwargs = {}
    if hasattr(config, "use_auxiliary_head") and aux_weight <= 0:
        kwargs["use_auxiliary_head"] = False  # no aux loss: drop the head, or DDP would see unused parameters
    model, info = auto_class(family).from_pretrained(
        base_model, id2label=id2label, label2id={v: k for k, v in id2label.items()}, ignore_mismatched_sizes=True,
        output_loading_info=True, trust_remote_code=trust_remote_code, **kwargs)
    reinit = [f"{k}: {tuple(old)} -> {tuple(new)}" for k, old, new in info.get("mismatched_keys", [])]
    reinit += [f"{k}: new" for k in info.get("missing_keys", [])]
    mean, std = FAMILY_STATS.get(family, (IMAGENET_MEAN, IMAGENET_STD))
    source = f"the {family} family's" if family in FAMILY_STATS else "ImageNet (no preprocessor config, family untested)"
    proc_file = Path(base_model) / "preprocessor_config.json"
    if proc_file.is_file():
        proc = json.loads(proc_file.read_text())
        if "image_mean" in proc and "image_std" in proc:
            mean, std, source = proc["image_mean"], proc["image_std"], f"{proc_file}"
    return LoadedModel(model, family, sorted(reinit), tuple(mean), tuple(std), source)


class SegmentationModel(nn.Module):
    """Wraps a transformers segmentation model: ``forward(pixel_values) -> (logits, aux_logits or None)``.

    The auxiliary head's output (UperNet, DPT, BEiT) is captured with a forward hook, since transformers only
    uses it inside its own cross-entropy loss. A mask-classification model (Mask2Former) returns per-class maps as
    logits (query_maps); given ``targets`` (query_targets of a batch) its second output is its own matched loss."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.query_based = hf_model.config.model_type in QUERY_FAMILIES
        self._aux: torch.Tensor | None = None
        aux_head = getattr(hf_model, "auxiliary_head", None)
        if aux_head is not None:
            aux_head.register_forward_hook(self._keep_aux)

    def _keep_aux(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._aux = output

    def forward(self, pixel_values: torch.Tensor,
                targets: tuple[list, list] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.query_based:
            mask_labels, class_labels = targets if targets is not None else (None, None)
            out = self.hf(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels)
            multiclass = self.hf.config.id2label.get(0) == "background"
            return query_maps(out.class_queries_logits, out.masks_queries_logits, multiclass), out.loss
        self._aux = None
        logits = self.hf(pixel_values=pixel_values).logits
        aux, self._aux = self._aux, None
        return logits, aux


def query_maps(class_logits: torch.Tensor, mask_logits: torch.Tensor, multiclass: bool) -> torch.Tensor:
    """Mask2Former's (B, Q, K + 1) class logits (the last: no object) and (B, Q, h, w) mask logits -> (B, K, h, w)
    logits of per-class maps: p(class k) = sum over queries of softmax(class)_k x sigmoid(mask), as the image
    processor's semantic post-processing computes before its argmax. Multilabel: the logit of p (so sigmoid gives p
    back and classes that overlap keep both); multiclass: log p (argmax unchanged)."""
    probs = torch.einsum("bqk,bqhw->bkhw", class_logits.float().softmax(-1)[..., :-1], mask_logits.float().sigmoid())
    probs = probs.clamp(1e-6, 1 - 1e-6)
    return probs.log() if multiclass else torch.logit(probs)


def query_targets(packed: torch.Tensor, task: str, classes: tuple[str, ...],
                  priority: tuple[str, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A batch's packed masks -> Mask2Former's targets: per image, one mask per label present (multilabel: each
    organ, overlaps kept; multiclass: background and each organ after the priority) and its label."""
    if task == "multilabel":
        planes = unpack_targets(packed, len(classes))  # (B, C, H, W)
        labels = torch.arange(len(classes), device=packed.device)
    else:
        ids = multiclass_targets(packed, classes, priority)
        labels = torch.arange(len(classes) + 1, device=packed.device)
        planes = (ids.unsqueeze(1) == labels.view(1, -1, 1, 1)).float()
    present = planes.flatten(2).amax(2) > 0  # (B, K)
    return [p[keep] for p, keep in zip(planes, present)], [labels[keep] for keep in present]


def freeze_unused_parameters(model: SegmentationModel, image_size: int = 64) -> list[str]:
    """Mark parameters that the forward pass never reaches as frozen; return their names.

    Some architectures carry weights their segmentation forward does not use (DPT: the backbone's final
    layernorm and the first fusion layer's first residual unit). Frozen, they change nothing in training and
    DDP needs no ``find_unused_parameters`` search every step."""
    was_training = model.training
    model.eval()  # eval: batch-norm running statistics stay untouched; gradients flow all the same
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    logits, aux = model(torch.zeros(1, input_channels(model.hf), image_size, image_size, device=device))
    (logits.float().sum() + (aux.float().sum() if aux is not None else 0)).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in model.named_parameters():
        if n in unused:
            p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return unused


def _in_parameter_layout(grad: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """``grad`` as a view with ``param``'s strides when they differ only in dimensions of size 1 (same memory)."""
    if grad.stride() == param.stride() or any(g != p for g, p, n in zip(grad.stride(), param.stride(), grad.shape)
                                              if n != 1):
        return grad
    return grad.as_strided(param.shape, param.stride())


def match_gradient_layout(model: nn.Module) -> None:
    """Make every gradient arrive in its parameter's strides.

    A convolution's weight gradient can come back with other strides than its weight in the dimensions of size 1
    (a depthwise (C, 1, k, k) weight: (k*k, 1, k, 1) against (k*k, k*k, k, 1); a 1x1 conv likewise), which
    depends on the batch and on oneDNN's choice. PyTorch's layout contract accepts that, but DDP compares strides
    exactly, warns "Grad strides do not match bucket view strides" on every rank and copies with the slow
    strides. Restriding such a gradient is a view of the same memory, so this costs nothing."""
    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(lambda grad, p=p: _in_parameter_layout(grad, p))


def save_model(hf_model: nn.Module, out_dir: str | Path, spec: InferenceSpec, state_dict: dict | None = None,
               card: str | None = None) -> None:
    """``save_pretrained`` (safetensors), the image processor, the inference spec and the model card ``card``
    (README.md), written atomically to ``out_dir``. ``state_dict`` overrides the model's own (the gathered one
    under DeepSpeed / FSDP)."""
    with atomic_dir(out_dir) as tmp:
        hf_model.save_pretrained(tmp, state_dict=state_dict)
        make_image_processor(spec.image_size, spec.mean, spec.std).save_pretrained(tmp)
        spec.save(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)


@command
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Model utilities.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-tiny", help="save a small random model of a real architecture (150 ADE-like labels)")
    p.add_argument("--family", required=True, choices=sorted(TINY_CONFIGS), help="architecture family")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--width", type=int, default=1, help="channel multiplier (default 1)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    args = ap.parse_args(argv)
    quiet_third_party()  # no "Writing model shards" progress bar
    print(make_tiny(args.family, args.out, args.width, args.seed))


if __name__ == "__main__":
    sys.exit(main())
