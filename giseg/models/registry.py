"""Every model family the toolkit trains, one entry each with its facts (timm's registry): adding a family is one
module and one line here, and the tests parametrised over ``list_families()`` cover it.

    hub          a transformers checkpoint family (--base_model <hub id or folder>); ``tiny`` builds a small random
                 config of it (giseg make-tiny --family <name>), which the tests and the demo stand in for a hub id
    baseline     a CNN trained from scratch (--base_model <name>): ``encoder`` is its GIUNetConfig encoder (UNeXt
                 its own architecture)
    classifier   an image-classification family for slice classifiers (--task presence); ``tiny`` as for hub
    volume       a 3D network of MONAI trained from scratch on patches of volumes (--base_model <name>; the [3d]
                 extra): ``encoder`` is its GIVolumeConfig architecture (models/volume.py); ``tiny`` as for hub

Light: nothing here imports transformers (a ``tiny`` builder is named as "module:function" and imported when a
tiny model is made), so the flags' --help can list the families.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from giseg.data.preprocess import IMAGENET_MEAN, IMAGENET_STD

HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)
KINDS = ("hub", "baseline", "classifier", "volume")


@dataclass(frozen=True)
class Family:
    name: str  # what a user types: make-tiny --family (hub, classifier, volume) or --base_model (baseline, volume)
    kind: str  # one of KINDS
    model_type: str  # config.json's model_type of a model of this family
    stats: tuple[tuple[float, ...], tuple[float, ...]]  # input mean, std it was pretrained with (random: ImageNet's)
    about: str  # one line for --help and the docs
    tiny: str = ""  # "module:function" building a small random config (hub, classifier)
    encoder: str = ""  # a baseline's encoder; a volume family's architecture
    query: bool = False  # mask classification: a mask per object query, its own matched loss (Mask2Former)
    min_size: int = 32  # the smallest --image_size it handles (Mask2Former: 64; its deepest map is 1 x 1 at 32)
    dynamic_size: bool = False  # exported to ONNX with dynamic height and width (checked at export)
    graph_breaks: str = ""  # why its training step cannot compile as one graph ("": it does; tests/training/test_compile)

    def tiny_config(self, id2label: dict, width: int = 1):
        """The small random config of this family (giseg make-tiny)."""
        module, function = self.tiny.split(":")
        builder: Callable = getattr(importlib.import_module(module), function)
        return builder(id2label, width)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("segformer", "hub", "segformer", IMAGENET, "SegFormer (nvidia/segformer-b0-finetuned-ade-512-512 ...)",
           tiny="giseg.models.tiny:tiny_segformer", dynamic_size=True),
    Family("upernet", "hub", "upernet", IMAGENET, "UperNet-ConvNeXt (openmmlab/upernet-convnext-small ...)",
           tiny="giseg.models.tiny:tiny_upernet"),
    Family("dpt", "hub", "dpt", HALF, "DPT (Intel/dpt-large-ade ...)", tiny="giseg.models.tiny:tiny_dpt"),
    Family("beit", "hub", "beit", HALF, "BEiT (microsoft/beit-base-finetuned-ade-640-640 ...)",
           tiny="giseg.models.tiny:tiny_beit"),
    Family("mask2former", "hub", "mask2former", IMAGENET, "Mask2Former (mask classification, its matched loss)",
           tiny="giseg.models.tiny:tiny_mask2former", query=True, min_size=64,
           graph_breaks="its forward branches on the data and its matched loss pairs masks on the host"),
    Family("unet", "baseline", "gi_unet", IMAGENET, "U-Net, plain encoder (models/baselines.py)", encoder="plain"),
    Family("unet-resnet34", "baseline", "gi_unet", IMAGENET, "U-Net, ResNet-34 encoder", encoder="resnet34"),
    Family("unet-resnext50", "baseline", "gi_unet", IMAGENET, "U-Net, ResNeXt-50 encoder", encoder="resnext50_32x4d"),
    Family("dense-unet", "baseline", "gi_unet", IMAGENET, "U-Net, DenseNet-style encoder", encoder="dense"),
    Family("unext", "baseline", "gi_unext", IMAGENET, "UNeXt (models/unext.py)", encoder="unext"),
    Family("convnext-classifier", "classifier", "convnext", IMAGENET, "ConvNeXt image classifier",
           tiny="giseg.models.tiny:tiny_convnext"),
    Family("swin-classifier", "classifier", "swin", IMAGENET, "Swin image classifier",
           tiny="giseg.models.tiny:tiny_swin"),
    Family("efficientnet-classifier", "classifier", "efficientnet", IMAGENET, "EfficientNet image classifier",
           tiny="giseg.models.tiny:tiny_efficientnet"),
    Family("segresnet3d", "volume", "gi_volume", HALF, "SegResNet, 3D (MONAI; models/volume.py)", encoder="segresnet",
           tiny="giseg.models.volume:tiny_segresnet"),
    Family("swinunetr3d", "volume", "gi_volume", HALF, "SwinUNETR, 3D (MONAI; models/volume.py)", encoder="swinunetr",
           tiny="giseg.models.volume:tiny_swinunetr", min_size=64,
           graph_breaks="MONAI's SwinUNETR builds its shifted-window attention mask with numpy in the forward"),
)}


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile's modes that capture CUDA graphs


def family_of(model_type: str, variant: str = "") -> Family | None:
    """The family of a model: by its config's model_type, and where families share one (the U-Nets, the 3D
    networks) by ``variant``, the config's encoder or architecture."""
    matches = [f for f in FAMILIES.values() if f.model_type == model_type]
    return next((f for f in matches if f.encoder == variant), matches[0] if matches else None)


def compile_refusal(model_type: str, mode: str, variant: str = "") -> str:
    """'' when --torch_compile_mode ``mode`` suits a model of ``model_type`` (and ``variant``: family_of); else the
    line that refuses it: CUDA graphs need a step that compiles whole."""
    family = family_of(model_type, variant)
    if family is None or not family.graph_breaks or mode not in CUDA_GRAPH_MODES:
        return ""
    return (f"--torch_compile_mode {mode} captures CUDA graphs, which need a training step that compiles whole; "
            f"{family.name}'s does not ({family.graph_breaks}): use --torch_compile_mode default")


def list_families(kind: str | None = None, tiny: bool | None = None) -> list[str]:
    """The registered families' names, of one ``kind`` and / or with (True) or without (False) a tiny config."""
    return [f.name for f in FAMILIES.values()
            if (kind is None or f.kind == kind) and (tiny is None or bool(f.tiny) == tiny)]


def base_model_help() -> str:
    """--base_model's help (giseg train), from the registry."""
    hub = ", ".join(FAMILIES[f].about.split(" (")[0] for f in list_families("hub"))
    return (f"hub id (e.g. nvidia/segformer-b0-finetuned-ade-512-512) or local folder of a {hub} checkpoint (or any "
            "AutoModelForSemanticSegmentation family); its decode/auxiliary/class heads are replaced. Or a CNN "
            f"baseline trained from scratch: {', '.join(list_families('baseline'))} (models/baselines.py, unext.py). "
            f"Or a 3D network trained from scratch on patches of volumes (MONAI, the [3d] extra; --patch_size): "
            f"{', '.join(list_families('volume'))}, or a folder of one (giseg make-tiny)")
