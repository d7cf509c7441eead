"""SegmentationModel: ``forward(pixel_values) -> (logits, aux logits)`` for every family, and what DDP needs.

The auxiliary head's output (UperNet, DPT, BEiT) is captured with a forward hook; a mask-classification model
(Mask2Former) returns per-class maps built from its queries, and its own matched loss given targets."""
from __future__ import annotations

import torch
from torch import nn

from giseg.data.masks import multiclass_targets, unpack_targets
from giseg.models.families import QUERY_FAMILIES
from giseg.models.tasks import get_task
from giseg.models.volume import patch_multiple
from giseg.models.widen import input_channels


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
    if not get_task(task).background:
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
    logits, aux = model(blank_input(model.hf, image_size, device))
    (logits.float().sum() + (aux.float().sum() if aux is not None else 0)).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in model.named_parameters():
        if n in unused:
            p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return unused


def blank_input(hf_model: nn.Module, image_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A zero input the model takes: (1, C, S, S), or for a 3D network its smallest patch, a cube."""
    shape = (image_size, image_size)
    if hf_model.config.model_type == "gi_volume":
        shape = (patch_multiple(hf_model.config)[1],) * 3
    return torch.zeros(1, input_channels(hf_model), *shape, device=device)


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
