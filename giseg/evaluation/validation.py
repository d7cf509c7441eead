"""The evaluation during training: validation loss and every metric per class, one host transfer each time."""
from __future__ import annotations

import torch

from giseg.data.masks import unpack_targets, valid_pixels
from giseg.evaluation.metrics import mask_stats, summarise
from giseg.inference.segmenter import Segmenter, upsample_like


# ---------------------------------------------------------------- evaluation
def evaluate(segmenter: Segmenter, loader, loss_fn, accelerator, empty_dice: str) -> dict[str, float]:
    """Validation loss, every METRICS figure per class and its mean, and the number of slices. Per-slice
    statistics stay on the device, gathered across processes without counting padded samples twice: one host
    transfer per evaluation. Masks come from the same Segmenter path as giseg predict's."""
    model, classes = segmenter.model, segmenter.spec.classes
    model.eval()
    stats = []
    loss_sum = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    with torch.no_grad():
        for batch in loader:
            with accelerator.autocast():
                logits = segmenter.logits(batch["pixel_values"])
            logits = upsample_like(logits.float(), batch["mask"].shape[-2:])
            n = batch["mask"].shape[0]
            loss_sum += loss_fn(logits, batch["mask"]) * n
            count += n
            preds = segmenter.masks(logits, logits.shape[-2:]) & valid_pixels(batch["mask"])  # unlabelled: out
            stats.append(accelerator.gather_for_metrics(mask_stats(preds, unpack_targets(batch["mask"], len(classes)))))
    loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
    all_stats = torch.cat(stats).cpu().numpy()
    model.train()
    return {**summarise(all_stats, empty_dice, classes), "val_loss": float(loss_sum / count.clamp_min(1)),
            "val_slices": int(len(all_stats))}
