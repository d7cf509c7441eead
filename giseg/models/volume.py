"""3D segmentation networks of MONAI as transformers-compatible models (the [3d] extra: pip install 'giseg[3d]').

    --base_model segresnet3d       SegResNet (Myronenko 2018; the 3D branch of the UW-Madison winner): residual
                                   3D conv encoder, light decoder; MONAI's layout with 16 initial filters
    --base_model swinunetr3d       SwinUNETR (Hatamizadeh 2022): a 3D Swin transformer encoder, a U-Net decoder

A model sees a patch of a volume, (B, C, D, H, W), D along the slices, and returns (B, K, D, H, W) logits at the
patch's size; inference covers a whole volume with MONAI's sliding window (inference/volume.py). Both start from
random weights (no pretrained 3D weights offline). They are ``PreTrainedModel`` subclasses registered with the Auto
classes like the CNN baselines, so a trained one saves with ``save_pretrained`` (safetensors + config.json) and
loads with ``AutoModelForSemanticSegmentation.from_pretrained(folder)``. The config holds the MONAI network's
arguments; MONAI itself is imported only when a network is built (so the flags, the registry and the Auto
registration work without the extra, and a 3D model without it is one line naming the extra).
"""
from __future__ import annotations

import importlib

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSemanticSegmentation, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SemanticSegmenterOutput

from giseg.models.registry import FAMILIES
from giseg.utils.errors import UserError

# architecture -> (MONAI module, class, the keyword arguments of --base_model <name>, the name of its output bias)
ARCHITECTURES = {
    "segresnet": ("monai.networks.nets.segresnet", "SegResNet",
                  {"init_filters": 16, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}, "conv_final.2.conv.bias"),
    "swinunetr": ("monai.networks.nets.swin_unetr", "SwinUNETR",
                  {"feature_size": 24, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24]}, "out.conv.conv.bias"),
}
VOLUMES = {f.name: f.encoder for f in FAMILIES.values() if f.kind == "volume"}  # --base_model name -> architecture
EXTRA = "pip install 'giseg[3d]' (MONAI and einops)"


def require_monai(what: str) -> None:
    """One line naming the extra when MONAI (or einops, which SwinUNETR needs) is not installed."""
    for module in ("monai", "einops"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"{what} needs the [3d] extra, which is not installed ({module} is missing): "
                            f"{EXTRA}") from None


def patch_multiple(config: "GIVolumeConfig") -> tuple[int, int]:
    """What every side of an input patch must be a multiple of, and at least: SegResNet halves it once per level
    after the first; SwinUNETR's patch embedding and four merges divide it by 32, and its instance norms need
    more than one voxel there (64)."""
    if config.architecture == "swinunetr":
        return 32, 64
    multiple = 2 ** (len(config.net["blocks_down"]) - 1)
    return multiple, multiple


class GIVolumeConfig(PretrainedConfig):
    model_type = "gi_volume"

    def __init__(self, architecture: str = "segresnet", num_channels: int = 1, net: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown 3D architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
        self.architecture, self.num_channels = architecture, num_channels
        self.net = dict(ARCHITECTURES[architecture][2] if net is None else net)


class GIVolumeForSemanticSegmentation(PreTrainedModel):
    config_class = GIVolumeConfig
    base_model_prefix = "volume"
    main_input_name = "pixel_values"

    def __init__(self, config: GIVolumeConfig):
        super().__init__(config)
        require_monai(f"a 3D model ({config.architecture})")
        module, name, _, bias = ARCHITECTURES[config.architecture]
        self.output_bias = f"net.{bias}"  # (models/load.set_prior_bias)
        network = getattr(importlib.import_module(module), name)
        kwargs = {"spatial_dims": 3} if config.architecture == "segresnet" else {}
        self.net = network(in_channels=config.num_channels, out_channels=config.num_labels, **kwargs, **config.net)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's own initialisation (what MONAI's networks use), for the layers transformers re-initialises
        (a head resized for our labels)."""
        if hasattr(module, "relative_position_bias_table"):  # SwinUNETR's window attention
            nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d, nn.Linear, nn.LayerNorm, nn.GroupNorm)):
            module.reset_parameters()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                **kwargs) -> SemanticSegmenterOutput:
        return SemanticSegmenterOutput(logits=self.net(pixel_values))


AutoConfig.register("gi_volume", GIVolumeConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(GIVolumeConfig, GIVolumeForSemanticSegmentation, exist_ok=True)


def build_volume(name: str, id2label: dict[int, str], num_channels: int = 1,
                 net: dict | None = None) -> GIVolumeForSemanticSegmentation:
    """A randomly initialised 3D model for ``--base_model name`` (``net``: the MONAI arguments, default the
    architecture's)."""
    config = GIVolumeConfig(architecture=VOLUMES[name], num_channels=num_channels, net=net, id2label=id2label,
                            label2id={v: k for k, v in id2label.items()})
    return GIVolumeForSemanticSegmentation(config)


def tiny_segresnet(id2label: dict, width: int = 1) -> GIVolumeConfig:
    return GIVolumeConfig("segresnet", net={"init_filters": 8 * width, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
                          id2label=id2label)


def tiny_swinunetr(id2label: dict, width: int = 1) -> GIVolumeConfig:
    return GIVolumeConfig("swinunetr", net={"feature_size": 12 * width, "depths": [1, 1, 1, 1],
                                            "num_heads": [1, 1, 1, 1], "window_size": 4}, id2label=id2label)
