"""The model families: their input statistics, their Auto class, the image processor saved with a model.

Importing this module registers our own families (the CNN baselines, UNeXt, the encoder classifier) with the Auto
classes, so whatever gets its Auto class from ``auto_class`` loads a folder the trainer saved from any of them.
"""
from __future__ import annotations

from transformers import (
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
    AutoModelForUniversalSegmentation,
    SegformerImageProcessorPil,
)

import giseg.models.baselines  # noqa: F401  (registers gi_unet and gi_unext with the Auto classes)
import giseg.models.classifier  # noqa: F401  (registers gi_encoder with the Auto classes)
import giseg.models.volume  # noqa: F401  (registers gi_volume with the Auto classes; MONAI only when one is built)
from giseg.models.registry import FAMILIES

# the hub families' input statistics, by model_type (used when a checkpoint has no preprocessor config), and the
# mask-classification families (one mask per object query and a class per mask, trained with their own
# Hungarian-matched loss; not AutoModelForSemanticSegmentation models): both from the registry
FAMILY_STATS = {f.model_type: f.stats for f in FAMILIES.values() if f.kind == "hub"}
QUERY_FAMILIES = tuple(f.model_type for f in FAMILIES.values() if f.query)


def auto_class(model_type: str, presence: bool = False):
    """The Auto class that loads a ``model_type``: image classification for a slice classifier (``presence``), mask
    classification (Mask2Former) or semantic segmentation; our own families are registered with each."""
    if presence:
        return AutoModelForImageClassification
    return AutoModelForUniversalSegmentation if model_type in QUERY_FAMILIES else AutoModelForSemanticSegmentation


def make_image_processor(image_size: int, mean, std):
    """Resize to image_size and normalise; inputs are scans already scaled to [0, 1] (data.normalise_scan)."""
    return SegformerImageProcessorPil(size={"height": image_size, "width": image_size}, do_rescale=False,
                                      do_reduce_labels=False, image_mean=list(mean), image_std=list(std))
