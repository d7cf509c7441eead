"""The ONNX Runtime model that ``Segmenter`` runs in PyTorch's place, and what an export records.

    Segmenter.load("runs/<name>/best", backend="onnxruntime")    # the same path, the forward pass in ONNX Runtime

The export itself (giseg export-onnx) is inference/export.py.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from giseg.utils.errors import UserError

ONNX_FILE = "model.onnx"
WEIGHTS_KEY = "giseg_weights_sha256"


def weights_digest(folder: Path) -> str:
    """sha256 of the folder's weights (model.safetensors, or pytorch_model.bin), '' if it has none."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = folder / name
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            return h.hexdigest()
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


def load_onnx_model(folder: Path, threads: int = 0) -> OnnxModel:
    """The folder's model.onnx, refused when missing or exported from other weights than the folder's."""
    path = folder / ONNX_FILE
    if not path.is_file():
        raise UserError(f"--model {folder}: no {ONNX_FILE} for --backend onnxruntime; export it first: "
                        f"giseg export-onnx --model {folder}")
    model = OnnxModel(path, threads)
    exported, now = model.metadata.get(WEIGHTS_KEY, ""), weights_digest(folder)
    if now and exported != now:
        raise UserError(f"--model {folder}: {ONNX_FILE} was exported from other weights than the folder's own "
                        f"(sha256 {exported[:12] or 'not recorded'} vs {now[:12]}); export it again: "
                        f"giseg export-onnx --model {folder}")
    return model
