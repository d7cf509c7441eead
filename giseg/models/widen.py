"""Input widening (--context_slices 5, 7 ...; images of several channels): the first convolution takes more (or,
for two channels, fewer) channels, its pretrained weights shared out so that the output is unchanged."""
from __future__ import annotations

import torch
from torch import nn

from giseg.utils.errors import UserError


def channel_sources(channels: int) -> list[int]:
    """For an input of ``channels`` slices (odd; offsets -k..k around the centre), the pretrained RGB channel each
    one takes its weights and statistics from: 0 below the centre, 1 the centre, 2 above (3 -> [0, 1, 2])."""
    half = channels // 2
    return [0 if j < half else 1 if j == half else 2 for j in range(channels)]


def input_mixing(channels: int, modalities: int = 1) -> torch.Tensor:
    """(channels, 3): how much of each pretrained RGB filter an input channel gets; every column sums to 1, so the
    same image in every channel gives the 3-channel model's output. One image channel (``modalities`` 1): the
    channels are slices, each the share of its source (channel_sources). Several (an input of ``channels`` //
    ``modalities`` slices, each with its ``modalities`` image channels, slice-major): a slice's rows as above (one
    slice: all of RGB) divided among its image channels."""
    context = channels // modalities
    if modalities == 1:
        src = torch.tensor(channel_sources(channels))
        share = torch.bincount(src, minlength=3).float()[src]
        return torch.nn.functional.one_hot(src, 3).float() / share[:, None]
    per_slice = torch.ones(1, 3) if context == 1 else input_mixing(context)
    return per_slice.repeat_interleave(modalities, dim=0) / modalities


def widen_channels(values, channels: int, modalities: int = 1) -> tuple:
    """A 3-channel mean or std as ``channels`` values: each channel's source (channel_sources); with several image
    channels and one slice, the mean of the three."""
    if modalities > 1 and channels == modalities:
        return (sum(values) / len(values),) * channels
    context = channels // modalities
    return tuple(values[src] for src in channel_sources(context) for _ in range(modalities))


def _config_with_channels(config):
    """The config whose ``num_channels`` builds the input layer (the backbone's, for UperNet and Mask2Former)."""
    backbone = getattr(config, "backbone_config", None)
    return backbone if backbone is not None and hasattr(backbone, "num_channels") else config


def input_channels(hf_model: nn.Module) -> int:
    return int(getattr(_config_with_channels(hf_model.config), "num_channels", 3))


def widen_input(hf_model: nn.Module, channels: int, modalities: int = 1) -> str:
    """Give the model's first 3-channel convolution ``channels`` input channels (slices, times ``modalities`` image
    channels each): each new channel takes its share of the pretrained RGB weights (input_mixing), so an input with
    the same image in every channel (normalised with widen_channels' statistics) gives the 3-channel model's output
    (exactly for one image channel); the pretrained weights are kept. Sets ``num_channels`` in the config, so the
    saved folder loads with the Auto class. Returns the layer's name."""
    conv = next(((name, m) for name, m in hf_model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3),
                None)
    if conv is None:
        raise UserError(f"--context_slices {channels}: no 3-channel input convolution found in this "
                        f"{hf_model.config.model_type} model to widen")
    name, old = conv
    mixing = input_mixing(channels, modalities).to(old.weight.dtype)  # (channels, 3)
    new = nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation, old.groups,
                    old.bias is not None, old.padding_mode, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        if modalities == 1:  # (the same as the mixing, in the division it has always been computed with)
            src = torch.tensor(channel_sources(channels))
            share = torch.bincount(src, minlength=3).to(old.weight.dtype)[src].view(1, -1, 1, 1)
            new.weight.copy_(old.weight[:, src] / share)
        else:
            new.weight.copy_(torch.einsum("oshw,ts->othw", old.weight, mixing.to(old.weight.device)))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    parent, _, attr = name.rpartition(".")
    setattr(hf_model.get_submodule(parent) if parent else hf_model, attr, new)
    _config_with_channels(hf_model.config).num_channels = channels
    for m in hf_model.modules():  # embeddings that check the channel count of their input
        if getattr(m, "num_channels", None) == 3:
            m.num_channels = channels
    return name
