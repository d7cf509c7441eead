"""One model path for training and inference: the inference spec saved with every model, and the Segmenter.

    segmenter = Segmenter.load("runs/<name>/best", device)          # model + its spec, checked
    for row, masks in segmenter.iter_masks(index, rows, cache, neighbours): ...   # (C, H, W) at original size

``InferenceSpec`` (``inference_spec.json`` beside the weights) says how the model sees its inputs and reads its
outputs: dataset, task, classes, image size, context slices and stride, normalisation, thresholds. It is read back
strictly: a missing file, key or a value out of range is refused with one line naming it. (Folders written before
the spec existed carried the same facts as ``gi_*`` config attributes; they are converted, and only when every
one of them is there.)

``Segmenter`` is the path from prepared images to masks that the trainer's evaluation, giseg predict, evaluation/figures.py
and the app share: input preparation (data/preprocess.py: the decode-once cache's own functions), forward (optionally
averaged with the flipped input's), logits upsampled bilinearly to any size (as the loss sees them), then the
spec's per-class probability thresholds on the sigmoid, or argmax over background + classes.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from giseg.data.cache import build_cache
from giseg.data.dataset import SliceDataset
from giseg.data.preprocess import body_box, crop_box, normalise_scan, prepare_scan, to_pixel_values
from giseg.data.volumes import neighbour_table
from giseg.inference.spec import SPEC_FILE, InferenceSpec
from giseg.models.tasks import get_task
from giseg.utils.errors import UserError


def masks_from_logits(logits: torch.Tensor, size: tuple[int, int], task: str,
                      thresholds: torch.Tensor | None) -> torch.Tensor:
    """(B, K, h, w) logits -> (B, C, H, W) bool masks at ``size``: logits upsampled bilinearly (as the loss sees
    them; upsampling probabilities instead scored 0.008 lower mean Dice on the demo), then sigmoid > per-class
    threshold (multilabel) or argmax over background + classes (multiclass; channel c is class c + 1)."""
    return get_task(task).masks(upsample_like(logits.float(), tuple(size)), thresholds, logits=True)


BACKENDS = ("eager", "compile", "onnxruntime")  # how the forward pass runs (predict --backend)


class Segmenter:
    """A model that returns ``(logits, aux)`` (model.SegmentationModel, or the same under DDP) with its spec."""

    def __init__(self, model: torch.nn.Module, spec: InferenceSpec, device: torch.device | None = None):
        self.model, self.spec = model, spec
        self.device = device or next(model.parameters()).device
        self.thresholds = torch.tensor(spec.thresholds, dtype=torch.float32, device=self.device)

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str = "cpu", allow_bin: bool = False,
             backend: str = "eager") -> "Segmenter":
        """A trained model folder (``save_pretrained`` + spec), in eval mode on ``device``: loaded without running
        its code or unpickling (models/safe.py), its spec checked against the model's own config and files.
        ``backend``: eager PyTorch; ``compile`` (torch.compile, inductor, on the first batches); ``onnxruntime``
        (the folder's model.onnx from giseg export-onnx, on the CPU whatever ``device``)."""
        if backend not in BACKENDS:
            raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        folder = Path(folder)
        if backend == "onnxruntime":
            return cls._load_onnx(folder)
        model, spec = load_trained(folder, "--model", allow_bin, presence=False)
        device = torch.device(device)
        model = model.to(device).eval()
        if backend == "compile":
            model.compile()  # in place: compiled on the first batch (and once more for a last, smaller batch)
        return cls(model, spec, device)

    @classmethod
    def _load_onnx(cls, folder: Path) -> "Segmenter":
        from giseg.inference.onnx_model import load_onnx_model  # onnxruntime: optional (the [onnx] extra)

        spec = InferenceSpec.load(folder)
        if not get_task(spec.task).segments:
            raise UserError(f"--model {folder} is a slice classifier (--task presence), not a segmenter: pass it as "
                            "--gate_model")
        if (folder / "config.json").is_file():
            try:
                check_spec_matches_model(spec, json.loads((folder / "config.json").read_text()), folder)
            except ValueError as e:
                raise UserError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
        return cls(load_onnx_model(folder, spec), spec, torch.device("cpu"))

    def logits(self, pixel_values: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """Logits at the model's output size; with ``tta`` averaged with those of the horizontally flipped input.
        A 3D model's (1, C, D, S, S) volume gives (D, K, S, S): its slices' logits (inference/volume.py)."""
        if self.spec.patch() is not None:
            from giseg.inference.volume import sliding_logits  # (MONAI: only for a 3D model)

            return sliding_logits(self.model, pixel_values, self.spec.patch(), self.spec.sw_overlap, tta)
        logits = self.model(pixel_values)[0]
        if tta:
            logits = 0.5 * (logits.float() + self.model(pixel_values.flip(-1))[0].float().flip(-1))
        return logits

    def masks(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, C, H, W) bool masks at ``size`` with the spec's thresholds (or argmax)."""
        return masks_from_logits(logits, size, self.spec.task, self.thresholds)

    def paste(self, logits: torch.Tensor, size: tuple[int, int], box=None) -> torch.Tensor:
        """(B, K, h, w) logits -> float32 logits at the slice's ``size``: upsampled bilinearly, or with a body crop
        ``box`` (y0, y1, x0, x1) upsampled to the box and pasted into a slice that is background elsewhere
        (multilabel: every class off; multiclass: the background wins)."""
        if box is None:
            return upsample_like(logits.float(), size)
        y0, y1, x0, x1 = (int(v) for v in box)
        full = torch.full((logits.shape[0], logits.shape[1], *size), -1e4, device=logits.device)
        if get_task(self.spec.task).background:
            full[:, 0] = 1e4
        full[..., y0:y1, x0:x1] = upsample_like(logits.float(), (y1 - y0, x1 - x0))
        return full

    def body_box(self, raw: np.ndarray):
        """--body_crop: the crop box of one raw slice on its own (the app's upload; a cache takes its volume's
        union), or None without a body crop."""
        if not self.spec.body_crop:
            return None
        scan = normalise_scan(raw)
        return crop_box(body_box(scan), scan.shape, self.spec.crop_margin)

    def prepare(self, raw_channels: list[np.ndarray], box=None) -> torch.Tensor:
        """Raw (H, W) scans of one slice (1, or its 2.5D neighbours) -> a (1, 3, S, S) input on the device,
        exactly as the decode-once cache and the data set prepare them (cut to ``box`` first: body_box)."""
        crop = None if box is None else (slice(box[0], box[1]), slice(box[2], box[3]))
        images = np.stack([prepare_scan(raw, self.spec.image_size, crop) for raw in raw_channels]).astype(np.float32)
        image = images[0] if len(images) == 1 else images.transpose(1, 2, 0)
        return torch.from_numpy(to_pixel_values(image, self.spec.mean, self.spec.std))[None].to(self.device)

    def prepare_volume(self, raw_slices: list[np.ndarray], box=None) -> torch.Tensor:
        """A 3D model's input: the raw (H, W) scans of a volume in slice order (with several image channels, each
        slice's in turn) -> (1, C, D, S, S) on the device, prepared as the cache prepares each slice."""
        crop = None if box is None else (slice(box[0], box[1]), slice(box[2], box[3]))
        images = np.stack([prepare_scan(raw, self.spec.image_size, crop) for raw in raw_slices]).astype(np.float32)
        m, size = self.spec.channels, self.spec.image_size
        volume = images.reshape(-1, m, size, size).transpose(1, 0, 2, 3)
        mean = np.asarray(self.spec.mean, np.float32)[:, None, None, None]
        std = np.asarray(self.spec.std, np.float32)[:, None, None, None]
        return torch.from_numpy(np.ascontiguousarray((volume - mean) / std))[None].to(self.device)

    @torch.no_grad()
    def _iter_logits(self, index: pd.DataFrame, rows: np.ndarray, cache, neighbours: np.ndarray, batch_size: int,
                     mixed_precision: str, tta: bool, num_workers: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(row, its (1, K, h, w) logits) for ``rows``, in order, batched (a 3D model: volume by volume)."""
        self.model.eval()
        if self.spec.patch() is not None:
            from giseg.inference.volume import iter_volume_logits  # (MONAI: only for a 3D model)

            yield from iter_volume_logits(self, index, rows, cache, mixed_precision, tta)
            return
        for batch_rows, logits in iter_batches(lambda x: self.logits(x, tta), self.spec, self.device, rows, cache,
                                               neighbours, batch_size, mixed_precision, num_workers):
            for k, r in enumerate(batch_rows):
                yield r, logits[k:k + 1]

    def iter_masks(self, index: pd.DataFrame, rows: np.ndarray, cache, neighbours: np.ndarray,
                   batch_size: int = 16, mixed_precision: str = "no", tta: bool = False,
                   num_workers: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (row, (C, H, W) bool masks at the slice's original size) for ``rows`` of ``index``, in order."""
        heights, widths = index["height"].to_numpy(), index["width"].to_numpy()
        boxes = getattr(cache, "boxes", None)
        for r, logits in self._iter_logits(index, rows, cache, neighbours, batch_size, mixed_precision, tta,
                                           num_workers):
            size = (int(heights[r]), int(widths[r]))
            logits = self.paste(logits, size, boxes[r] if boxes is not None else None)
            yield r, self.masks(logits, size)[0].cpu().numpy()

    def iter_probabilities(self, index: pd.DataFrame, rows: np.ndarray, cache, neighbours: np.ndarray,
                           batch_size: int = 16, mixed_precision: str = "no", tta: bool = False,
                           num_workers: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (row, (K, H, W) float32 probabilities at the slice's original size): the sigmoid per class
        (multilabel) or the softmax over background + classes (multiclass) of the bilinearly upsampled logits."""
        heights, widths = index["height"].to_numpy(), index["width"].to_numpy()
        boxes = getattr(cache, "boxes", None)
        for r, logits in self._iter_logits(index, rows, cache, neighbours, batch_size, mixed_precision, tta,
                                           num_workers):
            logits = self.paste(logits, (int(heights[r]), int(widths[r])), boxes[r] if boxes is not None else None)
            probs = get_task(self.spec.task).probabilities(logits)
            yield r, probs[0].cpu().numpy()


def load_trained(folder: Path, flag: str, allow_bin: bool, presence: bool) -> tuple[torch.nn.Module, InferenceSpec]:
    """A folder the trainer wrote, as (SegmentationModel, its spec), loaded without running its code or unpickling
    (models/safe.py), the spec checked against the model's own config, files and input channels. ``presence``: a
    slice classifier is wanted (AutoModelForImageClassification), else a segmenter; the other kind is refused
    with one line saying where it goes."""
    from giseg.models.families import auto_class  # transformers (2 s): --backend onnxruntime runs without it
    from giseg.models.safe import check_model_folder, loading_kwargs
    from giseg.models.widen import input_channels
    from giseg.models.wrapper import SegmentationModel

    kind = "trainer.py --task presence" if presence else "the trainer"
    if not (folder / "config.json").is_file():
        raise UserError(f"{flag} {folder}: no config.json; pass a folder written by {kind} (e.g. runs/<name>/best)")
    config = check_model_folder(folder, flag, allow_bin)
    spec = InferenceSpec.load(folder)
    segments = get_task(spec.task).segments
    if presence and segments:
        raise UserError(f"{flag} {folder} is a {spec.task} segmenter, not a slice classifier: train one with "
                        "trainer.py --task presence")
    if not presence and not segments:
        raise UserError(f"{flag} {folder} is a slice classifier (--task presence), not a segmenter: pass it as "
                        "--gate_model to gate a segmenter's masks")
    check_spec_matches_model(spec, config, folder)
    try:
        hf = auto_class(config.get("model_type", ""), presence).from_pretrained(folder, **loading_kwargs(allow_bin))
    except pickle.UnpicklingError as e:
        raise UserError(f"{flag} {folder}: its pickled weights were refused by torch.load(weights_only=True) "
                        f"({str(e).splitlines()[-1][:160]}); nothing in them ran. Use safetensors weights") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {folder}: not {'an image-classification' if presence else 'a segmentation'} model "
                        f"folder ({str(e).splitlines()[0]})") from None
    channels = input_channels(hf)
    if channels != len(spec.mean):
        raise UserError(f"{flag} {folder}: the model takes {channels} input channels but its spec prepares "
                        f"{len(spec.mean)} (context_slices {spec.context_slices}); the spec is not this model's")
    return SegmentationModel(hf), spec


@torch.no_grad()
def iter_batches(forward, spec: InferenceSpec, device: torch.device, rows: np.ndarray, cache, neighbours: np.ndarray,
                 batch_size: int, mixed_precision: str, num_workers: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(the batch's rows, ``forward`` of its inputs) for ``rows`` of the cache, in order: inputs prepared as the
    spec says (the data set's own path), autocast on a GPU with --mixed_precision. Segmenters and slice classifiers
    (inference/gate.py) share it."""
    ds = SliceDataset(cache, rows, neighbours, None, spec.mean, spec.std)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                     pin_memory=device.type == "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    for batch in dl:
        x = batch["pixel_values"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda"):
            out = forward(x)
        yield batch["index"].tolist(), out


def check_spec_matches_model(spec: InferenceSpec, config: dict, folder: Path) -> None:
    """The spec must describe this model: its labels (names and order) are the config's id2label, and its image
    size and normalisation are those of the folder's image processor (both written together by the trainer). A
    spec edited or copied from another model (classes permuted: labels swapped; another size) is refused."""
    where = f"{folder / SPEC_FILE}"
    id2label = config.get("id2label")
    if isinstance(id2label, dict):
        try:
            labels = [id2label[k] for k in sorted(id2label, key=int)]
        except (ValueError, TypeError):
            raise UserError(f"{folder}/config.json: id2label keys must be integers, got {sorted(id2label)}") from None
        if labels != list(spec.labels().values()):
            raise UserError(f"{where}: labels {list(spec.labels().values())} ({spec.task}) are not the model's own "
                            f"{labels} (config.json id2label, in output order); the spec is not this model's")
    for key in ("context_slices", "context_stride"):  # (recorded by models/load.save_model; older folders lack it)
        theirs = config.get(f"giseg_{key}")
        if theirs is not None and theirs != getattr(spec, key):
            raise UserError(f"{where}: {key} {getattr(spec, key)}, but the model was trained with {theirs} (config.json "
                            f"giseg_{key}); the spec is not this model's")
    proc_file = folder / "preprocessor_config.json"
    if proc_file.is_file():
        try:
            proc = json.loads(proc_file.read_text())
        except ValueError as e:
            raise UserError(f"{proc_file}: not valid JSON ({e})") from None
        size = (proc.get("size") or {}).get("height") if isinstance(proc.get("size"), dict) else proc.get("size")
        if isinstance(size, int) and size != spec.image_size:
            raise UserError(f"{where}: image_size {spec.image_size}, but the model was saved for {size} "
                            f"({proc_file.name}); the spec is not this model's")
        for key, mine in (("image_mean", spec.mean), ("image_std", spec.std)):
            theirs = proc.get(key)
            if isinstance(theirs, list) and len(theirs) == len(mine) and not np.allclose(theirs, mine, rtol=1e-4):
                raise UserError(f"{where}: {key.split('_')[1]} {list(mine)}, but the model was saved with {theirs} "
                                f"({proc_file.name}); the spec is not this model's")


def upsample_like(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (B, K, h, w) logits to ``size`` (no-op when already there)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def member_inputs(specs: list[InferenceSpec], adapter, index: pd.DataFrame, cache_dir, num_threads: int = 1,
                  caches: dict | None = None) -> list[tuple]:
    """For models of these ``specs``: each one's (decode-once cache at its image size and body crop, neighbour
    table of its 2.5D setting); the caches shared by size and crop (in ``caches``, across calls)."""
    caches = {} if caches is None else caches
    out = []
    for spec in specs:
        key = (spec.image_size, spec.crop())
        if key not in caches:
            caches[key] = build_cache(adapter, index, spec.image_size, cache_dir, num_threads=num_threads,
                                      crop_margin=spec.crop())
        out.append((caches[key], neighbour_table(index, spec.context_slices, spec.context_stride,
                                                 adapter.volume_columns, adapter.channels)))
    return out
