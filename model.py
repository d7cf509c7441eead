"""Pretrained Hugging Face segmentation models with a new head for our classes.

    python model.py make-tiny --family segformer --out demo/models/tiny-segformer

``load_model`` calls ``AutoModelForSemanticSegmentation.from_pretrained(<hub id or folder>, id2label=...,
ignore_mismatched_sizes=True)``: everything loads except the classifier layers of the decode head and the
auxiliary head, which are re-initialised for our labels (and reported). ``SegmentationModel`` returns the
auxiliary head's logits too, so they can join the loss (every parameter gets a gradient under DDP).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from baselines import BASELINES, build_baseline  # also registers the U-Net baselines with the Auto classes
from utils import CLASSES, UserError, atomic_dir

# Checkpoints of the reference comparison (need the hub or a downloaded folder).
REFERENCE_CHECKPOINTS = {
    "segformer": ["nvidia/segformer-b0-finetuned-ade-512-512", "nvidia/segformer-b4-finetuned-ade-512-512",
                  "nvidia/segformer-b5-finetuned-ade-640-640"],
    "upernet": ["openmmlab/upernet-convnext-small", "openmmlab/upernet-convnext-base",
                "openmmlab/upernet-convnext-large"],
    "dpt": ["Intel/dpt-large-ade"],
    "beit": ["microsoft/beit-base-finetuned-ade-640-640", "microsoft/beit-large-finetuned-ade-640-640"],
}
# Input statistics each family was pretrained with (used when the checkpoint has no preprocessor config).
FAMILY_STATS = {"segformer": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                "upernet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                "dpt": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                "beit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
ADE_LIKE_LABELS = {i: f"ade_class_{i}" for i in range(150)}


def _tiny_segformer(id2label: dict, width: int = 1):
    from transformers import SegformerConfig
    return SegformerConfig(hidden_sizes=[16 * width, 32 * width, 80 * width, 128 * width], depths=[1, 1, 1, 1],
                           num_attention_heads=[1, 2, 5, 8], decoder_hidden_size=64 * width, id2label=id2label)


def _tiny_upernet(id2label: dict, width: int = 1):
    from transformers import ConvNextConfig, UperNetConfig
    backbone = ConvNextConfig(hidden_sizes=[16 * width, 32 * width, 64 * width, 128 * width], depths=[1, 1, 2, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    return UperNetConfig(backbone_config=backbone, hidden_size=64 * width, auxiliary_channels=32 * width,
                         use_auxiliary_head=True, id2label=id2label)


def _tiny_dpt(id2label: dict, width: int = 1):
    from transformers import DPTConfig
    return DPTConfig(hidden_size=64 * width, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128 * width,
                     image_size=128, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                     neck_hidden_sizes=[16 * width, 32 * width, 64 * width, 64 * width], fusion_hidden_size=32 * width,
                     use_auxiliary_head=True, id2label=id2label)


def _tiny_beit(id2label: dict, width: int = 1):
    from transformers import BeitConfig
    return BeitConfig(hidden_size=64 * width, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128 * width,
                      image_size=128, patch_size=16, out_indices=[0, 1, 2, 3], use_relative_position_bias=True,
                      use_auxiliary_head=True, pool_scales=[1, 2, 3, 6], auxiliary_channels=32 * width,
                      id2label=id2label)


# family -> builder of a small, randomly initialised config of the real architecture
TINY_CONFIGS: dict[str, Callable] = {"segformer": _tiny_segformer, "upernet": _tiny_upernet, "dpt": _tiny_dpt,
                                     "beit": _tiny_beit}


def make_tiny(family: str, out_dir: str | Path, width: int = 1, seed: int = 0) -> Path:
    """Save a randomly initialised model of ``family`` with 150 ADE-like labels (so loading it for our classes
    exercises the head replacement) plus its image processor, with ``save_pretrained``."""
    from transformers import AutoModelForSemanticSegmentation

    if family not in TINY_CONFIGS and family != "gi_unet":
        raise UserError(f"unknown --family {family!r}; choose from {sorted(TINY_CONFIGS)}")
    torch.manual_seed(seed)
    config = TINY_CONFIGS[family](ADE_LIKE_LABELS, width)
    config.label2id = {v: k for k, v in config.id2label.items()}
    model = AutoModelForSemanticSegmentation.from_config(config)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        mean, std = FAMILY_STATS[family]
        make_image_processor(512, mean, std).save_pretrained(tmp)
    return out


def make_image_processor(image_size: int, mean, std):
    """Resize to image_size and normalise; inputs are scans already scaled to [0, 1] (data.normalise_scan)."""
    from transformers import SegformerImageProcessorPil

    return SegformerImageProcessorPil(size={"height": image_size, "width": image_size}, do_rescale=False,
                                      do_reduce_labels=False, image_mean=list(mean), image_std=list(std))


def task_labels(task: str, classes: tuple[str, ...] = CLASSES) -> dict[int, str]:
    if task == "multilabel":
        return dict(enumerate(classes))
    if task == "multiclass":
        return dict(enumerate(("background",) + tuple(classes)))
    raise UserError(f"--task must be multilabel or multiclass, got {task!r}")


@dataclass
class LoadedModel:
    model: nn.Module  # the transformers model
    family: str
    reinitialised: list[str]  # "name: old shape -> new shape"
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _hub_hint(name: str) -> str:
    if Path(name).exists():
        return ""
    return (" If this is a hub id, the Hugging Face hub may be unreachable from here (no network, or "
            "HF_HUB_OFFLINE=1): on a machine with network run `hf download " + name + " --local-dir <folder>` "
            "(or from_pretrained(...).save_pretrained(<folder>)), copy the folder here and pass --base_model <folder>.")


def load_model(base_model: str, task: str = "multilabel", aux_weight: float = 0.4,
               trust_remote_code: bool = False, classes: tuple[str, ...] = CLASSES) -> LoadedModel:
    """Load ``base_model`` (hub id or local folder) with a fresh head for ``task``'s labels of ``classes``."""
    from transformers import AutoConfig, AutoModelForSemanticSegmentation

    id2label = task_labels(task, classes)
    if base_model in BASELINES:
        mean, std = FAMILY_STATS["segformer"]
        return LoadedModel(build_baseline(base_model, id2label), "gi_unet",
                           ["all weights (a CNN baseline starts from random weights: no pretrained encoder offline)"],
                           mean, std)
    try:
        config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load --base_model {base_model!r}: {first}.{_hub_hint(base_model)}") from None
    family = config.model_type
    if family not in TINY_CONFIGS and family != "gi_unet":
        # Any other AutoModelForSemanticSegmentation architecture is attempted; say so.
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES as seg
        if family not in seg:
            raise UserError(f"--base_model {base_model!r} is a {family!r} model, not a semantic-segmentation model; "
                            f"supported families: {sorted(TINY_CONFIGS)}, baselines: {sorted(BASELINES)}")
    kwargs = {}
    if hasattr(config, "use_auxiliary_head") and aux_weight <= 0:
        kwargs["use_auxiliary_head"] = False  # no aux loss: drop the head, or DDP would see unused parameters
    model, info = AutoModelForSemanticSegmentation.from_pretrained(
        base_model, id2label=id2label, label2id={v: k for k, v in id2label.items()}, ignore_mismatched_sizes=True,
        output_loading_info=True, trust_remote_code=trust_remote_code, **kwargs)
    reinit = [f"{k}: {tuple(old)} -> {tuple(new)}" for k, old, new in info.get("mismatched_keys", [])]
    reinit += [f"{k}: new" for k in info.get("missing_keys", [])]
    model.config.gi_task = task
    mean, std = FAMILY_STATS.get(family, FAMILY_STATS["segformer"])
    proc_file = Path(base_model) / "preprocessor_config.json"
    if proc_file.is_file():
        import json
        proc = json.loads(proc_file.read_text())
        mean, std = tuple(proc.get("image_mean", mean)), tuple(proc.get("image_std", std))
    return LoadedModel(model, family, sorted(reinit), tuple(mean), tuple(std))


class SegmentationModel(nn.Module):
    """Wraps a transformers segmentation model: ``forward(pixel_values) -> (logits, aux_logits or None)``.

    The auxiliary head's output (UperNet, DPT, BEiT) is captured with a forward hook, since transformers only
    uses it inside its own cross-entropy loss."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self._aux: torch.Tensor | None = None
        aux_head = getattr(hf_model, "auxiliary_head", None)
        if aux_head is not None:
            aux_head.register_forward_hook(self._keep_aux)

    def _keep_aux(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._aux = output

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._aux = None
        logits = self.hf(pixel_values=pixel_values).logits
        aux, self._aux = self._aux, None
        return logits, aux


def freeze_unused_parameters(model: SegmentationModel, image_size: int = 64) -> list[str]:
    """Mark parameters that the forward pass never reaches as frozen; return their names.

    Some architectures carry weights their segmentation forward does not use (DPT: the backbone's final
    layernorm and the first fusion layer's first residual unit). Frozen, they change nothing in training and
    DDP needs no ``find_unused_parameters`` search every step."""
    was_training = model.training
    model.eval()  # eval: batch-norm running statistics stay untouched; gradients flow all the same
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    logits, aux = model(torch.zeros(1, 3, image_size, image_size, device=device))
    (logits.float().sum() + (aux.float().sum() if aux is not None else 0)).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in model.named_parameters():
        if n in unused:
            p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return unused


def save_model(hf_model: nn.Module, out_dir: str | Path, image_size: int, mean, std,
               state_dict: dict | None = None) -> None:
    """``save_pretrained`` (safetensors) plus the image processor, written atomically to ``out_dir``.
    ``state_dict`` overrides the model's own (the gathered one under DeepSpeed / FSDP)."""
    with atomic_dir(out_dir) as tmp:
        hf_model.save_pretrained(tmp, state_dict=state_dict)
        make_image_processor(image_size, mean, std).save_pretrained(tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description="Model utilities.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-tiny", help="save a small random model of a real architecture (150 ADE-like labels)")
    p.add_argument("--family", required=True, choices=sorted(TINY_CONFIGS), help="architecture family")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--width", type=int, default=1, help="channel multiplier (default 1)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        print(make_tiny(args.family, args.out, args.width, args.seed))
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
