"""From probabilities to masks: thresholds, empty-slice gates and 3D connected components.

The steps a trained model's inference spec can carry (giseg tune chooses them on validation data; giseg predict applies
them), per class:
  threshold    multilabel: probability above which a pixel is the class (multiclass: argmax, no threshold)
  min_area     gate: a class predicted on less than this fraction of a slice's pixels is dropped from the slice
  min_prob     gate: a class whose highest probability on a slice is below this is dropped from the slice
  postprocess  per volume (a case-day): "none", "largest" (keep the largest 3D connected component) or "min:<N>"
               (drop the 3D connected components of fewer than N voxels, at the scans' original size)
Zero gates and "none" change nothing; a model folder without tuned values gets exactly that.
"""
from __future__ import annotations

import numpy as np
import torch

from giseg.models.tasks import get_task

POSTPROCESS = ("none", "largest", "min:<voxels>")  # the rules, as --help and errors name them


def valid_rule(rule: object) -> bool:
    return isinstance(rule, str) and (rule in ("none", "largest") or
                                      (rule.startswith("min:") and rule[4:].isdigit() and int(rule[4:]) > 0))


def masks_from_probabilities(probs: torch.Tensor | np.ndarray, task: str, thresholds) -> np.ndarray:
    """(..., K, H, W) probabilities -> (..., C, H, W) bool: p > threshold per class (multilabel), or the argmax
    over background + classes (multiclass: channel c is class c + 1)."""
    p = torch.as_tensor(probs)
    t = None if thresholds is None else torch.as_tensor(thresholds, dtype=p.dtype if p.is_floating_point() else
                                                        torch.float32)
    return get_task(task).masks(p, t, logits=False).numpy()


def class_probabilities(probs: np.ndarray, task: str) -> np.ndarray:
    """(..., K, H, W) -> (..., C, H, W): the classes' channels (multiclass: without the background)."""
    return get_task(task).class_channels(probs)


def gate(masks: np.ndarray, probs: np.ndarray, min_area, min_prob) -> np.ndarray:
    """Empty class c of a slice where its mask covers less than ``min_area[c]`` of the slice or its class
    probability never reaches ``min_prob[c]``. ``masks`` (..., C, H, W) bool, ``probs`` (..., C, H, W)."""
    min_area, min_prob = np.asarray(min_area, float), np.asarray(min_prob, float)
    if not (min_area > 0).any() and not (min_prob > 0).any():
        return masks
    area = masks.mean((-2, -1))
    peak = probs.max((-2, -1)).astype(float)
    keep = (area >= min_area) & (peak >= min_prob)
    return masks & keep[..., None, None]


def largest_component(volume: np.ndarray) -> np.ndarray:
    """(D, H, W) bool -> only its largest 3D connected component (faces touching; 6-connectivity)."""
    from scipy import ndimage

    labels, n = ndimage.label(volume)
    if n <= 1:
        return volume
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def drop_small_components(volume: np.ndarray, min_voxels: int) -> np.ndarray:
    """(D, H, W) bool -> without its 3D connected components (6-connectivity) of fewer than ``min_voxels``."""
    from scipy import ndimage

    labels, n = ndimage.label(volume)
    if n == 0:
        return volume
    keep = np.bincount(labels.ravel()) >= min_voxels
    keep[0] = False
    return keep[labels]


def apply_rule(volume: np.ndarray, rule: str) -> np.ndarray:
    """One class's (D, H, W) volume under ``rule`` (see the module's doc)."""
    if not valid_rule(rule):
        raise ValueError(f"unknown post-processing {rule!r}; known: {POSTPROCESS}")
    if rule == "largest":
        return largest_component(volume)
    if rule.startswith("min:"):
        return drop_small_components(volume, int(rule[4:]))
    return volume


def postprocess_volume(masks: np.ndarray, rules) -> np.ndarray:
    """(D, C, H, W) bool masks of one volume (its slices in order) with each class's rule applied."""
    out = masks.copy()
    for c, rule in enumerate(rules):
        out[:, c] = apply_rule(masks[:, c], rule)
    return out
