"""CNN baselines of the projects our users come from, as transformers-compatible models.

    --base_model unet              U-Net from scratch: 4 double-conv encoder blocks with max-pool, a bottleneck,
                                   a bilinear-upsampling decoder with skip connections, a 1x1 head
    --base_model unet-resnet34     U-Net with a ResNet34 encoder (BasicBlocks 3-4-6-3)
    --base_model unet-resnext50    U-Net with a ResNeXt50 32x4d encoder (Bottlenecks 3-4-6-3, 32 groups)
    --base_model dense-unet        U-Net whose encoder blocks are dense blocks (the "FancyUNet" / DenseUNet
                                   baseline of the SegFormer-vs-U-Net comparison)
    --base_model unext             UNeXt (MICCAI 2022): conv stages, then tokenised shifted-MLP stages (models/unext.py)

Why not segmentation_models_pytorch: it (and timm) require torchvision, which on a CPU machine replaces the CPU
torch build with a multi-GB CUDA one, and its pretrained encoder weights come from a hub we cannot reach. The
architectures here are the same recipes, written out; all start from random weights (say so in the log).

They are ``PreTrainedModel`` subclasses registered with the Auto classes, so a trained one saves with
``save_pretrained`` (safetensors + config.json) and loads with
``AutoModelForSemanticSegmentation.from_pretrained(folder)`` once this module is imported (models/load.py does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForSemanticSegmentation, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SemanticSegmenterOutput

from giseg.models.registry import FAMILIES
from giseg.models.unext import build_unext  # also registers UNeXt with the Auto classes

# --base_model name -> encoder of GIUNetConfig, or the UNeXt architecture; their model_types in config.json (registry)
BASELINES = {f.name: f.encoder for f in FAMILIES.values() if f.kind == "baseline"}
BASELINE_FAMILIES = tuple(dict.fromkeys(f.model_type for f in FAMILIES.values() if f.kind == "baseline"))


class GIUNetConfig(PretrainedConfig):
    model_type = "gi_unet"

    def __init__(self, encoder: str = "plain", base_channels: int = 32, num_channels: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.encoder, self.base_channels, self.num_channels = encoder, base_channels, num_channels


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(cin, cout), conv_bn_relu(cout, cout))


# ---------------------------------------------------------------- encoders: each returns features, finest first
class PlainEncoder(nn.Module):
    """Double conv, then 4 x (max-pool, double conv): features at strides 1, 2, 4, 8, 16 (the last is the
    bottleneck)."""

    def __init__(self, cin: int, c: int):
        super().__init__()
        widths = [c, 2 * c, 4 * c, 8 * c, 16 * c]
        self.blocks = nn.ModuleList([double_conv(cin, widths[0])] +
                                    [double_conv(widths[i], widths[i + 1]) for i in range(4)])
        self.channels = widths

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.blocks[0](x)]
        for block in self.blocks[1:]:
            feats.append(block(F.max_pool2d(feats[-1], 2)))
        return feats


class DenseBlock(nn.Module):
    """``layers`` x (BN, ReLU, 3x3 conv of ``growth`` channels), each layer seeing all earlier outputs."""

    def __init__(self, cin: int, growth: int, layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(cin + i * growth), nn.ReLU(inplace=True),
                                                  nn.Conv2d(cin + i * growth, growth, 3, padding=1, bias=False))
                                    for i in range(layers))
        self.out_channels = cin + layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


class DenseEncoder(nn.Module):
    """A stem conv, then dense blocks with 1x1 transitions and max-pool between them."""

    def __init__(self, cin: int, c: int):
        super().__init__()
        self.stem = conv_bn_relu(cin, c)
        self.blocks, self.trans = nn.ModuleList(), nn.ModuleList()
        self.channels = []
        width = c
        for i in range(5):
            block = DenseBlock(width, growth=c // 2 * (i + 1))
            out = 2 * c * 2 ** i if i < 4 else 16 * c
            self.blocks.append(block)
            self.trans.append(nn.Sequential(nn.Conv2d(block.out_channels, out, 1, bias=False), nn.BatchNorm2d(out),
                                            nn.ReLU(inplace=True)))
            self.channels.append(out)
            width = out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, h = [], self.stem(x)
        for i, (block, trans) in enumerate(zip(self.blocks, self.trans)):
            h = trans(block(h if i == 0 else F.max_pool2d(h, 2)))
            feats.append(h)
        return feats


def shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """A residual block's shortcut: identity (None), or a strided 1x1 projection where the shape changes."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def add_residual(out: torch.Tensor, x: torch.Tensor, down: nn.Module | None) -> torch.Tensor:
    return F.relu(out + (x if down is None else down(x)), inplace=True)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, groups: int = 1, base_width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = shortcut(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return add_residual(self.bn2(self.conv2(out)), x, self.down)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64):
        super().__init__()
        width = int(planes * base_width / 64) * groups
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.down = shortcut(cin, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        return add_residual(self.bn3(self.conv3(out)), x, self.down)


RESNETS = {"resnet34": (BasicBlock, (3, 4, 6, 3), 1, 64), "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), 32, 4)}


class ResNetEncoder(nn.Module):
    """torchvision-layout ResNet / ResNeXt: features at strides 2 (stem), 4, 8, 16, 32."""

    def __init__(self, cin: int, name: str):
        super().__init__()
        block, depths, groups, base_width = RESNETS[name]
        self.conv1 = nn.Conv2d(cin, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layers = nn.ModuleList()
        width, self.channels = 64, [64]
        for i, n in enumerate(depths):
            planes = 64 * 2 ** i
            blocks = []
            for k in range(n):
                blocks.append(block(width, planes, stride=2 if (k == 0 and i > 0) else 1, groups=groups,
                                    base_width=base_width))
                width = planes * block.expansion
            self.layers.append(nn.Sequential(*blocks))
            self.channels.append(width)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [F.relu(self.bn1(self.conv1(x)), inplace=True)]
        h = F.max_pool2d(feats[0], 3, 2, 1)
        for layer in self.layers:
            h = layer(h)
            feats.append(h)
        return feats


# ---------------------------------------------------------------- the U-Net
class UNetDecoder(nn.Module):
    """From the coarsest feature up: bilinear x2, concatenate the skip, double conv."""

    def __init__(self, channels: list[int], widths: list[int]):
        super().__init__()
        self.blocks = nn.ModuleList()
        cin = channels[-1]
        for skip, width in zip(reversed(channels[:-1]), widths):
            self.blocks.append(double_conv(cin + skip, width))
            cin = width
        self.out_channels = cin

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        h = feats[-1]
        for block, skip in zip(self.blocks, reversed(feats[:-1])):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], 1))
        return h


def build_encoder(encoder: str, cin: int, c: int) -> nn.Module:
    """The encoder named by a config's ``encoder`` (plain, dense, or a ResNet of RESNETS) for ``cin`` input
    channels and base width ``c``; its ``channels`` are its features' widths, finest first."""
    if encoder == "plain":
        return PlainEncoder(cin, c)
    if encoder == "dense":
        return DenseEncoder(cin, c)
    if encoder in RESNETS:
        return ResNetEncoder(cin, encoder)
    raise ValueError(f"unknown encoder {encoder!r}; known: plain, dense, {', '.join(RESNETS)}")


class GIUNetForSemanticSegmentation(PreTrainedModel):
    config_class = GIUNetConfig
    base_model_prefix = "unet"
    main_input_name = "pixel_values"

    def __init__(self, config: GIUNetConfig):
        super().__init__(config)
        self.encoder = build_encoder(config.encoder, config.num_channels, config.base_channels)
        ch = self.encoder.channels
        widths = [ch[i] for i in range(len(ch) - 2, -1, -1)] if config.encoder in ("plain", "dense") else \
            [256, 128, 64, 32]
        self.decoder = UNetDecoder(ch, widths)
        self.head = nn.Conv2d(self.decoder.out_channels, config.num_labels, 1)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                **kwargs) -> SemanticSegmenterOutput:
        logits = self.head(self.decoder(self.encoder(pixel_values)))
        if logits.shape[-2:] != pixel_values.shape[-2:]:  # ResNet stems stop at stride 2
            logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        return SemanticSegmenterOutput(logits=logits)


AutoConfig.register("gi_unet", GIUNetConfig, exist_ok=True)


AutoModelForSemanticSegmentation.register(GIUNetConfig, GIUNetForSemanticSegmentation, exist_ok=True)


def build_baseline(name: str, id2label: dict[int, str], base_channels: int = 32) -> PreTrainedModel:
    """A randomly initialised baseline for ``--base_model name`` (``base_channels``: the U-Nets' width)."""
    if name == "unext":
        return build_unext(id2label)
    config = GIUNetConfig(encoder=BASELINES[name], base_channels=base_channels, id2label=id2label,
                          label2id={v: k for k, v in id2label.items()})
    return GIUNetForSemanticSegmentation(config)
