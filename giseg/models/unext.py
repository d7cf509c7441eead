"""UNeXt (Valanarasu and Patel, MICCAI 2022), written from the paper and its official implementation's layout.

    --base_model unext

A convolutional encoder of three stages (3x3 conv, BatchNorm, 2x2 max-pool, ReLU: 16, 32, 128 channels at strides
2, 4, 8), then two tokenised MLP stages (an overlapping 3x3 stride-2 patch embedding to 160 and 256 channels at
strides 16 and 32, each followed by a shifted-MLP block and LayerNorm), and a mirrored decoder: per stage a 3x3
conv, BatchNorm, bilinear x2, ReLU and the encoder feature of that stride added (the skip connection); the two
deepest decoder stages also run a shifted-MLP block. A shifted-MLP block is
``x + MLP(LayerNorm(x))`` where the MLP shifts channel groups along the height (5 groups, shifts -2..2), applies a
linear layer, a 3x3 depthwise convolution and GELU, shifts along the width, and applies a second linear layer.

It starts from random weights (no pretrained encoder) and is registered with the Auto classes like the U-Net
baselines: saved as safetensors + config.json, loaded by ``AutoModelForSemanticSegmentation.from_pretrained``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForSemanticSegmentation, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SemanticSegmenterOutput


class UNeXtConfig(PretrainedConfig):
    model_type = "gi_unext"

    def __init__(self, conv_channels: tuple[int, ...] = (16, 32, 128), token_channels: tuple[int, ...] = (160, 256),
                 shift_size: int = 5, mlp_ratio: float = 1.0, num_channels: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.conv_channels, self.token_channels = list(conv_channels), list(token_channels)
        self.shift_size, self.mlp_ratio, self.num_channels = shift_size, mlp_ratio, num_channels


def shift(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """Split the channels of (B, C, H, W) ``x`` into ``groups`` and move group g by g - groups // 2 pixels along
    ``dim`` (2: height, 3: width), zeros coming in at the border."""
    pad = groups // 2
    padded = F.pad(x, (pad, pad, pad, pad))
    moved = torch.cat([torch.roll(c, s, dim) for c, s in zip(torch.chunk(padded, groups, 1), range(-pad, pad + 1))], 1)
    return moved[:, :, pad:pad + x.shape[2], pad:pad + x.shape[3]]


class ShiftedMLP(nn.Module):
    """Shift along H, linear, depthwise 3x3 conv, GELU, shift along W, linear; on (B, N, C) tokens of an H x W map."""

    def __init__(self, dim: int, hidden: int, groups: int):
        super().__init__()
        self.groups = groups
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        def to_map(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)

        x = shift(to_map(tokens), self.groups, 2).flatten(2).transpose(1, 2)
        x = F.gelu(self.dwconv(to_map(self.fc1(x))))
        x = shift(x, self.groups, 3).flatten(2).transpose(1, 2)
        return self.fc2(x)


class ShiftedBlock(nn.Module):
    """x + ShiftedMLP(LayerNorm(x)), then the stage's LayerNorm, on a (B, C, H, W) map."""

    def __init__(self, dim: int, mlp_ratio: float, groups: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = ShiftedMLP(dim, int(dim * mlp_ratio), groups)
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        tokens = self.out_norm(tokens + self.mlp(self.norm(tokens), h, w))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class PatchEmbed(nn.Module):
    """Overlapping patches: 3x3 conv with stride 2, then LayerNorm over channels."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout))


class UNeXtForSemanticSegmentation(PreTrainedModel):
    config_class = UNeXtConfig
    base_model_prefix = "unext"
    main_input_name = "pixel_values"

    def __init__(self, config: UNeXtConfig):
        super().__init__(config)
        c1, c2, c3 = config.conv_channels
        t1, t2 = config.token_channels
        blocks = dict(mlp_ratio=config.mlp_ratio, groups=config.shift_size)
        self.encoder = nn.ModuleList([conv_bn(config.num_channels, c1), conv_bn(c1, c2), conv_bn(c2, c3)])
        self.embed = nn.ModuleList([PatchEmbed(c3, t1), PatchEmbed(t1, t2)])
        self.token_blocks = nn.ModuleList([ShiftedBlock(t1, **blocks), ShiftedBlock(t2, **blocks)])
        # decoder, deepest first: 256 -> 160 (+ block) -> 128 (+ block) -> 32 -> 16 -> 16
        self.decoder = nn.ModuleList([conv_bn(t2, t1), conv_bn(t1, c3), conv_bn(c3, c2), conv_bn(c2, c1)])
        self.decoder_blocks = nn.ModuleList([ShiftedBlock(t1, **blocks), ShiftedBlock(c3, **blocks)])
        self.last = nn.Conv2d(c1, c1, 3, padding=1)
        self.head = nn.Conv2d(c1, config.num_labels, 1)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                **kwargs) -> SemanticSegmenterOutput:
        skips, x = [], pixel_values
        for stage in self.encoder:  # strides 2, 4, 8
            x = F.relu(F.max_pool2d(stage(x), 2))
            skips.append(x)
        for embed, block in zip(self.embed, self.token_blocks):  # strides 16, 32
            x = block(embed(x))
            skips.append(x)
        skips.pop()  # the stride-32 map is the bottleneck, not a skip
        for k, stage in enumerate(self.decoder):  # back to strides 16, 8, 4, 2
            x = F.relu(F.interpolate(stage(x), scale_factor=2, mode="bilinear", align_corners=False)) + skips.pop()
            if k < len(self.decoder_blocks):
                x = self.decoder_blocks[k](x)
        x = F.relu(F.interpolate(self.last(x), scale_factor=2, mode="bilinear", align_corners=False))
        return SemanticSegmenterOutput(logits=self.head(x))


AutoConfig.register("gi_unext", UNeXtConfig, exist_ok=True)


AutoModelForSemanticSegmentation.register(UNeXtConfig, UNeXtForSemanticSegmentation, exist_ok=True)


def build_unext(id2label: dict[int, str]) -> UNeXtForSemanticSegmentation:
    """A randomly initialised UNeXt of the paper's configuration for ``id2label``."""
    return UNeXtForSemanticSegmentation(UNeXtConfig(id2label=id2label, label2id={v: k for k, v in id2label.items()}))
