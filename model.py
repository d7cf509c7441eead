"""The model: a pretrained Hugging Face segmentation checkpoint with a new head for our classes.

    python model.py make-tiny --family segformer --out demo/models/tiny-segformer    (= giseg make-tiny ...)

How it is built (the code lives in giseg/models/):

    loaded = load_model("nvidia/segformer-b0-finetuned-ade-512-512", "multilabel", classes)   # models/load.py
        AutoModelForSemanticSegmentation.from_pretrained(<hub id or folder>, id2label=..., ignore_mismatched_sizes=True,
        trust_remote_code=False): everything loads except the decode/auxiliary head classifiers, re-initialised for
        our labels and reported; --context_slices 5+ widens the first convolution (models/widen.py)
    model = SegmentationModel(loaded.model)       # forward(pixel_values) -> (logits, aux logits); models/wrapper.py
    save_model(model.hf, "runs/x/best", spec)     # save_pretrained (safetensors) + image processor + inference spec

Families: SegFormer, UperNet-ConvNeXt, DPT, BEiT and any other AutoModelForSemanticSegmentation family; Mask2Former
(models/families.py); CNN baselines trained from scratch: unet, unet-resnet34, unet-resnext50, dense-unet
(models/baselines.py) and unext (models/unext.py).
"""
from __future__ import annotations

import sys

from giseg.models.load import LoadedModel, load_model, save_model  # noqa: F401  (the model's public API)
from giseg.models.tiny import make_tiny  # noqa: F401
from giseg.models.wrapper import SegmentationModel  # noqa: F401

if __name__ == "__main__":
    from giseg.commands import make_tiny as make_tiny_command

    args = sys.argv[1:]
    if args[:1] != ["make-tiny"]:
        print("usage: python model.py make-tiny --family FAMILY --out DIR [--width N] [--seed N]", file=sys.stderr)
        sys.exit(2)
    sys.exit(make_tiny_command.main(args[1:]))
