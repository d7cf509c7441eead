"""Fine-tune a Hugging Face segmentation model on UW-Madison GI-tract MRI with Accelerate.

Single process:   python trainer.py --base_model <hub id or folder> --data_dir <kaggle folder> --output_dir runs/x
Several GPUs:     accelerate launch --multi_gpu --num_processes 2 trainer.py ...   (or GPUS=0,1 bash run_train.sh)

Writes to --output_dir: run_config.json, train.log, metrics.jsonl (one JSON object per evaluation), best/ and
last/ (save_pretrained folders that AutoModelForSemanticSegmentation / AutoImageProcessor load) and
checkpoints/step_<N>/ (accelerator state for --resume_from_checkpoint latest).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils import (CLASSES, UserError, atomic_write_json, atomic_write_text, json_safe, logger, quiet_third_party,
                   setup_logging)

OPTIMIZERS = ("AdamW", "Adam", "SGD")
SCHEDULERS = ("MultiStepLR", "cosine", "poly", "constant")


@dataclass
class TrainConfig:
    # model and data
    base_model: str = field(default="demo/models/tiny-segformer", metadata={
        "help": "hub id (e.g. nvidia/segformer-b0-finetuned-ade-512-512) or local folder of a SegFormer, "
                "UperNet-ConvNeXt, DPT or BEiT checkpoint; its decode/auxiliary heads are replaced"})
    data_dir: str = field(default="demo/data", metadata={
        "help": "gi: folder in the Kaggle layout (train.csv + train/); lgg: the kaggle_3m folder"})
    dataset: str = field(default="gi", metadata={
        "help": "gi: UW-Madison GI tract (3 organs); lgg: LGG brain MRI (one class, tumor; see lgg.py)",
        "choices": ("gi", "lgg")})
    output_dir: str = field(default="runs/demo", metadata={"help": "where models, metrics and checkpoints go"})
    task: str = field(default="multilabel", metadata={
        "help": "multilabel: 3 sigmoid channels, organs may overlap; multiclass: softmax over background + 3, "
                "overlaps resolved by priority stomach > large_bowel > small_bowel", "choices": ("multilabel", "multiclass")})
    image_size: int = field(default=288, metadata={"help": "square training size in pixels (multiple of 32)"})
    context_slices: int = field(default=1, metadata={
        "help": "1: the slice repeated into 3 channels; 3: 2.5D, slices -stride, 0, +stride of the same case-day",
        "choices": (1, 3)})
    context_stride: int = field(default=2, metadata={"help": "slice distance of the 2.5D neighbours"})
    strong_aug: bool = field(default=False, metadata={"help": "add elastic/grid/optical distortion, blur, gamma"})
    n_folds: int = field(default=5, metadata={"help": "number of case-level folds"})
    fold: int = field(default=0, metadata={"help": "validation fold, in [0, n_folds)"})
    split_seed: int = field(default=42, metadata={"help": "seed of the case-to-fold assignment"})
    cache_dir: str = field(default="cache", metadata={"help": "decode-once cache of resized scans and masks"})
    # optimisation (flag names of the reference project)
    epochs: int = field(default=10, metadata={"help": "training epochs"})
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
    # loss and metric
    loss: str = field(default="bce_dice", metadata={
        "help": "bce_dice (BCE/CE + soft Dice), bce, dice, focal (focal + Dice) or tversky (BCE/CE + Tversky)",
        "choices": ("bce_dice", "bce", "dice", "focal", "tversky")})
    focal_gamma: float = field(default=2.0, metadata={"help": "focal loss gamma"})
    tversky_alpha: float = field(default=0.3, metadata={"help": "Tversky weight of false positives"})
    tversky_beta: float = field(default=0.7, metadata={"help": "Tversky weight of false negatives"})
    bce_weight: float = field(default=1.0, metadata={"help": "weight of BCE (multilabel) / cross-entropy (multiclass)"})
    dice_weight: float = field(default=1.0, metadata={"help": "weight of the soft Dice loss"})
    aux_weight: float = field(default=0.4, metadata={
        "help": "weight of the auxiliary head's loss (UperNet, DPT, BEiT); 0 removes the auxiliary head"})
    threshold: float = field(default=0.5, metadata={"help": "sigmoid threshold of multilabel predictions"})
    empty_dice: str = field(default="1", metadata={
        "help": "Dice of a slice-class pair whose prediction and truth are both empty: 1 (1st-place solution, "
                "default), 0 (competition text) or skip (left out of the mean, as a public grader does)",
        "choices": ("1", "0", "skip")})
    # running
    num_workers: int = field(default=-1, metadata={
        "help": "data-loader worker processes per training process; -1: 0 on CPU (workers would take cores from "
                "the model; the cached pipeline is cheap), min(8, cores per process) on GPU"})
    log_every: int = field(default=10, metadata={"help": "log train loss / lr / images per second every N steps"})
    save_every_steps: int = field(default=0, metadata={"help": "also save a resumable state every N steps (0: epochs only)"})
    save_total_limit: int = field(default=2, metadata={"help": "resumable states kept"})
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        help_ = meta.pop("help", "")
        if f.type in ("bool", bool):
            ap.add_argument(f"--{f.name}", action="store_true", help=help_)
            continue
        typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        ap.add_argument(f"--{f.name}", type=typ, default=f.default, help=f"{help_} (default: {f.default!r})", **meta)
    return ap


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
        (cfg.n_folds >= 2, f"--n_folds must be >= 2, got {cfg.n_folds}"),
        (0 <= cfg.fold < cfg.n_folds, f"--fold must be in [0, {cfg.n_folds - 1}] for --n_folds {cfg.n_folds}, got {cfg.fold}"),
        (cfg.aux_weight >= 0 and cfg.bce_weight >= 0 and cfg.dice_weight >= 0, "loss weights must be >= 0"),
        (cfg.bce_weight + cfg.dice_weight > 0, "--bce_weight and --dice_weight cannot both be 0"),
        (cfg.early_stopping_patience >= 0, f"--early_stopping_patience must be >= 0, got {cfg.early_stopping_patience}"),
        (cfg.focal_gamma >= 0 and cfg.tversky_alpha >= 0 and cfg.tversky_beta >= 0,
         "--focal_gamma, --tversky_alpha and --tversky_beta must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
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


def find_checkpoint(output_dir: Path, spec: str) -> Path | None:
    """'latest' -> newest complete checkpoints/step_<N> (None if there is none); otherwise the given folder."""
    if spec == "latest":
        found = sorted((p for p in (output_dir / "checkpoints").glob("step_*") if re.fullmatch(r"step_\d+", p.name)),
                       key=lambda p: int(p.name.split("_")[1]))
        return found[-1] if found else None
    path = Path(spec)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume_from_checkpoint {spec}: not a checkpoint folder (no trainer_state.json); "
                        f"use 'latest' or a folder under {output_dir / 'checkpoints'}")
    return path


def save_checkpoint(accelerator, output_dir: Path, state: dict, keep: int) -> Path:
    """Accelerator state + trainer_state.json to checkpoints/step_<N>, via a temporary folder and a rename."""
    root = output_dir / "checkpoints"
    final = root / f"step_{state['global_step']:08d}"
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "trainer_state.json", state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        old = sorted((p for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name)),
                     key=lambda p: int(p.name.split("_")[1]))
        for p in old[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def evaluate(model, loader, loss_fn, cfg: TrainConfig, accelerator,
             classes: tuple[str, ...] = CLASSES) -> tuple[dict, np.ndarray, np.ndarray]:
    """Validation loss and Dice/IoU summary; also the (N, C, 3) per-slice stats and slice rows (gathered over
    processes without duplicates). Stats stay on the device until the end: one host transfer per evaluation."""
    from dataset import unpack_targets
    from losses import upsample_like
    from metrics import mask_stats, predict_masks, summarise

    model.eval()
    stats, rows = [], []
    loss_sum = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    with torch.no_grad():
        for batch in loader:
            with accelerator.autocast():
                logits, _ = model(batch["pixel_values"])
            logits = upsample_like(logits.float(), batch["mask"].shape[-2:])
            n = batch["mask"].shape[0]
            loss_sum += loss_fn(logits, batch["mask"]) * n
            count += n
            preds = predict_masks(logits, cfg.task, cfg.threshold)
            s = mask_stats(preds, unpack_targets(batch["mask"], len(classes)).bool())
            s, r = accelerator.gather_for_metrics((s, batch["index"]))
            stats.append(s)
            rows.append(r)
    loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
    all_stats = torch.cat(stats).cpu().numpy()
    all_rows = torch.cat(rows).cpu().numpy()
    out = summarise(all_stats, cfg.empty_dice, classes)
    out["val_loss"] = float(loss_sum / count.clamp_min(1))
    out["val_slices"] = int(len(all_rows))
    model.train()
    return out, all_stats, all_rows


def final_evaluation(cfg: TrainConfig, output_dir: Path, index, val_rows, cache, neighbours, device,
                     classes: tuple[str, ...] = CLASSES) -> dict:
    """Predict the validation fold with best/ at original sizes, write val_submission.csv and val_scores.json."""
    from predict import load_for_inference, predict_rows, write_submission
    from score import format_table, score_predictions, submission_to_wide

    model, spec = load_for_inference(output_dir / "best", device)
    sub = predict_rows(model, spec, index, val_rows, cache, neighbours, cfg.eval_batch_size, device,
                       cfg.mixed_precision, thresholds=(cfg.threshold,) * len(classes))
    write_submission(sub, output_dir / "val_submission.csv")
    overall, per_case = score_predictions(index, submission_to_wide(sub, classes=classes), cfg.empty_dice,
                                          classes=classes)
    atomic_write_json(output_dir / "val_scores.json", {**overall, "per_case": per_case.to_dict("records"),
                                                       "empty_dice": cfg.empty_dice})
    for line in format_table(overall, per_case, classes).splitlines():
        logger.info("final eval | %s", line)
    logger.info("final eval (best/, original sizes): dice mean %.4f, hausdorff %.4f, score %.4f -> %s",
                overall["dice_mean"], overall["hausdorff"], overall["score"], output_dir / "val_scores.json")
    return overall


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
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal

        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("received %s: finishing the current step, then saving a resumable state",
                       signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig) -> dict:
    """Run the whole fine-tuning; returns the last evaluation's figures."""
    validate_config(cfg)
    quiet_third_party()
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from augment import eval_transform, train_transform
    from cache import build_cache
    from data import DATASETS, neighbour_table, split_by_case
    from dataset import SliceDataset, seed_worker
    from losses import SegmentationLoss, upsample_like
    from model import SegmentationModel, freeze_unused_parameters, load_model, save_model

    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    is_main = accelerator.is_main_process
    resume = None
    if cfg.resume_from_checkpoint:
        resume = find_checkpoint(output_dir, cfg.resume_from_checkpoint)
        if resume is None:
            raise UserError(f"--resume_from_checkpoint latest: no checkpoint under {output_dir / 'checkpoints'} "
                            "(start without the flag)")
    elif (output_dir / "run_config.json").exists() and not cfg.overwrite_output_dir:
        raise UserError(f"--output_dir {output_dir} already holds a run; pass --resume_from_checkpoint latest to "
                        "continue it, --overwrite_output_dir to start over, or choose another --output_dir")
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*output_dir.glob(".*.tmp"), *output_dir.glob("checkpoints/.*.tmp")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a run killed mid-write; the good copies stand
    accelerator.wait_for_everyone()
    setup_logging(is_main, output_dir / "train.log")
    logger.info("start: %s", " ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
    logger.info("config: %s", json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    logger.info("world size %d, device %s, mixed precision %s, torch %s", accelerator.num_processes,
                accelerator.device, accelerator.mixed_precision, torch.__version__)
    logger.info("Dice rule: an empty prediction on an empty truth scores %s (--empty_dice)",
                {"1": "1", "0": "0", "skip": "nothing (pair skipped)"}[cfg.empty_dice])
    if is_main:
        atomic_write_json(output_dir / "run_config.json",
                          {**dataclasses.asdict(cfg), "world_size": accelerator.num_processes})
    set_seed(cfg.seed)

    # ---- data: index, case-level split, decode-once cache
    with accelerator.main_process_first():
        kind = DATASETS[cfg.dataset]
        index = kind.build_index(cfg.data_dir)
        train_rows, val_rows = split_by_case(index, cfg.fold, cfg.n_folds, cfg.split_seed)
        cache = build_cache(index, cfg.image_size, cfg.cache_dir, num_threads=os.cpu_count() or 1)
    neighbours = neighbour_table(index, cfg.context_slices, cfg.context_stride)
    train_cases = sorted(index["case"].iloc[train_rows].unique())
    val_cases = sorted(index["case"].iloc[val_rows].unique())
    logger.info("data: %d slices, %d cases from %s; fold %d/%d: train %d slices (%d cases), val %d slices (cases %s)",
                len(index), index["case"].nunique(), cfg.data_dir, cfg.fold, cfg.n_folds, len(train_rows),
                len(train_cases), len(val_rows), ",".join(map(str, val_cases)))
    if len(val_rows) == 0 or len(train_rows) == 0:
        raise UserError(f"fold {cfg.fold} leaves the {'validation' if len(val_rows) == 0 else 'training'} set empty")

    # ---- model
    classes = kind.classes
    loaded = load_model(cfg.base_model, cfg.task, cfg.aux_weight, cfg.trust_remote_code, classes)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    logger.info("model: %s (%s), %.2fM parameters, task %s, labels %s", cfg.base_model, loaded.family, n_params / 1e6,
                cfg.task, list(loaded.model.config.id2label.values()))
    logger.info("re-initialised for our labels: %s", "; ".join(loaded.reinitialised) or "nothing (head already fits)")
    loaded.model.config.gi_dataset = cfg.dataset  # saved with the model: predict.py reads them
    loaded.model.config.gi_context_slices = cfg.context_slices
    loaded.model.config.gi_context_stride = cfg.context_stride
    model = SegmentationModel(loaded.model)
    frozen = freeze_unused_parameters(model)
    if frozen:
        logger.info("frozen %d parameter tensors the architecture never uses: %s", len(frozen),
                    ", ".join(n.removeprefix("hf.") for n in frozen[:4]) + (" ..." if len(frozen) > 4 else ""))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.torch_compile:
        model = torch.compile(model)

    train_ds = SliceDataset(cache, train_rows, neighbours, train_transform(cfg.image_size, cfg.strong_aug, cfg.seed),
                            loaded.mean, loaded.std)
    val_ds = SliceDataset(cache, val_rows, neighbours, eval_transform(cfg.image_size), loaded.mean, loaded.std)
    workers = cfg.num_workers
    if workers < 0:
        workers = min(8, (os.cpu_count() or 1) // accelerator.num_processes) if accelerator.device.type == "cuda" else 0
    loader_kw = dict(num_workers=workers, pin_memory=accelerator.device.type == "cuda", worker_init_fn=seed_worker,
                     persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    train_dl = torch.utils.data.DataLoader(train_ds, batch_size=cfg.train_batch_size, shuffle=True, drop_last=True
                                           if len(train_ds) >= 2 * cfg.train_batch_size else False, **loader_kw)
    val_dl = torch.utils.data.DataLoader(val_ds, batch_size=cfg.eval_batch_size, shuffle=False, **loader_kw)
    optimizer = make_optimizer(cfg, model, accelerator.device)
    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)

    steps_per_epoch = math.ceil(len(train_dl) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_train_steps or cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg, steps_per_epoch))
    accelerator.register_for_checkpointing(scheduler)
    loss_fn = SegmentationLoss(cfg.task, cfg.bce_weight, cfg.dice_weight, loss=cfg.loss, focal_gamma=cfg.focal_gamma,
                               tversky_alpha=cfg.tversky_alpha, tversky_beta=cfg.tversky_beta, classes=classes,
                               priority=kind.priority)

    # ---- resume
    state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "best_dice": -1.0, "best_step": -1}
    history: list[dict] = []
    if resume is not None:
        accelerator.load_state(str(resume))
        state = json.loads((resume / "trainer_state.json").read_text())
        metrics_file = output_dir / "metrics.jsonl"
        if metrics_file.exists():
            history = [r for r in map(json.loads, metrics_file.read_text().splitlines()) if r["step"] <= state["global_step"]]
        logger.info("resumed from %s: step %d, epoch %d, batch %d of that epoch, best mean Dice %.4f", resume,
                    state["global_step"], state["epoch"] + 1, state["batches_in_epoch"], state["best_dice"])
    logger.info("training: %d epochs x %d steps (%d total), batch %d x %d processes x %d accumulation, lr %g %s",
                cfg.epochs, steps_per_epoch, total_steps, cfg.train_batch_size, accelerator.num_processes,
                cfg.gradient_accumulation_steps, cfg.lr, cfg.scheduler_name)

    def save_models(tag: str) -> None:
        sd = accelerator.get_state_dict(model)  # all ranks (needed under DeepSpeed ZeRO-3 / FSDP)
        if is_main:
            sd = {k.removeprefix("_orig_mod.").removeprefix("hf."): v for k, v in sd.items()}
            hf = accelerator.unwrap_model(model)
            hf = getattr(hf, "_orig_mod", hf).hf
            save_model(hf, output_dir / tag, cfg.image_size, loaded.mean, loaded.std, state_dict=sd)

    with StopSignal() as stop_signal:
        use_bar = is_main and sys.stdout.isatty()
        model.train()
        last_eval: dict = history[-1] if history else {}
        stop = state["global_step"] >= total_steps
        running = torch.zeros((), device=accelerator.device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
        running_n, t_log, seen = 0, time.perf_counter(), 0
        for epoch in range(state["epoch"], cfg.epochs):
            if stop:
                break
            train_dl.set_epoch(epoch)
            skip = state["batches_in_epoch"] if epoch == state["epoch"] else 0
            epoch_dl = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
            bar = None
            if use_bar:
                from tqdm.auto import tqdm
                bar = tqdm(total=len(train_dl), initial=skip, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True)
            epoch_loss = torch.zeros((), device=accelerator.device)
            epoch_batches = 0
            for b, batch in enumerate(epoch_dl, start=skip):
                pixels = batch["pixel_values"]
                if cfg.channels_last:
                    pixels = pixels.contiguous(memory_format=torch.channels_last)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        logits, aux = model(pixels)
                    size = batch["mask"].shape[-2:]
                    loss = loss_fn(upsample_like(logits, size), batch["mask"])
                    if aux is not None and cfg.aux_weight > 0:
                        loss = loss + cfg.aux_weight * loss_fn(upsample_like(aux, size), batch["mask"])
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                detached = loss.detach()
                nonfinite |= ~torch.isfinite(detached)
                running += detached
                epoch_loss += detached
                running_n += 1
                epoch_batches += 1
                seen += batch["pixel_values"].shape[0] * accelerator.num_processes
                if bar is not None:
                    bar.update(1)
                state["batches_in_epoch"] = b + 1
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                state["global_step"] += 1
                step = state["global_step"]
                if step % cfg.log_every == 0 or step == total_steps:
                    mean_loss = float(accelerator.reduce(running, "mean")) / max(1, running_n)  # the only sync
                    if bool(nonfinite):
                        raise FloatingPointError(f"loss became NaN/inf between step {step - running_n + 1} and {step}; "
                                                 f"best/ and the last checkpoint hold the last good model. Lower --lr or "
                                                 f"use --mixed_precision bf16 instead of fp16")
                    dt = time.perf_counter() - t_log
                    logger.info("epoch %d step %d/%d | train_loss %.4f | lr %.3g | %.1f img/s", epoch + 1, step,
                                total_steps, mean_loss, scheduler.get_last_lr()[0], seen / max(dt, 1e-9))
                    running.zero_()
                    running_n, t_log, seen = 0, time.perf_counter(), 0
                if cfg.save_every_steps and step % cfg.save_every_steps == 0:
                    path = save_checkpoint(accelerator, output_dir, state | {"epoch": epoch}, cfg.save_total_limit)
                    logger.info("saved resumable state %s", path)
                signalled = stop_signal.signum
                if accelerator.num_processes > 1 and (step % cfg.log_every == 0 or signalled):
                    # ranks agree on stopping (a collective every log interval, not every step)
                    flag = torch.tensor(float(signalled), device=accelerator.device)
                    signalled = int(accelerator.reduce(flag, "max").item())
                elif accelerator.num_processes > 1:
                    signalled = 0
                if signalled:
                    path = save_checkpoint(accelerator, output_dir, state | {"epoch": epoch}, cfg.save_total_limit)
                    import signal
                    name = signal.Signals(signalled).name
                    logger.error("stopped by %s after step %d: saved resumable state %s; continue with "
                                 "--resume_from_checkpoint latest", name, step, path)
                    raise Interrupted(signalled, f"stopped by {name} at step {step}")
                if step >= total_steps:
                    stop = True
                    break
            if bar is not None:
                bar.close()
            # ---- evaluation at the end of every epoch (and where max_train_steps stops)
            train_loss = float(accelerator.reduce(epoch_loss, "mean")) / max(1, epoch_batches)
            figures, _, _ = evaluate(model, val_dl, loss_fn, cfg, accelerator, classes)
            record = {"epoch": epoch + 1, "step": state["global_step"], "train_loss": train_loss,
                      "lr": scheduler.get_last_lr()[0], **figures}
            history.append(record)
            last_eval = record
            logger.info("eval epoch %d step %d | val_loss %.4f | dice %s | mean %.4f | global dice mean %.4f | "
                        "iou mean %.4f", epoch + 1, state["global_step"], figures["val_loss"],
                        " ".join(f"{c} {figures[f'dice_{c}']:.4f}" for c in classes), figures["dice_mean"],
                        figures["global_dice_mean"], figures["iou_mean"])
            finished_epoch = not stop or state["batches_in_epoch"] >= len(train_dl)
            state.update(epoch=epoch + 1 if finished_epoch else epoch, batches_in_epoch=0 if finished_epoch else
                         state["batches_in_epoch"])
            if figures["dice_mean"] > state["best_dice"]:
                state.update(best_dice=figures["dice_mean"], best_step=state["global_step"])
                save_models("best")
                logger.info("new best mean Dice %.4f at step %d: saved %s", figures["dice_mean"], state["global_step"],
                            output_dir / "best")
            if should_stop_early(history, state["best_step"], cfg.early_stopping_patience):
                logger.info("early stopping: no better mean Dice than %.4f (step %d) for %d evaluations",
                            state["best_dice"], state["best_step"], cfg.early_stopping_patience)
                stop = True
            save_models("last")
            if is_main:
                atomic_write_text(output_dir / "metrics.jsonl", "".join(json.dumps(json_safe(r)) + "\n" for r in history))
            path = save_checkpoint(accelerator, output_dir, state, cfg.save_total_limit)
            logger.info("saved %s and resumable state %s", output_dir / "last", path)
            t_log, seen = time.perf_counter(), 0  # images/s measures training, not evaluation and saving
        logger.info("done: %d steps, best mean Dice %.4f at step %d (%s)", state["global_step"], state["best_dice"],
                    state["best_step"], output_dir / "best")
        if cfg.final_eval:
            if is_main:
                final = final_evaluation(cfg, output_dir, index, val_rows, cache, neighbours, accelerator.device,
                                         classes)
                last_eval = {**last_eval, **{f"final_{k}": v for k, v in final.items()}}
            accelerator.wait_for_everyone()
        accelerator.end_training()
    return last_eval


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        train(cfg)
    except UserError as e:
        setup_logging(True)
        logger.error("error: %s", e)
        return 2
    except FloatingPointError as e:
        logger.error("stopped: %s", e)
        return 3
    except Interrupted as e:
        return 128 + e.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
