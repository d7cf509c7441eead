"""Export a trained model folder to ONNX, for ``giseg predict --backend onnxruntime`` and other ONNX runtimes.

    giseg export-onnx --model runs/<name>/best                  # writes runs/<name>/best/model.onnx
    giseg export-onnx --model runs/<name>/best --out deploy/    # model.onnx + inference_spec.json + configs

The graph is the model's forward pass: input ``pixel_values`` (B, C, S, S), float32, prepared as the inference spec
says (size, normalisation, 2.5D channels), output ``logits`` (B, K, h, w) at the model's output size; thresholds,
upsampling and post-processing are the spec's, applied by giseg predict. The batch is dynamic; SegFormer also takes
any height and width, the other families the spec's size. Before ``model.onnx`` is written, ONNX Runtime's logits
are compared with PyTorch's on a batch of another size (the bound, relative to the largest logit, is printed); a
model that would differ is refused. Every family exports: SegFormer, UperNet-ConvNeXt, DPT, BEiT, Mask2Former (its
per-class maps), the U-Nets and UNeXt.
"""
from __future__ import annotations

import argparse

from giseg.models.safe import ALLOW_BIN_HELP
from giseg.utils.exits import command
from giseg.utils.log import logger, quiet_third_party, setup_logging


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="giseg export-onnx", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained model folder (runs/<name>/best)")
    ap.add_argument("--out", default=None, help="folder for model.onnx and the spec (default: the model folder)")
    ap.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    ap.add_argument("--allow_bin", action="store_true", help=ALLOW_BIN_HELP)
    return ap


@command
def main(argv: list[str] | None = None) -> int:
    from giseg.inference.export import PARITY_TOLERANCE, export_onnx  # torch and onnx (2 s): not for --help

    args = build_parser().parse_args(argv)
    setup_logging(True)
    quiet_third_party()
    r = export_onnx(args.model, args.out, args.opset, args.allow_bin)
    logger.info("wrote %s (%.1f MB, %s, opset %d, dynamic %s) in %.1f s; ONNX Runtime vs PyTorch logits on %s: "
                "max difference %.2g x max(1, largest |logit|) (bound %g)", r["path"], r["megabytes"], r["family"],
                r["opset"], ", ".join(r["dynamic"]), r["export_s"], " and ".join(map(str, r["checked_shapes"])),
                r["max_relative_difference"], PARITY_TOLERANCE)
    return 0
