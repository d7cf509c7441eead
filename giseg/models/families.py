"""The model families: their input statistics, their Auto class, the image processor saved with a model."""
from __future__ import annotations

from transformers import AutoModelForSemanticSegmentation, AutoModelForUniversalSegmentation, SegformerImageProcessorPil

from giseg.data.preprocess import IMAGENET_MEAN, IMAGENET_STD

# Input statistics each family was pretrained with (used when the checkpoint has no preprocessor config).
FAMILY_STATS = {"segformer": (IMAGENET_MEAN, IMAGENET_STD),
                "upernet": (IMAGENET_MEAN, IMAGENET_STD),
                "dpt": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                "beit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                "mask2former": (IMAGENET_MEAN, IMAGENET_STD)}


# mask-classification families: one mask per object query and a class per mask, trained with their own
# Hungarian-matched loss; not AutoModelForSemanticSegmentation models
QUERY_FAMILIES = ("mask2former",)


def auto_class(model_type: str):
    """The Auto class that loads a ``model_type``: mask classification (Mask2Former) or semantic segmentation."""
    return AutoModelForUniversalSegmentation if model_type in QUERY_FAMILIES else AutoModelForSemanticSegmentation


def make_image_processor(image_size: int, mean, std):
    """Resize to image_size and normalise; inputs are scans already scaled to [0, 1] (data.normalise_scan)."""
    return SegformerImageProcessorPil(size={"height": image_size, "width": image_size}, do_rescale=False,
                                      do_reduce_labels=False, image_mean=list(mean), image_std=list(std))
