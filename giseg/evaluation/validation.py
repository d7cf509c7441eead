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
    volume = segmenter.spec.patch() is not None  # whole volumes (this process's share), their slices scored
    with torch.no_grad():
        for batch in loader:
            masks = batch["mask"].flatten(0, -3).to(accelerator.device)  # a volume's (1, D, S, S): its D slices
            with accelerator.autocast():
                logits = segmenter.logits(batch["pixel_values"].to(accelerator.device))
            logits = upsample_like(logits.float(), masks.shape[-2:])
            n = masks.shape[0]
            loss_sum += loss_fn(logits, masks) * n
            count += n
            preds = segmenter.masks(logits, logits.shape[-2:]) & valid_pixels(masks)  # unlabelled: out
            batch_stats = mask_stats(preds, unpack_targets(masks, len(classes)))
            stats.append(batch_stats if volume else accelerator.gather_for_metrics(batch_stats))
    loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
    all_stats = (gather_slices(accelerator, torch.cat(stats)) if volume else torch.cat(stats)).cpu().numpy()
    model.train()
    return {**summarise(all_stats, empty_dice, classes), "val_loss": float(loss_sum / count.clamp_min(1)),
            "val_slices": int(len(all_stats))}


def gather_slices(accelerator, stats: torch.Tensor) -> torch.Tensor:
    """Every process's (n_p, ...) per-slice statistics, concatenated (the processes score different volumes, of
    different slice counts): padded to one length with -1 for the gather, the padding dropped after."""
    if accelerator.num_processes == 1:
        return stats
    padded = accelerator.pad_across_processes(stats, dim=0, pad_index=-1)
    gathered = accelerator.gather(padded)
    return gathered[(gathered.flatten(1) >= 0).all(1)]
