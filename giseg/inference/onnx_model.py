"""The ONNX Runtime model that ``Segmenter`` runs in PyTorch's place, and what an export records.

    Segmenter.load("runs/<name>/best", backend="onnxruntime")    # the same path, the forward pass in ONNX Runtime

The export itself (giseg export-onnx) is inference/export.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from giseg.utils.errors import UserError
from giseg.utils.files import file_sha256

ONNX_FILE = "model.onnx"
WEIGHTS_KEY = "giseg_weights_sha256"


def weights_digest(folder: Path) -> str:
    """sha256 of the folder's weights (model.safetensors, or pytorch_model.bin), '' if it has none."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return file_sha256(folder / name)
    return ""


class OnnxModel:
    """``model.onnx`` in ONNX Runtime on the CPU, called as a SegmentationModel is: ``(logits, None)``."""

    def __init__(self, path: Path, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("--backend onnxruntime needs ONNX Runtime: pip install onnxruntime (or giseg[onnx])") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one thread per physical core
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.metadata = self.session.get_modelmeta().custom_metadata_map

    def __call__(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = np.ascontiguousarray(pixel_values.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(None, {self.input: x})[0]), None

    def eval(self) -> "OnnxModel":
        return self

    def train(self, mode: bool = True) -> "OnnxModel":
        return self


def load_onnx_model(folder: Path, spec, threads: int = 0) -> OnnxModel:
    """The folder's model.onnx, checked against what the folder declares before it runs: the file the spec records
    (its sha256; a deploy folder has no weights to compare), a readable ONNX model, the image size and input layout
    it was exported with, and the folder's weights where they are present. Each mismatch is one line."""
    path = folder / ONNX_FILE
    now = weights_digest(folder)
    again = (f"export it again: giseg export-onnx --model {folder}" if now else
             f"export it again: giseg export-onnx --model <the trained model folder> --out {folder}")
    if not path.is_file():
        raise UserError(f"--model {folder}: no {ONNX_FILE} for --backend onnxruntime; export it first: "
                        f"giseg export-onnx --model {folder}")
    on_disk = file_sha256(path) if spec.onnx_sha256 else ""
    if on_disk != (spec.onnx_sha256 or ""):
        raise UserError(f"--model {folder}: {ONNX_FILE} is not the file exported with this spec (sha256 "
                        f"{on_disk[:12]} on disk, {spec.onnx_sha256[:12]} in {folder.name}/inference_spec.json:"
                        f" another model's, or damaged); {again}")
    try:
        model = OnnxModel(path, threads)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- onnxruntime's own errors: a truncated or foreign file
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"--model {folder}: {ONNX_FILE} is not a readable ONNX model ({type(e).__name__}: {reason}); "
                        f"{again}") from None
    for key, want in (("giseg_image_size", spec.image_size), ("giseg_context_slices", spec.context_slices)):
        got = model.metadata.get(key)
        if got is not None and got != str(want):
            raise UserError(f"--model {folder}: {ONNX_FILE} was exported with {key.removeprefix('giseg_')} {got}, the "
                            f"spec says {want}; the spec is not this model's")
    exported = model.metadata.get(WEIGHTS_KEY, "")
    if now and exported != now:
        raise UserError(f"--model {folder}: {ONNX_FILE} was exported from other weights than the folder's own "
                        f"(sha256 {exported[:12] or 'not recorded'} vs {now[:12]}); {again}")
    return model
