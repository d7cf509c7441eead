"""Fine-tune a Hugging Face segmentation model on UW-Madison GI-tract MRI (or any --dataset adapter) with Accelerate.

Single process:   python trainer.py --base_model <hub id or folder> --data_dir <kaggle folder> --output_dir runs/x
Several GPUs:     accelerate launch --multi_gpu --num_processes 2 trainer.py ...   (or GPUS=0,1 bash run_train.sh)

Writes to --output_dir: run_config.json, train.log, metrics.jsonl (one JSON object per evaluation), best/ and
last/ (save_pretrained folders that AutoModelForSemanticSegmentation / AutoImageProcessor load, with the
inference_spec.json that predict.py reads) and checkpoints/step_<N>/ (accelerator state for
--resume_from_checkpoint latest).

The loop reads top to bottom in train(): build_run (data, model, loaders, optimizer), then per epoch
train_one_epoch (training_step per batch, after_optimizer_step per optimizer step) and end_epoch (evaluate, best
model, early stopping, saving).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters import DATASETS, DatasetAdapter, datasets_help, get_adapter
from cache import SliceCache, build_cache
from data import check_fold, check_volume_sizes, neighbour_table, split_by_case
from dataset import SliceDataset
from ema import WeightEMA
from hf_data import dataset_options
from inference import TASKS, Ensemble, InferenceSpec, Segmenter
from losses import LOSSES, SegmentationLoss, upsample_like
from masks import classes_present, unpack_targets, valid_pixels
from metrics import EMPTY_RULES, describe, mask_stats, summarise
from predict import predict_rows, write_submission
from score import format_table, score_predictions, submission_to_wide
from tracking import LOG_FOLDER as TRACKER_FOLDER
from tracking import log_record, parse_report_to
from tracking import start as start_trackers
from utils import (FolderLock, UserError, atomic_write_json, atomic_write_text, command, json_safe, logger,
                   quiet_third_party, recover_replaced, release_memory, replace_dir, setup_logging, storage_guard)

# transformers (model.py), accelerate and albumentations are imported where they are used: together they cost
# about 3 s of start-up that `--help` and a rejected argument do not need.

OPTIMIZERS = ("AdamW", "Adam", "SGD")
SCHEDULERS = ("MultiStepLR", "cosine", "poly", "constant")


@dataclass
class TrainConfig:
    # model and data
    base_model: str = field(default="demo/models/tiny-segformer", metadata={
        "help": "hub id (e.g. nvidia/segformer-b0-finetuned-ade-512-512) or local folder of a SegFormer, "
                "UperNet-ConvNeXt, DPT, BEiT or Mask2Former checkpoint (or any AutoModelForSemanticSegmentation "
                "family); its decode/auxiliary/class heads are replaced. Or a CNN baseline trained from scratch: unet, unet-resnet34, "
                "unet-resnext50, dense-unet (baselines.py), unext (unext.py)"})
    data_dir: str = field(default="demo/data", metadata={
        "help": "gi: folder in the Kaggle layout (train.csv + train/); lgg: the kaggle_3m folder"})
    dataset: str = field(default="gi", metadata={"help": datasets_help, "choices": lambda: tuple(DATASETS)})
    image_column: str = field(default="", metadata={"help": "--dataset hf: the image column (default: image, else "
                                                             "pixel_values)"})
    label_column: str = field(default="", metadata={
        "help": "--dataset hf: the label-map column, a class index per pixel (default: label, else annotation; "
                "without one, mask_<class> columns are multi-label masks)"})
    reduce_labels: bool = field(default=False, metadata={
        "help": "--dataset hf: label 0 becomes 255 (unlabelled: left out of loss and metrics) and every other "
                "label v becomes v - 1, as the HF example's --do_reduce_labels"})
    hf_split: str = field(default="train", metadata={"help": "--dataset hf: the split to train on (folds are made "
                                                             "inside it)"})
    case_column: str = field(default="case", metadata={
        "help": "--dataset hf: the column that groups images into cases for the case-level folds (without it "
                "each image is its own case)"})
    output_dir: str = field(default="runs/demo", metadata={"help": "where models, metrics and checkpoints go"})
    task: str = field(default="multilabel", metadata={
        "help": "multilabel: a sigmoid channel per class, classes may overlap; multiclass: softmax over background + "
                "classes, overlaps resolved by the dataset's priority (GI: stomach > large_bowel > small_bowel)",
        "choices": TASKS})
    image_size: int = field(default=288, metadata={"help": "square training size in pixels (multiple of 32)"})
    context_slices: int = field(default=1, metadata={
        "help": "1: the slice repeated into 3 channels; 3: 2.5D, slices -stride, 0, +stride of the same case-day; "
                "5, 7 ...: more neighbours, the model's first layer widened to take them (its pretrained weights "
                "shared out so that its output is unchanged for the same image in every channel)"})
    context_stride: int = field(default=2, metadata={"help": "slice distance of the 2.5D neighbours"})
    empty_slice_fraction: float = field(default=-1.0, metadata={
        "help": "share of organ-free slices among each epoch's training slices, drawn anew every epoch, e.g. 0.1; "
                "0: train only on slices that show a class (as the 1st-place solution, which gated empty slices); "
                "-1: every training slice, as the data has them"})
    strong_aug: bool = field(default=False, metadata={"help": "add elastic/grid/optical distortion, blur, gamma"})
    n_folds: int = field(default=5, metadata={"help": "number of case-level folds"})
    fold: int = field(default=0, metadata={"help": "validation fold, in [0, n_folds); -1: train on every case with no "
                                                   "validation set (a final model; best/ is the last epoch's)"})
    split_seed: int = field(default=42, metadata={"help": "seed of the case-to-fold assignment"})
    cache_dir: str = field(default="cache", metadata={"help": "decode-once cache of resized scans and masks"})
    verify_cache: bool = field(default=False, metadata={
        "help": "check every block of the cache against its checksums before use (default: sizes and a sample)"})
    # optimisation (flag names of the reference project)
    epochs: int = field(default=15, metadata={"help": "training epochs"})
    train_batch_size: int = field(default=8, metadata={"help": "batch size per process"})
    eval_batch_size: int = field(default=16, metadata={"help": "validation batch size per process"})
    lr: float = field(default=6e-5, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "weight decay"})
    optimizer: str = field(default="AdamW", metadata={"help": "optimizer", "choices": OPTIMIZERS})
    scheduler_name: str = field(default="cosine", metadata={
        "help": "MultiStepLR (x lr_gamma at lr_milestones epochs), cosine, poly (power 1.0) or constant; all "
                "after --warmup_steps of linear warm-up", "choices": SCHEDULERS})
    lr_milestones: str = field(default="", metadata={
        "help": "MultiStepLR epochs, comma-separated (default: 60%% and 85%% of --epochs)"})
    lr_gamma: float = field(default=0.1, metadata={"help": "MultiStepLR decay factor"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up optimizer steps"})
    max_train_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: epochs decide)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    mixed_precision: str = field(default="no", metadata={"help": "autocast on GPU", "choices": ("no", "fp16", "bf16")})
    seed: int = field(default=42, metadata={"help": "seed of weights init, shuffling and augmentation"})
    ema_decay: float = field(default=0.0, metadata={
        "help": "exponential moving average of the weights, updated after every optimizer step, e.g. 0.999 (0: off); "
                "evaluation, best/ and last/ use the average, which every resumable state holds"})
    # loss and metric
    loss: str = field(default="bce_dice", metadata={
        "help": "bce_dice (BCE/CE + soft Dice), bce, dice, focal (focal + Dice) or tversky (BCE/CE + Tversky)",
        "choices": LOSSES})
    focal_gamma: float = field(default=2.0, metadata={"help": "focal loss gamma"})
    tversky_alpha: float = field(default=0.3, metadata={"help": "Tversky weight of false positives"})
    tversky_beta: float = field(default=0.7, metadata={"help": "Tversky weight of false negatives"})
    pixel_loss_weight: float = field(default=1.0, metadata={
        "help": "weight of the per-pixel term: BCE (multilabel), cross-entropy (multiclass) or focal (--loss focal); "
                "--bce_weight is the old name", "aliases": ("--bce_weight",)})
    dice_weight: float = field(default=1.0, metadata={"help": "weight of the overlap term: soft Dice, or Tversky"})
    aux_weight: float = field(default=0.4, metadata={
        "help": "weight of the auxiliary head's loss (UperNet, DPT, BEiT); 0 removes the auxiliary head"})
    threshold: float = field(default=0.5, metadata={
        "help": "sigmoid threshold of multilabel predictions, every class (saved with the model for predict.py)"})
    empty_dice: str = field(default="1", metadata={
        "help": "Dice of a slice-class pair whose prediction and truth are both empty: 1 (1st-place solution, "
                "default), 0 (competition text) or skip (left out of the mean, as a public grader does)",
        "choices": EMPTY_RULES})
    # running
    num_workers: int = field(default=-1, metadata={
        "help": "data-loader worker processes per training process; -1: 0 on CPU (workers would take cores from "
                "the model; the cached pipeline is cheap), min(8, cores per process) on GPU"})
    log_every: int = field(default=10, metadata={"help": "log train loss / lr / images per second every N steps"})
    save_every_steps: int = field(default=0, metadata={"help": "also save a resumable state every N steps (0: epochs only)"})
    save_total_limit: int = field(default=2, metadata={
        "help": "resumable states kept (each: weights + optimizer moments, 12 bytes per parameter with AdamW)"})
    save_last: bool = field(default=True, metadata={
        "help": "write last/ after every evaluation besides best/ (4 bytes per parameter); false: best/ only"})
    resume_from_checkpoint: str = field(default="", metadata={
        "help": "'latest' (newest state under output_dir/checkpoints) or a checkpoint folder"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "allow starting over in a used output_dir"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the checkpoint (off)"})
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    channels_last: bool = field(default=False, metadata={
        "help": "channels-last memory format for model and inputs (often faster for ConvNeXt/UperNet on GPU)"})
    early_stopping_patience: int = field(default=0, metadata={
        "help": "stop when the validation mean Dice has not improved for this many evaluations (0: off)"})
    final_eval: bool = field(default=False, metadata={
        "help": "after training, predict the validation fold with best/ at original scan sizes and score it "
                "(val_submission.csv, val_scores.json: Dice, IoU, 3D Hausdorff, competition score, time saved)"})
    # the Hugging Face ecosystem
    report_to: str = field(default="none", metadata={
        "help": "experiment trackers through Accelerate, comma-separated: tensorboard, wandb, mlflow, trackio; all "
                "(every one installed) or none. They get the figures of metrics.jsonl at the same steps and the run "
                "config; files under output_dir/trackers"})
    push_to_hub: bool = field(default=False, metadata={
        "help": "upload best/ (with its model card) to --hub_model_id at the end; the run never fails for it"})
    hub_model_id: str = field(default="", metadata={"help": "the Hub repo of --push_to_hub, e.g. me/segformer-gi"})
    hub_private: bool = field(default=False, metadata={"help": "create the --hub_model_id repo private"})


def build_parser() -> argparse.ArgumentParser:
    """The CLI, one option per TrainConfig field (help, default and choices from the field's metadata; callables
    there are evaluated now, so a dataset registered before this call is a choice)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        meta = {k: v() if callable(v) else v for k, v in f.metadata.items()}
        help_, aliases = meta.pop("help", ""), meta.pop("aliases", ())
        if f.type in ("bool", bool):  # --flag, --flag true, --flag false
            ap.add_argument(f"--{f.name}", *aliases, type=parse_bool, nargs="?", const=True, default=f.default,
                            metavar="true|false", help=f"{help_} (default: {str(f.default).lower()})")
            continue
        typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        ap.add_argument(f"--{f.name}", *aliases, dest=f.name, type=typ, default=f.default,
                        help=f"{help_} (default: {f.default!r})", **meta)
    return ap


def parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def validate_config(cfg: TrainConfig) -> None:
    """Reject arguments out of range with a message naming the flag."""
    checks = [
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (cfg.train_batch_size >= 1, f"--train_batch_size must be >= 1, got {cfg.train_batch_size}"),
        (cfg.eval_batch_size >= 1, f"--eval_batch_size must be >= 1, got {cfg.eval_batch_size}"),
        (cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}"),
        (cfg.image_size >= 32 and cfg.image_size % 32 == 0,
         f"--image_size must be a positive multiple of 32 (the models downsample by 32), got {cfg.image_size}"),
        (cfg.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1"),
        (cfg.weight_decay >= 0, f"--weight_decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.warmup_steps >= 0, f"--warmup_steps must be >= 0, got {cfg.warmup_steps}"),
        (cfg.max_train_steps >= 0, f"--max_train_steps must be >= 0, got {cfg.max_train_steps}"),
        (cfg.num_workers >= -1, f"--num_workers must be >= 0, or -1 for automatic, got {cfg.num_workers}"),
        (cfg.log_every >= 1, f"--log_every must be >= 1, got {cfg.log_every}"),
        (0 < cfg.threshold < 1, f"--threshold must be in (0, 1), got {cfg.threshold}"),
        (cfg.aux_weight >= 0 and cfg.pixel_loss_weight >= 0 and cfg.dice_weight >= 0, "loss weights must be >= 0"),
        (cfg.pixel_loss_weight + cfg.dice_weight > 0, "--pixel_loss_weight and --dice_weight cannot both be 0"),
        (cfg.context_slices >= 1 and cfg.context_slices % 2 == 1,
         f"--context_slices must be odd: 1, 3, 5 ..., got {cfg.context_slices}"),
        (cfg.empty_slice_fraction == -1 or 0 <= cfg.empty_slice_fraction < 1,
         f"--empty_slice_fraction must be in [0, 1), or -1 for all slices, got {cfg.empty_slice_fraction}"),
        (0 <= cfg.ema_decay < 1, f"--ema_decay must be in [0, 1) (0: off), got {cfg.ema_decay}"),
        (cfg.early_stopping_patience >= 0, f"--early_stopping_patience must be >= 0, got {cfg.early_stopping_patience}"),
        (cfg.focal_gamma >= 0 and cfg.tversky_alpha >= 0 and cfg.tversky_beta >= 0,
         "--focal_gamma, --tversky_alpha and --tversky_beta must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    if cfg.fold == -1:
        if cfg.final_eval or cfg.early_stopping_patience:
            raise UserError("--fold -1 trains on every case with no validation set: --final_eval and "
                            "--early_stopping_patience need one (cv.py gives the cross-validated figures)")
        check_fold(0, cfg.n_folds)
    else:
        check_fold(cfg.fold, cfg.n_folds)
    get_adapter(cfg.dataset)
    parse_report_to(cfg.report_to)
    if cfg.push_to_hub and not cfg.hub_model_id:
        raise UserError("--push_to_hub needs --hub_model_id <owner/name>")
    if cfg.lr_milestones and not re.fullmatch(r"\d+(,\d+)*", cfg.lr_milestones):
        raise UserError(f"--lr_milestones must be comma-separated epochs like 6,9, got {cfg.lr_milestones!r}")


def lr_factor(step: int, total: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` of ``total``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.scheduler_name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.scheduler_name == "poly":
        return 1.0 - progress
    if cfg.scheduler_name == "MultiStepLR":
        milestones = ([int(m) for m in cfg.lr_milestones.split(",")] if cfg.lr_milestones
                      else [int(0.6 * cfg.epochs), int(0.85 * cfg.epochs)])
        return cfg.lr_gamma ** sum(step >= m * steps_per_epoch for m in milestones)
    return 1.0


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "AdamW":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")
    if cfg.optimizer == "Adam":
        return torch.optim.Adam(groups, lr=cfg.lr, fused=device.type == "cuda")
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)


def should_stop_early(history: list[dict], best_step: int, patience: int) -> bool:
    """True when ``patience`` > 0 evaluations came after the best one (none of them better)."""
    return patience > 0 and sum(r["step"] > best_step for r in history) >= patience


# ---------------------------------------------------------------- checkpoints
@dataclass
class TrainState:
    """Where a run stands; saved as trainer_state.json in every checkpoint."""
    run_id: str = ""  # the run's identity (run_config.json has the same); "" in checkpoints of older versions
    global_step: int = 0
    epoch: int = 0  # the epoch in progress (0-based)
    batches_in_epoch: int = 0  # batches of that epoch already trained
    epoch_loss_sum: float = 0.0  # their training losses, summed (averaged over processes)
    evaluated_step: int = 0  # the step of the last evaluation whose record is in metrics.jsonl (0: none)
    best_dice: float = -1.0
    best_step: int = -1


STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"  # --ema_decay: the average, in every resumable state
RESUMABLE_MARK = ".resumable"  # written once the run's first checkpoint is complete


def _step_dirs(root: Path) -> list[Path]:
    found = (p for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name))
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def checkpoint_problem(path: Path, run_id: str) -> str | None:
    """None when ``path`` is a complete checkpoint of run ``run_id``, else what is wrong with it."""
    try:
        raw = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return f"no readable {STATE_FILE}"
    files = raw.get("files")
    if not isinstance(files, dict):
        if run_id:  # checkpoints of older versions carry neither a file list nor a run id
            return f"{STATE_FILE} has no file list"
        files = {}
    for name, size in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{name} is {'missing' if not f.is_file() else 'truncated'}"
    if run_id and raw.get("run_id") != run_id:
        return f"it belongs to run {raw.get('run_id') or '(unknown)'}, not to run {run_id} of this output_dir"
    return None


def read_state(path: Path) -> TrainState:
    raw = json.loads((path / STATE_FILE).read_text())
    known = {f.name for f in dataclasses.fields(TrainState)}
    raw.setdefault("evaluated_step", raw["global_step"])  # older versions kept the metrics rows up to the state's step
    return TrainState(**{k: v for k, v in raw.items() if k in known})


def find_checkpoint(output_dir: Path, spec: str, run_id: str, notes: list[str]) -> Path | None:
    """'latest' -> the newest complete checkpoint of run ``run_id`` under output_dir/checkpoints (None if there is
    none; incomplete ones are skipped with a note); otherwise the given folder, which must be one."""
    if spec == "latest":
        for path in reversed(_step_dirs(output_dir / "checkpoints")):
            problem = checkpoint_problem(path, run_id)
            if problem is None:
                return path
            notes.append(f"skipped checkpoint {path}: {problem}")
        return None
    path = Path(spec)
    problem = checkpoint_problem(path, run_id) if path.is_dir() else "not a folder"
    if problem is not None:
        raise UserError(f"--resume_from_checkpoint {spec}: {problem}; use 'latest' or a complete folder under "
                        f"{output_dir / 'checkpoints'}")
    return path


def save_checkpoint(accelerator, output_dir: Path, state: TrainState, keep: int,
                    ema: WeightEMA | None = None) -> Path:
    """Accelerator state + trainer_state.json (with the size of every file, so an incomplete copy is never used)
    to checkpoints/step_<N>, via a temporary folder and utils.replace_dir; older ones beyond ``keep`` are removed
    only after this one is complete."""
    root = output_dir / "checkpoints"
    final = root / f"step_{state.global_step:08d}"
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    with storage_guard(tmp, "a resumable state"):
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.save(tmp / EMA_FILE)
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        atomic_write_json(tmp / STATE_FILE, {**dataclasses.asdict(state), "files": files})
        replace_dir(tmp, final)
        if not (output_dir / RESUMABLE_MARK).exists():
            atomic_write_text(output_dir / RESUMABLE_MARK, f"{state.run_id}\n")
        older = [p for p in _step_dirs(root) if int(p.name.split("_")[1]) < state.global_step]
        for p in older[:max(0, len(older) - (keep - 1))] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------- evaluation
def evaluate(segmenter: Segmenter, loader, loss_fn, accelerator, empty_dice: str) -> dict[str, float]:
    """Validation loss, every METRICS figure per class and its mean, and the number of slices. Per-slice
    statistics stay on the device, gathered across processes without counting padded samples twice: one host
    transfer per evaluation. Masks come from the same Segmenter path as predict.py's."""
    model, classes = segmenter.model, segmenter.spec.classes
    model.eval()
    stats = []
    loss_sum = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    with torch.no_grad():
        for batch in loader:
            with accelerator.autocast():
                logits = segmenter.logits(batch["pixel_values"])
            logits = upsample_like(logits.float(), batch["mask"].shape[-2:])
            n = batch["mask"].shape[0]
            loss_sum += loss_fn(logits, batch["mask"]) * n
            count += n
            preds = segmenter.masks(logits, logits.shape[-2:]) & valid_pixels(batch["mask"])  # unlabelled: out
            stats.append(accelerator.gather_for_metrics(mask_stats(preds, unpack_targets(batch["mask"], len(classes)))))
    loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
    all_stats = torch.cat(stats).cpu().numpy()
    model.train()
    return {**summarise(all_stats, empty_dice, classes), "val_loss": float(loss_sum / count.clamp_min(1)),
            "val_slices": int(len(all_stats))}


def final_evaluation(run: "Run") -> dict:
    """Predict the validation fold with best/ at original sizes, write val_submission.csv and val_scores.json."""
    cfg, out, d = run.cfg, run.output_dir, run.data
    segmenter = Segmenter.load(out / "best", run.accelerator.device)
    index = d.index
    if not run.adapter.has_labels(index):  # load_data dropped the codes once the cache held the masks: read again
        index = run.adapter.build_index(cfg.data_dir)
        if not index["id"].equals(d.index["id"]):
            raise UserError(f"--final_eval: {cfg.data_dir} changed during the run (its slices differ from those "
                            "trained on); score best/ with score.py")
    sub = predict_rows(Ensemble([segmenter]), index, d.val_rows, [(d.cache, d.neighbours)], run.adapter.volume_columns,
                       cfg.eval_batch_size, cfg.mixed_precision)
    write_submission(sub, out / "val_submission.csv")
    classes = segmenter.spec.classes
    overall, per_case = score_predictions(run.adapter, index, submission_to_wide(sub, classes=classes),
                                          cfg.empty_dice)
    atomic_write_json(out / "val_scores.json", {**overall, "per_case": per_case.to_dict("records"),
                                                "empty_dice": cfg.empty_dice})
    for line in format_table(overall, per_case, classes).splitlines():
        logger.info("final eval | %s", line)
    logger.info("final eval (best/, original sizes): dice mean %.4f, hausdorff %.4f, score %.4f -> %s",
                overall["dice_mean"], overall["hausdorff"], overall["score"], out / "val_scores.json")
    return overall


# ---------------------------------------------------------------- signals
class Interrupted(Exception):
    """SIGTERM / SIGINT arrived; a resumable state was saved."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopSignal:
    """Remembers SIGTERM / SIGINT so the loop can finish its step and save; a second SIGINT kills at once."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("received %s: finishing the current step, then saving a resumable state",
                       signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def agreed_signal(accelerator, signum: int, step: int, log_every: int) -> int:
    """The signal every rank acts on: one process decides alone; several agree at each log step (a collective
    every log interval, not every step), or as soon as one of them has a signal (it waits for the others)."""
    if accelerator.num_processes == 1:
        return signum
    if step % log_every and not signum:
        return 0
    flag = torch.tensor(float(signum), device=accelerator.device)
    return int(accelerator.reduce(flag, "max").item())


# ---------------------------------------------------------------- building a run
@dataclass
class Data:
    index: Any  # the adapter's slice index (pandas DataFrame)
    train_rows: np.ndarray
    val_rows: np.ndarray
    cache: SliceCache
    neighbours: np.ndarray


@dataclass
class Run:
    """What train() builds once and the loop's parts share."""
    cfg: TrainConfig
    accelerator: Any
    output_dir: Path
    adapter: DatasetAdapter
    data: Data
    spec: InferenceSpec
    model: torch.nn.Module  # SegmentationModel, prepared by Accelerate
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_dl: Any
    val_dl: Any
    loss_fn: SegmentationLoss
    total_steps: int
    state: TrainState = field(default_factory=TrainState)
    history: list[dict] = field(default_factory=list)
    stop: bool = False  # max_train_steps reached, or early stopping
    query_based: bool = False  # a mask-classification model (Mask2Former), trained with its own loss
    family: str = ""  # the model family (model.py), for the model cards
    trackers: list = field(default_factory=list)  # --report_to, parsed
    ema: WeightEMA | None = None  # --ema_decay: the average that evaluation and the saved models use
    ema_source: torch.nn.Module | None = None  # the unwrapped model it follows


# What a resume must share with the run it continues: everything that changes what is trained, on which slices,
# in which order, or how it is scored. The rest (MAY_CHANGE_ON_RESUME) may differ; the README lists both.
RUN_IDENTITY = ("base_model", "data_dir", "dataset", "task", "image_size", "context_slices", "context_stride",
                "strong_aug", "n_folds", "fold", "split_seed", "seed", "train_batch_size", "gradient_accumulation_steps",
                "optimizer", "lr", "weight_decay", "scheduler_name", "lr_milestones", "lr_gamma", "warmup_steps",
                "max_grad_norm", "mixed_precision", "loss", "focal_gamma", "tversky_alpha", "tversky_beta",
                "pixel_loss_weight", "dice_weight", "aux_weight", "threshold", "empty_dice", "image_column",
                "label_column", "reduce_labels", "hf_split", "case_column", "ema_decay", "empty_slice_fraction",
                "world_size")
MAY_CHANGE_ON_RESUME = ("output_dir", "epochs", "max_train_steps", "eval_batch_size", "num_workers", "log_every",
                        "save_every_steps", "save_total_limit", "save_last", "resume_from_checkpoint",
                        "overwrite_output_dir", "cache_dir", "verify_cache", "trust_remote_code", "torch_compile",
                        "channels_last", "early_stopping_patience", "final_eval", "report_to", "push_to_hub",
                        "hub_model_id", "hub_private")
# what a run writes into its output_dir: a fresh start clears these and nothing else
RUN_ARTEFACTS = ("run_config.json", RESUMABLE_MARK, "metrics.jsonl", "train.log", "best", "last", "checkpoints",
                 TRACKER_FOLDER,
                 "val_submission.csv", "val_scores.json")


def _resolved(values: dict) -> dict:
    """Local paths resolved (the same folder named two ways is one; a saved run has them under "resolved", as
    they were at its start); hub ids stay as they are."""
    now = {k: os.path.realpath(values[k]) for k in ("base_model", "data_dir")
           if isinstance(values.get(k), str) and os.path.exists(values[k])}
    return {**values, **now, **values.get("resolved", {})}


def run_identity(cfg: TrainConfig, world_size: int) -> dict:
    """The RUN_IDENTITY values of ``cfg``."""
    values = _resolved({**dataclasses.asdict(cfg), "world_size": world_size})
    return {k: values[k] for k in RUN_IDENTITY}


def check_resume_matches(saved: dict, now: dict, where: Path) -> None:
    """Refuse a resume whose identity differs from the saved run's, naming every argument (old and new value)."""
    saved = _resolved(saved)
    differ = [f"--{k} was {saved[k]!r}, now {now[k]!r}" for k in RUN_IDENTITY if k in saved and saved[k] != now[k]]
    if differ:
        name = {"world_size": "number of processes"}
        differ = [d.replace("--world_size", name["world_size"]) for d in differ]
        raise UserError(f"cannot resume {where}: {'; '.join(differ)}. Resume with the run's values, or start a new run "
                        "(--overwrite_output_dir, or another --output_dir)")


def clear_run(output_dir: Path) -> list[str]:
    """Start over in ``output_dir``: the previous run's artefacts are moved into one hidden folder (a rename each;
    run_config.json first, so a half-cleared folder never looks like a run) and then deleted; a kill midway leaves
    a `.previous-run.tmp` that the next start deletes. Returns the names that were there."""
    present = [n for n in RUN_ARTEFACTS if (output_dir / n).exists()]
    if present:
        trash = output_dir / ".previous-run.tmp"
        trash.mkdir(exist_ok=True)
        for name in present:
            os.replace(output_dir / name, trash / name)
        shutil.rmtree(trash)
    return present


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); move it away, or pass --overwrite_output_dir to start over") from None


def _decide_start(cfg: TrainConfig, output_dir: Path, world_size: int, notes: list[str]):
    """(checkpoint to resume or None, run id, saved run_config or None): a resume checked against the saved run,
    a refusal, or a fresh start in a cleared folder. Main process only, with the output_dir lock held."""
    notes += recover_replaced(output_dir) + recover_replaced(output_dir / "checkpoints")
    resume = None
    saved_file = output_dir / "run_config.json"
    saved = _read_json(saved_file) if saved_file.exists() else None
    run_id = (saved or {}).get("run_id", "")
    explicit = cfg.resume_from_checkpoint not in ("", "latest")
    if explicit and saved is None:
        raise UserError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint}: --output_dir {output_dir} holds "
                        "no run (no run_config.json); resume in the run's own output_dir")
    found = (find_checkpoint(output_dir, cfg.resume_from_checkpoint if explicit else "latest", run_id, notes)
             if saved else None)
    resumable = found is not None
    if saved and not resumable and (output_dir / RESUMABLE_MARK).exists() and not cfg.overwrite_output_dir:
        raise UserError(f"--output_dir {output_dir} holds a run whose checkpoints are gone (deleted?); nothing to "
                        "resume. Pass --overwrite_output_dir to start over, or choose another --output_dir")
    if cfg.resume_from_checkpoint and resumable:
        check_resume_matches(saved, run_identity(cfg, world_size), output_dir)
        resume = found
    elif saved and resumable and not cfg.overwrite_output_dir:
        raise UserError(f"--output_dir {output_dir} already holds a run; pass --resume_from_checkpoint latest to "
                        "continue it, --overwrite_output_dir to start over, or choose another --output_dir")
    else:
        if saved and not resumable and not cfg.overwrite_output_dir:
            notes.append("the previous start in this folder saved no resumable state: starting over")
        elif cfg.resume_from_checkpoint == "latest":
            notes.append(f"no checkpoint under {output_dir / 'checkpoints'}: starting from the beginning")
        cleared = clear_run(output_dir)
        if cleared:
            notes.append(f"removed the previous run's {', '.join(cleared)}")
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(4).hex()}"
        saved = None
    return resume, run_id, saved


@dataclass
class OutputDir:
    path: Path
    run_id: str
    resume: Path | None  # the checkpoint to resume; None: a fresh run
    lock: FolderLock | None  # held by the main process until the run ends


def open_output_dir(cfg: TrainConfig, accelerator) -> OutputDir:
    """Claim --output_dir for this process (refused while a live run holds it), finish or undo interrupted saves,
    decide between a fresh start and a resume (checked against the saved run), start the log and write
    run_config.json."""
    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file; pass a folder")
    notes: list[str] = []
    resume, run_id, lock, saved = None, "", None, None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(output_dir, os.W_OK | os.X_OK):
            raise UserError(f"--output_dir {output_dir} is not writable; fix its permissions or choose another folder")
        lock = FolderLock(output_dir / ".lock", wait=False)
        try:
            lock.acquire()
        except BlockingIOError:
            raise UserError(f"--output_dir {output_dir} is in use by a live run (pid {lock.holder()}); wait for it to "
                            "end, stop it, or choose another --output_dir") from None
        try:
            resume, run_id, saved = _decide_start(cfg, output_dir, accelerator.num_processes, notes)
        except BaseException:
            lock.release()
            raise
    accelerator.wait_for_everyone()
    setup_logging(accelerator.is_main_process, output_dir / "train.log")
    logger.info("start: %s", " ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
    for note in notes:
        logger.info("output_dir: %s", note)
    logger.info("config: %s", json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    defaults = TrainConfig()
    changed = [f"--{k} {v}" for k, v in dataclasses.asdict(cfg).items() if v != getattr(defaults, k)]
    logger.info("settings: %s; everything else is trainer.py's default (python trainer.py --help)",
                " ".join(changed) or "none given")
    logger.info("world size %d, device %s, mixed precision %s, torch %s", accelerator.num_processes,
                accelerator.device, accelerator.mixed_precision, torch.__version__)
    logger.info("Dice rule: an empty prediction on an empty truth scores %s (--empty_dice)",
                {"1": "1", "0": "0", "skip": "nothing (pair skipped)"}[cfg.empty_dice])
    if accelerator.is_main_process:
        identity = run_identity(cfg, accelerator.num_processes)
        record = {**dataclasses.asdict(cfg), "world_size": accelerator.num_processes, "run_id": run_id,
                  "resolved": {k: identity[k] for k in ("base_model", "data_dir")}}
        if saved is not None:  # a resume: the identity stays, the rest is what this start runs with
            record["resumes"] = [*saved.get("resumes", []), {"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                              "from": str(resume)}]
        atomic_write_json(output_dir / "run_config.json", record)
    shared = [run_id, str(resume) if resume else ""]
    if accelerator.num_processes > 1:  # the other ranks learn what the main process decided
        from accelerate.utils import broadcast_object_list
        broadcast_object_list(shared)
    return OutputDir(output_dir, shared[0], Path(shared[1]) if shared[1] else None, lock)


def load_data(cfg: TrainConfig, adapter: DatasetAdapter, accelerator) -> Data:
    """Index, case-level split and decode-once cache: built by each machine's first process while the machine's
    others wait (on a --cache_dir that several machines share, the cache's lock lets one build and the rest find
    it)."""
    with accelerator.local_main_process_first():
        index = adapter.build_index(cfg.data_dir)
        if cfg.fold == -1:  # every case trains
            train_rows, val_rows = np.arange(len(index)), np.arange(0)
        else:
            train_rows, val_rows = split_by_case(index, cfg.fold, cfg.n_folds, cfg.split_seed)
        if cfg.final_eval:  # checked now, not after all epochs
            check_volume_sizes(index, adapter.volume_columns, f"{cfg.data_dir} (--final_eval scores whole volumes)")
        cache = build_cache(adapter, index, cfg.image_size, cfg.cache_dir, num_threads=os.cpu_count() or 1,
                            verify=cfg.verify_cache)
    # the cache holds the masks now: drop the codes, and give back what reading them took (the training process and
    # each data-loader worker forked from it would otherwise grow with the dataset)
    index = adapter.without_labels(index)
    release_memory()
    neighbours = neighbour_table(index, cfg.context_slices, cfg.context_stride, adapter.volume_columns)
    if cfg.fold == -1:
        logger.info("data: %d slices, %d cases from %s (%s); --fold -1: all of them train, no validation set",
                    len(index), index["case"].nunique(), cfg.data_dir, adapter.name)
        return Data(index, train_rows, val_rows, cache, neighbours)
    val_cases = sorted(index["case"].iloc[val_rows].unique())
    logger.info("data: %d slices, %d cases from %s (%s); fold %d/%d: train %d slices (%d cases), val %d slices "
                "(cases %s)", len(index), index["case"].nunique(), cfg.data_dir, adapter.name, cfg.fold, cfg.n_folds,
                len(train_rows), index["case"].iloc[train_rows].nunique(), len(val_rows), ",".join(map(str, val_cases)))
    if len(val_rows) == 0 or len(train_rows) == 0:
        raise UserError(f"fold {cfg.fold} leaves the {'validation' if len(val_rows) == 0 else 'training'} set empty")
    # the truth as the evaluation sees it (the cache, at --image_size): the floor is in the log's own terms
    shown = classes_present(cache.masks, val_rows, len(adapter.classes))
    nothing = np.stack([np.zeros_like(shown), np.zeros_like(shown), shown], axis=-1).astype(float)
    logger.info("floor: predicting nothing scores mean Dice %.4f on this validation set (--empty_dice %s); read the "
                "evaluations against it", summarise(nothing, cfg.empty_dice, adapter.classes)["dice_mean"],
                cfg.empty_dice)
    return Data(index, train_rows, val_rows, cache, neighbours)


def build_model(cfg: TrainConfig, adapter: DatasetAdapter, processes: int) -> tuple[torch.nn.Module, InferenceSpec, str]:
    """The checkpoint with a new head for the adapter's classes, wrapped to return (logits, aux), the inference
    spec saved with it, and its family. Under DDP (``processes`` > 1) gradients are put in their parameters'
    layout."""
    from model import SegmentationModel, freeze_unused_parameters, load_model, match_gradient_layout

    loaded = load_model(cfg.base_model, cfg.task, adapter.classes, cfg.aux_weight, cfg.trust_remote_code,
                        in_channels=max(3, cfg.context_slices))
    n_params = sum(p.numel() for p in loaded.model.parameters())
    logger.info("model: %s (%s), %.2fM parameters, task %s, labels %s", cfg.base_model, loaded.family, n_params / 1e6,
                cfg.task, list(loaded.model.config.id2label.values()))
    logger.info("re-initialised for our labels: %s", "; ".join(loaded.reinitialised) or "nothing (head already fits)")
    logger.info("input normalisation: mean %s, std %s (%s)", list(loaded.mean), list(loaded.std), loaded.stats_source)
    spec = InferenceSpec(dataset=adapter.name, task=cfg.task, classes=adapter.classes, image_size=cfg.image_size,
                         context_slices=cfg.context_slices, context_stride=cfg.context_stride, mean=loaded.mean,
                         std=loaded.std, thresholds=(cfg.threshold,) * len(adapter.classes)
                         if cfg.task == "multilabel" else (),
                         split={"n_folds": cfg.n_folds, "fold": cfg.fold, "split_seed": cfg.split_seed},
                         dataset_options=adapter.options or None)
    if cfg.task == "multiclass" and cfg.threshold != TrainConfig.threshold:
        logger.warning("--threshold %g is ignored: a multiclass model takes the argmax over background and classes",
                       cfg.threshold)
    model = SegmentationModel(loaded.model)
    frozen = freeze_unused_parameters(model)
    if frozen:
        logger.info("frozen %d parameter tensors the architecture never uses: %s", len(frozen),
                    ", ".join(n.removeprefix("hf.") for n in frozen[:4]) + (" ..." if len(frozen) > 4 else ""))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if processes > 1:  # only DDP compares layouts; one process needs no hook per parameter per step
        match_gradient_layout(model)
    if cfg.torch_compile:
        model = torch.compile(model)
    return model, spec, loaded.family


def make_loaders(cfg: TrainConfig, data: Data, spec: InferenceSpec, device: torch.device, processes: int):
    from augment import train_transform

    rows, pool, draws = data.train_rows, None, 0
    if cfg.empty_slice_fraction >= 0:
        shown = classes_present(data.cache.masks, data.train_rows, len(spec.classes)).any(1)
        rows, pool = data.train_rows[shown], data.train_rows[~shown]
        f = cfg.empty_slice_fraction
        draws = min(len(pool), round(f / (1 - f) * len(rows)))
        logger.info("training slices per epoch: the %d that show a class + %d of the %d organ-free ones, drawn anew "
                    "each epoch (--empty_slice_fraction %g; the data has %.1f%% organ-free)", len(rows), draws,
                    len(pool), f, 100 * len(pool) / max(1, len(data.train_rows)))
        if len(rows) + draws == 0:
            raise UserError("--empty_slice_fraction: no training slice shows a class; use -1")
    train_ds = SliceDataset(data.cache, rows, data.neighbours, train_transform(cfg.image_size, cfg.strong_aug, cfg.seed),
                            spec.mean, spec.std, cfg.seed, draw_from=pool, draws=draws)
    val_ds = SliceDataset(data.cache, data.val_rows, data.neighbours, None, spec.mean, spec.std) \
        if len(data.val_rows) else None
    workers = cfg.num_workers
    if workers < 0:
        workers = min(8, (os.cpu_count() or 1) // processes) if device.type == "cuda" else 0
    loader_kw = dict(num_workers=workers, pin_memory=device.type == "cuda",
                     persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    # each loader draws its iterators' seeds from its own generator, not from the global RNG that dropout uses: a
    # run resumed mid-epoch (a new iterator after the RNG state was restored) then replays the same dropout masks
    train_dl = torch.utils.data.DataLoader(train_ds, batch_size=cfg.train_batch_size, shuffle=True,
                                           drop_last=len(train_ds) >= 2 * cfg.train_batch_size,
                                           generator=torch.Generator().manual_seed(cfg.seed), **loader_kw)
    val_dl = torch.utils.data.DataLoader(val_ds, batch_size=cfg.eval_batch_size, shuffle=False,
                                         generator=torch.Generator().manual_seed(cfg.seed), **loader_kw) \
        if val_ds is not None else None
    return train_dl, val_dl


def build_run(cfg: TrainConfig, accelerator, out: OutputDir) -> Run:
    """Data, model, loaders, optimizer, schedule and loss, prepared by Accelerate; restored from ``out.resume``."""
    adapter = get_adapter(cfg.dataset).bind(cfg.data_dir, dataset_options(cfg))
    data = load_data(cfg, adapter, accelerator)
    model, spec, family = build_model(cfg, adapter, accelerator.num_processes)
    train_dl, val_dl = make_loaders(cfg, data, spec, accelerator.device, accelerator.num_processes)
    optimizer = make_optimizer(cfg, model, accelerator.device)
    if val_dl is not None:
        model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)
    else:  # --fold -1
        model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    steps_per_epoch = math.ceil(len(train_dl) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_train_steps or cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg, steps_per_epoch))
    accelerator.register_for_checkpointing(scheduler)
    loss_fn = SegmentationLoss(cfg.task, adapter.classes, adapter.priority, cfg.pixel_loss_weight, cfg.dice_weight,
                               loss=cfg.loss, focal_gamma=cfg.focal_gamma, tversky_alpha=cfg.tversky_alpha,
                               tversky_beta=cfg.tversky_beta, unlabelled=adapter.may_have_unlabelled)
    run = Run(cfg, accelerator, out.path, adapter, data, spec, model, optimizer, scheduler, train_dl, val_dl, loss_fn,
              total_steps, state=TrainState(run_id=out.run_id))
    run.query_based = getattr(accelerator.unwrap_model(model), "query_based", False)
    run.family = family
    if cfg.ema_decay:
        if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
            raise UserError(f"--ema_decay is not supported with {accelerator.distributed_type.value} (sharded "
                            "weights); use DDP, or leave it at 0")
        run.ema_source = accelerator.unwrap_model(model)
        run.ema = WeightEMA(run.ema_source, cfg.ema_decay)
        logger.info("EMA of the weights: decay %g after every optimizer step; evaluation, best/ and last/ use it",
                    cfg.ema_decay)
    if out.resume is not None:
        accelerator.load_state(str(out.resume))
        if run.ema is not None:
            if not (out.resume / EMA_FILE).is_file():
                raise UserError(f"{out.resume}: no {EMA_FILE} (the run had no --ema_decay?); resume with its settings")
            run.ema.load(out.resume / EMA_FILE)
        run.state = read_state(out.resume)
        run.state.run_id = out.run_id  # (a checkpoint of an older version has none)
        metrics_file = run.output_dir / "metrics.jsonl"
        if metrics_file.exists():  # the evaluations this state knows of; later rows (written after it) are redone
            run.history = [r for r in map(json.loads, metrics_file.read_text().splitlines())
                           if r["step"] <= run.state.evaluated_step]
        logger.info("resumed from %s: step %d, epoch %d, batch %d of that epoch, best mean Dice %.4f", out.resume,
                    run.state.global_step, run.state.epoch + 1, run.state.batches_in_epoch, run.state.best_dice)
    logger.info("training: %d epochs x %d steps (%d total), batch %d x %d processes x %d accumulation, lr %g %s",
                cfg.epochs, steps_per_epoch, total_steps, cfg.train_batch_size, accelerator.num_processes,
                cfg.gradient_accumulation_steps, cfg.lr, cfg.scheduler_name)
    run.stop = run.state.global_step >= total_steps
    return run


# ---------------------------------------------------------------- the loop
class LossMeter:
    """Training losses summed on the device; read back (one host sync) only at log steps, saves and epoch ends.
    The epoch's sum starts from the state's, so an epoch resumed midway still averages all its batches."""

    def __init__(self, device: torch.device, state: TrainState):
        self.running = torch.zeros((), device=device)
        self.epoch = torch.full((), state.epoch_loss_sum, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.running_n, self.epoch_n, self.images = 0, state.batches_in_epoch, 0
        self.clock = time.perf_counter()
        self.banked_images, self.banked_seconds = 0, 0.0

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.nonfinite |= ~torch.isfinite(loss)
        self.running += loss
        self.epoch += loss
        self.running_n += 1
        self.epoch_n += 1
        self.images += images

    def new_epoch(self) -> None:
        self.epoch.zero_()
        self.epoch_n = 0

    def epoch_sum(self, accelerator) -> float:
        """The epoch's loss sum, averaged over processes (the same on every rank; a collective)."""
        return float(accelerator.reduce(self.epoch.clone(), "mean"))

    def restart_clock(self) -> None:
        """images/s measures training only, not evaluation and saving."""
        self.clock, self.images = time.perf_counter(), 0

    def bank(self) -> float:
        """Images/s since the clock started; added to the evaluation's figure, and the clock restarted."""
        dt = max(time.perf_counter() - self.clock, 1e-9)
        rate = self.images / dt
        self.banked_images, self.banked_seconds = self.banked_images + self.images, self.banked_seconds + dt
        self.restart_clock()
        return rate

    def banked_rate(self) -> float:
        """Images/s of the training since the last evaluation (its record's ``images_per_s``)."""
        self.bank()
        rate = self.banked_images / max(self.banked_seconds, 1e-9)
        self.banked_images, self.banked_seconds = 0, 0.0
        return rate


def save_state(run: Run, meter: LossMeter) -> Path:
    """A resumable state of this moment, with the epoch's running loss sum."""
    run.state.epoch_loss_sum = meter.epoch_sum(run.accelerator)
    return save_checkpoint(run.accelerator, run.output_dir, run.state, run.cfg.save_total_limit, run.ema)


def training_step(run: Run, batch: dict) -> torch.Tensor:
    """Forward, loss (plus the auxiliary head's), backward, clipping and the optimizer step of one batch."""
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    pixels = batch["pixel_values"]
    if cfg.channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    with accelerator.accumulate(model):
        if run.query_based:  # Mask2Former: its own Hungarian-matched loss on one mask per present label
            from model import query_targets  # (imported with the model already)

            targets = query_targets(batch["mask"], cfg.task, run.adapter.classes, run.adapter.priority)
            with accelerator.autocast():
                _, loss = model(pixels, targets)
        else:
            with accelerator.autocast():
                logits, aux = model(pixels)
            size = batch["mask"].shape[-2:]
            loss = run.loss_fn(upsample_like(logits, size), batch["mask"])
            if aux is not None and cfg.aux_weight > 0:
                loss = loss + cfg.aux_weight * run.loss_fn(upsample_like(aux, size), batch["mask"])
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def log_progress(run: Run, meter: LossMeter, epoch: int) -> None:
    """The periodic log line (the one host sync of the training loop); a NaN/inf loss stops the run."""
    step = run.state.global_step
    mean_loss = float(run.accelerator.reduce(meter.running, "mean")) / max(1, meter.running_n)
    if bool(meter.nonfinite):
        raise FloatingPointError(f"loss became NaN/inf between step {step - meter.running_n + 1} and {step}; "
                                 "best/ and the last checkpoint hold the last good model. Lower --lr or use "
                                 "--mixed_precision bf16 instead of fp16")
    logger.info("epoch %d step %d/%d | train_loss %.4f | lr %.3g | %.1f img/s", epoch + 1, step, run.total_steps,
                mean_loss, run.scheduler.get_last_lr()[0], meter.bank())
    meter.running.zero_()
    meter.running_n = 0


def after_optimizer_step(run: Run, meter: LossMeter, epoch: int, stop_signal: StopSignal) -> None:
    """Per-step duties: schedule, logging, periodic saving, and stopping on a signal (state saved first)."""
    cfg, state = run.cfg, run.state
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.ema_source)
    state.global_step += 1
    step = state.global_step
    if step % cfg.log_every == 0 or step == run.total_steps:
        log_progress(run, meter, epoch)
    if cfg.save_every_steps and step % cfg.save_every_steps == 0:
        logger.info("saved resumable state %s", save_state(run, meter))
    signum = agreed_signal(run.accelerator, stop_signal.signum, step, cfg.log_every)
    if signum:
        path = save_state(run, meter)
        name = signal.Signals(signum).name
        logger.error("stopped by %s after step %d: saved resumable state %s; continue with "
                     "--resume_from_checkpoint latest", name, step, path)
        raise Interrupted(signum, f"stopped by {name} at step {step}")
    run.stop = step >= run.total_steps


TRACE_ROWS = "GI_SEG_TRACE_ROWS"  # a folder: each rank appends "<epoch> <rows...>" per batch to rows_rank<R>.txt


def train_one_epoch(run: Run, epoch: int, stop_signal: StopSignal, meter: LossMeter) -> None:
    """Train ``epoch`` from where the state stands in it (a resumed run skips the batches already seen) until its
    last batch, or until the run must stop."""
    accelerator, state = run.accelerator, run.state
    run.train_dl.set_epoch(epoch)
    run.train_dl.dataset.set_epoch(epoch)  # the augmentation's seed (Accelerate sets the sampler's only)
    if state.epoch != epoch or state.batches_in_epoch == 0:
        state.epoch, state.batches_in_epoch = epoch, 0
        meter.new_epoch()
    skip = state.batches_in_epoch
    batches = accelerator.skip_first_batches(run.train_dl, skip) if skip else run.train_dl
    bar = None
    if accelerator.is_main_process and sys.stdout.isatty():
        from tqdm.auto import tqdm
        bar = tqdm(total=len(run.train_dl), initial=skip, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True)
    trace = os.environ.get(TRACE_ROWS)
    for batch in batches:
        if trace:  # diagnostics (a host sync per batch): the cache rows this rank trains on
            with open(Path(trace) / f"rows_rank{accelerator.process_index}.txt", "a") as f:
                f.write(f"{epoch} " + " ".join(map(str, batch["index"].tolist())) + "\n")
        meter.add(training_step(run, batch), batch["pixel_values"].shape[0] * accelerator.num_processes)
        state.batches_in_epoch += 1
        if bar is not None:
            bar.update(1)
        if accelerator.sync_gradients:
            after_optimizer_step(run, meter, epoch, stop_signal)
            if run.stop:
                break
    if bar is not None:
        bar.close()


def model_card(run: Run, tag: str, record: dict, scores: dict | None = None) -> str:
    """The README.md of best/ or last/ (model_card.py) for the evaluation ``record``."""
    from model_card import card_text

    cfg, d = run.cfg, run.data
    sizes = {"slices": len(d.index), "cases": int(d.index["case"].nunique()), "train": len(d.train_rows),
             "val": len(d.val_rows)}
    return card_text(config=dataclasses.asdict(cfg), spec=run.spec, record=record, family=run.family,
                     split_sizes=sizes, scores=scores, repo=cfg.hub_model_id or str(run.output_dir / tag), what=tag)


def save_models(run: Run, tag: str, record: dict) -> None:
    """best/ or last/: save_pretrained folder + image processor + inference spec + model card (gathered on every
    rank)."""
    from model import save_model

    if run.ema is not None:  # the average (never sharded: --ema_decay refuses FSDP and DeepSpeed)
        sd = run.ema.model.state_dict()
    else:
        sd = run.accelerator.get_state_dict(run.model)  # all ranks (needed under DeepSpeed ZeRO-3 / FSDP)
    if run.accelerator.is_main_process:
        sd = {k.removeprefix("_orig_mod.").removeprefix("hf."): v for k, v in sd.items()}
        wrapper = run.ema.model if run.ema is not None else run.accelerator.unwrap_model(run.model)
        with storage_guard(run.output_dir / tag, f"the {tag}/ model"):
            save_model(getattr(wrapper, "_orig_mod", wrapper).hf, run.output_dir / tag, run.spec, state_dict=sd,
                       card=model_card(run, tag, record))


def end_epoch(run: Run, epoch: int, meter: LossMeter) -> dict:
    """Evaluate, keep the best model, decide on early stopping, save last/, metrics.jsonl and a resumable state
    that records this evaluation (so a resume neither repeats nor skips it). Returns the evaluation's record."""
    cfg, state, out = run.cfg, run.state, run.output_dir
    train_loss = meter.epoch_sum(run.accelerator) / max(1, meter.epoch_n)
    images_per_s = meter.banked_rate()
    model = run.ema.model if run.ema is not None else run.model
    figures = evaluate(Segmenter(model, run.spec, run.accelerator.device), run.val_dl, run.loss_fn, run.accelerator,
                       cfg.empty_dice) if run.val_dl is not None else {}
    record = {"epoch": epoch + 1, "step": state.global_step, "train_loss": train_loss,
              "lr": run.scheduler.get_last_lr()[0], "images_per_s": images_per_s, **figures}
    run.history = [r for r in run.history if r["step"] < state.global_step] + [record]  # one row per evaluated step
    state.evaluated_step = state.global_step
    if figures:
        logger.info("eval epoch %d step %d | val_loss %.4f | %s", epoch + 1, state.global_step, figures["val_loss"],
                    describe(figures, run.spec.classes))
    else:
        logger.info("epoch %d step %d | train_loss %.4f | no validation set (--fold -1): best/ is this model",
                    epoch + 1, state.global_step, train_loss)
    if state.batches_in_epoch >= len(run.train_dl):  # a whole epoch: the state points at the next one
        state.epoch, state.batches_in_epoch = epoch + 1, 0
        meter.new_epoch()
    if not figures:  # --fold -1: the latest model is the one to keep
        state.best_step = state.global_step
        save_models(run, "best", record)
    elif figures["dice_mean"] > state.best_dice:
        state.best_dice, state.best_step = figures["dice_mean"], state.global_step
        save_models(run, "best", record)
        logger.info("new best mean Dice %.4f at step %d: saved %s", figures["dice_mean"], state.global_step,
                    out / "best")
    if should_stop_early(run.history, state.best_step, cfg.early_stopping_patience):
        logger.info("early stopping: no better mean Dice than %.4f (step %d) for %d evaluations",
                    state.best_dice, state.best_step, cfg.early_stopping_patience)
        run.stop = True
    if cfg.save_last:
        save_models(run, "last", record)
    if run.accelerator.is_main_process:
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(json_safe(r)) + "\n" for r in run.history))
    log_record(run.accelerator, run.trackers, record)
    path = save_state(run, meter)
    logger.info("saved %sresumable state %s", f"{out / 'last'} and " if cfg.save_last else "", path)
    return record


def launched_without_accelerator() -> bool:
    """Several processes (torchrun, ``accelerate launch`` with a multi-GPU config) on a machine with no GPU or
    other accelerator: Accelerate must be told to use the CPU (gloo), or each process would train alone."""
    accel = getattr(torch, "accelerator", None)
    available = accel.is_available() if accel is not None else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not available


def train(cfg: TrainConfig) -> dict:
    """Run the whole fine-tuning; returns the last evaluation's figures (with final_* ones after --final_eval)."""
    validate_config(cfg)
    quiet_third_party()
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    trackers = parse_report_to(cfg.report_to)
    accelerator = Accelerator(cpu=launched_without_accelerator(), mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
                              log_with=trackers or None, project_config=ProjectConfiguration(
                                  project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / TRACKER_FOLDER))
                              if trackers else None)
    out = open_output_dir(cfg, accelerator)
    try:
        set_seed(cfg.seed)
        run = build_run(cfg, accelerator, out)
        run.trackers = trackers
        start_trackers(accelerator, trackers, out.path.name, {**dataclasses.asdict(cfg), "run_id": out.run_id,
                                                             "world_size": accelerator.num_processes})
        last = train_epochs(run)
        if run.val_dl is None:
            logger.info("done: %d steps on every case (--fold -1): %s is the final model", run.state.global_step,
                        run.output_dir / "best")
        else:
            logger.info("done: %d steps, best mean Dice %.4f at step %d (%s)", run.state.global_step,
                        run.state.best_dice, run.state.best_step, run.output_dir / "best")
        if cfg.final_eval:
            if accelerator.is_main_process:
                final = final_evaluation(run)
                last = {**last, **{f"final_{k}": v for k, v in final.items()}}
                best = next((r for r in run.history if r["step"] == run.state.best_step), None)
                if best is not None and (out.path / "best").is_dir():  # the card gets the competition score
                    atomic_write_text(out.path / "best" / "README.md", model_card(run, "best", best, final))
            accelerator.wait_for_everyone()
        if cfg.push_to_hub and accelerator.is_main_process:
            from model_card import push_folder

            push_folder(out.path / "best", cfg.hub_model_id, cfg.hub_private)
        accelerator.end_training()
    finally:
        if out.lock is not None:
            out.lock.release()
    return last


def train_epochs(run: Run) -> dict:
    """The epochs from where the state stands: each one trained to its end (or until the run must stop) and then
    evaluated, unless the state says that evaluation already happened. Returns the last evaluation's record."""
    last = run.history[-1] if run.history else {}
    meter = LossMeter(run.accelerator.device, run.state)
    run.model.train()
    with StopSignal() as stop_signal:
        for epoch in range(run.state.epoch, run.cfg.epochs):
            if run.state.batches_in_epoch < len(run.train_dl) and not run.stop:
                train_one_epoch(run, epoch, stop_signal, meter)
            if run.state.evaluated_step < run.state.global_step:
                last = end_epoch(run, epoch, meter)
                meter.restart_clock()
            if run.stop:
                break
    return last


@command
def main(argv: list[str] | None = None) -> int:
    """The CLI: exit 0 when done, 2 for bad input, 3 for a NaN/inf loss, 128 + N when stopped by signal N."""
    cfg = parse_config(argv)
    try:
        train(cfg)
    except FloatingPointError as e:
        logger.error("stopped: %s", e)
        return 3
    except Interrupted as e:
        return 128 + e.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
