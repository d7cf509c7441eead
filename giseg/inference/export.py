"""ONNX export of a trained model folder (giseg export-onnx).

    export_onnx("runs/<name>/best")        # writes runs/<name>/best/model.onnx (logits of a (B, C, S, S) input)

What is exported is the forward pass alone, pixel values -> logits at the model's output size; preparation,
test-time flips, upsampling, thresholds, ensembles and post-processing stay the Segmenter's, shared with PyTorch.
Every family exports with the TorchScript-based exporter (``dynamo=False``: a second per model, against 10-15 s
and failures on BEiT and DPT for the dynamo exporter here); the batch dimension is dynamic. SegFormer takes any
image size (checked); the other families are exported at the spec's size, which is the only size the Segmenter
feeds them (at other sizes DPT's position-embedding grid and Mask2Former's Swin windows failed, and UperNet's and
BEiT's pyramid pooling is exported as fixed slices); a 3D model at its patch, the window its sliding window feeds. The export is refused when ONNX Runtime's logits
differ from PyTorch's by more than ``PARITY_TOLERANCE`` x max(1, the largest |logit|) on a random batch of another
size than the one traced. ``model.onnx`` records the sha256 of the weights it was exported from; a folder whose
weights have changed since is refused with the command that exports it again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from giseg.inference.onnx_model import ONNX_FILE, WEIGHTS_KEY, OnnxModel, weights_digest
from giseg.inference.segmenter import Segmenter
from giseg.inference.spec import InferenceSpec
from giseg.models.registry import FAMILIES
from giseg.utils.claims import claim_output_dir
from giseg.utils.errors import UserError
from giseg.utils.files import atomic_write_text, file_sha256

PARITY_TOLERANCE = 1e-4  # relative to max(1, the largest |logit|)
DYNAMIC_SIZE_FAMILIES = tuple(f.model_type for f in FAMILIES.values() if f.dynamic_size)  # (the registry's)
COPIED = ("inference_spec.json", "config.json", "preprocessor_config.json")  # what a separate --out needs


def _static_adaptive_avg_pool2d(x: torch.Tensor, output_size) -> torch.Tensor:
    """F.adaptive_avg_pool2d as slices and means at the traced size (the exporter cannot export PyTorch's when the
    output does not divide the input, as in UperNet's and BEiT's pyramid pooling): bin i of n inputs into o
    outputs spans [floor(i n / o), ceil((i + 1) n / o)), PyTorch's own rule."""
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    oh, ow = oh or h, ow or w
    rows = []
    for i in range(oh):
        h0, h1 = i * h // oh, -(-(i + 1) * h // oh)
        rows.append(torch.cat([x[..., h0:h1, j * w // ow:-(-(j + 1) * w // ow)].mean((-2, -1), keepdim=True)
                               for j in range(ow)], -1))
    return torch.cat(rows, -2)


@contextlib.contextmanager
def _exportable_pooling():
    original = F.adaptive_avg_pool2d
    F.adaptive_avg_pool2d = _static_adaptive_avg_pool2d
    try:
        yield
    finally:
        F.adaptive_avg_pool2d = original


class _Logits(torch.nn.Module):
    """SegmentationModel -> its logits alone (the auxiliary output is a training-time output)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)[0]


def parity(model: torch.nn.Module, onnx: OnnxModel, shape: tuple[int, ...], seed: int = 0) -> tuple[float, float]:
    """(max |ONNX Runtime - PyTorch| logit, max |PyTorch logit|) on a seeded random input of ``shape``."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(x).float()
    return float((onnx(x)[0] - ref).abs().max()), float(ref.abs().max())


def _deploy_folder(path: Path) -> bool:
    """A deploy folder an earlier export-onnx wrote (before the output mark): model.onnx and a spec, no weights."""
    return (path / ONNX_FILE).is_file() and (path / "inference_spec.json").is_file() and not any(
        path.glob("*.safetensors"))


def export_onnx(folder: str | Path, out: str | Path | None = None, opset: int = 17,
                allow_bin: bool = False) -> dict:
    """Export ``folder`` (a trained model folder) to ``out``/model.onnx (default: beside its weights), written
    atomically after the parity check; a separate ``out`` also gets the spec and configs. Returns a report."""
    try:
        import onnx
    except ImportError:
        raise UserError("giseg export-onnx needs the onnx package: pip install onnx onnxruntime (or giseg[onnx])") from None
    folder = Path(folder)
    out = Path(out) if out else folder
    if out.resolve() != folder.resolve():  # a deploy folder: ours, or new; never another model's or a data folder
        claim_output_dir(out, "--out", "export-onnx", {"--model": folder}, ours=_deploy_folder)
    segmenter = Segmenter.load(folder, "cpu", allow_bin)
    spec, family = segmenter.spec, segmenter.model.hf.config.model_type
    model = _Logits(segmenter.model).eval()
    channels, size = len(spec.mean), spec.image_size
    sample = (channels, *spec.patch()) if spec.patch() else (channels, size, size)  # a 3D model: its patch
    dynamic = {0: "batch", 2: "height", 3: "width"} if family in DYNAMIC_SIZE_FAMILIES else {0: "batch"}
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fd, tmp_name = tempfile.mkstemp(prefix=".model-", suffix=".onnx.tmp", dir=out)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _exportable_pooling(), torch.no_grad(), _quiet_exporter():
            torch.onnx.export(model, (torch.zeros(2, *sample),), str(tmp), input_names=["pixel_values"],
                              output_names=["logits"], dynamic_axes={"pixel_values": dynamic, "logits": dynamic},
                              opset_version=opset, dynamo=False)
        proto = onnx.load(str(tmp))
        for key, value in ((WEIGHTS_KEY, weights_digest(folder)), ("giseg_family", family),
                           ("giseg_image_size", str(size)), ("giseg_context_slices", str(spec.context_slices))):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
        seconds = time.perf_counter() - start
        runtime = OnnxModel(tmp)
        shapes = [(3, *sample)]  # another batch than the traced one
        if family in DYNAMIC_SIZE_FAMILIES:
            shapes.append((1, channels, size + 32, size - 32 if size > 32 else size + 64))
        worst = 0.0
        for k, shape in enumerate(shapes):
            diff, scale = parity(model, runtime, shape, seed=k)
            bound = PARITY_TOLERANCE * max(1.0, scale)
            if not diff <= bound:
                raise UserError(f"--model {folder}: ONNX Runtime's logits differ from PyTorch's by {diff:.3g} on a "
                                f"{shape} input (bound {bound:.3g}); not exported")
            worst = max(worst, diff / max(1.0, scale))
        os.replace(tmp, out / ONNX_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    if out.resolve() != folder.resolve():
        for name in COPIED:  # written atomically, as every output is (small JSON files)
            if (folder / name).is_file():
                atomic_write_text(out / name, (folder / name).read_text())
    # the spec beside model.onnx records that file: the ONNX backend runs no other one under it
    dataclasses.replace(InferenceSpec.load(out), onnx_sha256=file_sha256(out / ONNX_FILE)).save(out)
    return {"path": str(out / ONNX_FILE), "family": family, "image_size": size, "opset": opset,
            "dynamic": list(dynamic.values()), "export_s": seconds, "max_relative_difference": worst,
            "checked_shapes": shapes, "megabytes": (out / ONNX_FILE).stat().st_size / 1e6}


@contextlib.contextmanager
def _quiet_exporter():
    """The TorchScript exporter's deprecation and tracer warnings are about the exporter, not the user's model."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
