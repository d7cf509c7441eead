"""giseg train's configuration: every flag declared once, as a TrainConfig field.

Fine-tune a Hugging Face segmentation model on UW-Madison GI-tract MRI (or any --dataset adapter) with Accelerate.

Single process:   giseg train --base_model <hub id or folder> --data_dir <kaggle folder> --output_dir runs/x
Several GPUs:     accelerate launch --multi_gpu --num_processes 2 -m giseg train ...   (or GPUS=0,1 bash run_train.sh)
The demo:         giseg train --preset demo   (what `bash run_train.sh` runs with no settings)

Writes to --output_dir: run_config.json, train.log, metrics.jsonl (one JSON object per evaluation), best/ and
last/ (save_pretrained folders that AutoModelForSemanticSegmentation / AutoImageProcessor load, with the
inference_spec.json that `giseg predict` reads) and checkpoints/step_<N>/ (accelerator state for
--resume_from_checkpoint latest).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from giseg.data.folds import check_fold
from giseg.data.hf.options import HFOptions
from giseg.data.registry import DATASETS, datasets_help, get_adapter
from giseg.evaluation.empty_rule import empty_dice_flag
from giseg.inference.spec import spec_flags
from giseg.models.tasks import TASKS
from giseg.models.registry import base_model_help
from giseg.models.safe import ALLOW_BIN_HELP
from giseg.training.batch_size import RULES
from giseg.training.losses import DICE_ABSENT, LOSSES, loss_help
from giseg.training.tracking import parse_report_to
from giseg.utils.errors import UserError
from giseg.utils.options import above, add_options, at_least, between, check_options, flag, mixed_precision_flag

OPTIMIZERS = ("AdamW", "Adam", "SGD")
SCHEDULERS = ("MultiStepLR", "cosine", "poly", "constant")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
PRESETS = {"demo": {"epochs": 14, "lr": 2e-3, "image_size": 96, "warmup_steps": 20}}  # --preset: given flags win
PRESET_NOTES = {"demo": "bash run_train.sh's demo: a tiny random model on the demo data, on a CPU"}


def preset_values(names: str) -> dict:
    """The defaults of --preset: one name, or several comma-separated, merged left to right."""
    values = {}
    for name in filter(None, names.split(",")):
        if name not in PRESETS:
            raise UserError(f"--preset {names}: no preset {name!r}; the presets: {', '.join(PRESETS)} (several "
                            "comma-separated combine; the competition recipe is giseg cv --preset competition)")
        values.update(PRESETS[name])
    return values


# the inference spec's fields that are training flags (task, image_size, context_slices, context_stride ...): declared
# once, in inference/spec.py, with their defaults, help and checks; the trainer copies them into every saved spec
SpecFlags = dataclasses.make_dataclass("SpecFlags", [(f.name, f.type, dataclasses.field(
    default=f.metadata["flag"]["default"], metadata=f.metadata["flag"])) for f in spec_flags()])


@dataclass
class TrainerFlags:
    """The flags that only the trainer has (the fields of TrainConfig before the shared ones)."""
    # model and data
    base_model: str = flag(
        "demo/models/tiny-segformer", base_model_help,
        group="model and data", identity=True)
    data_dir: str = flag(
        "demo/data", "gi: folder in the Kaggle layout (train.csv + train/); lgg: the kaggle_3m folder",
        group="model and data", identity=True)
    dataset: str = flag(
        "gi", datasets_help,
        group="model and data", identity=True, choices=lambda: tuple(DATASETS))
    output_dir: str = flag(
        "runs/demo", "where models, metrics and checkpoints go",
        group="model and data", identity=False)
    head_prior: float = flag(
        0.01, "each class's probability at every pixel when training starts, set through the bias of the head "
        "layers re-initialised for our labels (RetinaNet's prior init; multiclass: the background gets the "
        "rest). A zero bias starts every class at 0.5, and on mostly-background slices the pixel loss first "
        "drives every feature towards background: a random-init model then sits at the predict-nothing floor "
        "for dozens of steps (docs/training.md). 0: the library's zero bias",
        group="model and data", identity=True, card=True, **between(0, 1, " (0: the library's zero bias)"))
    empty_slice_fraction: float = flag(
        -1.0, "share of organ-free slices among each epoch's training slices, drawn anew every epoch, e.g. 0.1; "
        "0: train only on slices that show a class (as the 1st-place solution, which gated empty slices); "
        "-1: every training slice, as the data has them",
        group="model and data", identity=True,
        check=lambda v: v == -1 or 0 <= v < 1, what="in [0, 1), or -1 for all slices")
    strong_aug: bool = flag(
        False, "add elastic/grid/optical distortion, blur, gamma",
        group="model and data", identity=True, card=True)
    cutmix_prob: float = flag(
        0.0, "probability that a training batch is CutMixed: a box of its images and masks replaced by the same "
        "box of other slices of the batch (training/mixing.py; seeded like the augmentation)",
        group="model and data", identity=True, card=True, **between(0, 1, high_in=True))
    mixup_prob: float = flag(
        0.0, "probability that a training batch (not CutMixed) is MixUp-blended with other slices of the batch; "
        "the loss takes the blended masks as soft targets",
        group="model and data", identity=True, card=True, **between(0, 1, high_in=True))
    mix_alpha: float = flag(
        1.0, "CutMix / MixUp: the mix lam ~ Beta(alpha, alpha) (CutMix's box covers 1 - lam of the image)",
        group="model and data", identity=True, **above(0))
    n_folds: int = flag(
        5, "number of case-level folds",
        group="model and data", identity=True)
    fold: int = flag(
        0, "validation fold, in [0, n_folds); -1: train on every case with no validation set (a final model; "
        "best/ is the last epoch's)",
        group="model and data", identity=True)
    split_seed: int = flag(
        42, "seed of the case-to-fold assignment",
        group="model and data", identity=True)
    cache_dir: str = flag(
        "cache", "decode-once cache of resized scans and masks",
        group="model and data", identity=False)
    verify_cache: bool = flag(
        False, "check every block of the cache against its checksums before use (default: sizes and a sample)",
        group="model and data", identity=False)
    # optimisation
    epochs: int = flag(
        15, "training epochs",
        group="optimisation", identity=False, card=True, **at_least(1))
    train_batch_size: int = flag(
        8, "batch size per process",
        group="optimisation", identity=True, card=True, **at_least(1))
    auto_batch_size: bool = flag(
        False, "on a GPU, train with the largest batch that fits (a search of training steps on blank batches from "
        "--train_batch_size up, less a 10%% margin) and --lr scaled to it by --lr_scaling; kept in auto_batch.json for "
        "a resume; on a CPU the batch stays --train_batch_size", group="optimisation", identity=True, card=True)
    lr_scaling: str = flag(
        "sqrt", "with --auto_batch_size: how --lr follows the batch from --train_batch_size: sqrt (lr x sqrt(batch / "
        "reference): AdamW's), linear (Goyal et al.'s rule for SGD) or none", group="optimisation", identity=True,
        card=True, choices=RULES, check=lambda v: v in RULES, what=f"one of {RULES}")
    eval_batch_size: int = flag(
        16, "validation batch size per process",
        group="optimisation", identity=False, **at_least(1))
    lr: float = flag(
        6e-5, "peak learning rate",
        group="optimisation", identity=True, card=True, **above(0))
    weight_decay: float = flag(
        0.01, "AdamW/Adam/SGD weight decay of the weights (not of biases and norms)",
        group="optimisation", identity=True, card=True, **at_least(0))
    optimizer: str = flag(
        "AdamW", "AdamW (fused on GPU), Adam, or SGD (momentum 0.9, Nesterov)",
        group="optimisation", identity=True, card=True, choices=OPTIMIZERS)
    scheduler_name: str = flag(
        "cosine", "MultiStepLR (x lr_gamma at lr_milestones epochs), cosine, poly (power 1.0) or constant; all after "
        "--warmup_steps of linear warm-up",
        group="optimisation", identity=True, card=True, choices=SCHEDULERS)
    lr_milestones: str = flag(
        "", "MultiStepLR epochs, comma-separated (default: 60%% and 85%% of --epochs)",
        group="optimisation", identity=True)
    lr_gamma: float = flag(
        0.1, "MultiStepLR decay factor",
        group="optimisation", identity=True)
    warmup_steps: int = flag(
        0, "linear warm-up optimizer steps",
        group="optimisation", identity=True, card=True, **at_least(0))
    max_train_steps: int = flag(
        0, "stop after this many optimizer steps (0: epochs decide)",
        group="optimisation", identity=False, **at_least(0))
    gradient_accumulation_steps: int = flag(
        1, "micro-batches per optimizer step",
        group="optimisation", identity=True, card=True, **at_least(1))
    max_grad_norm: float = flag(
        1.0, "gradient clipping norm (0: off)",
        group="optimisation", identity=True)
    mixed_precision: str = mixed_precision_flag("no", group="optimisation", identity=True, card=True)
    seed: int = flag(
        42, "seed of weights init, shuffling and augmentation",
        group="optimisation", identity=True, card=True)
    ema_decay: float = flag(
        0.0, "exponential moving average of the weights, updated after every optimizer step, e.g. 0.999 (0: "
        "off); evaluation, best/ and last/ use the average, which every resumable state holds",
        group="optimisation", identity=True, **between(0, 1, " (0: off)"))
    swa_start_epoch: int = flag(
        0, "stochastic weight averaging: from the end of this epoch (1-based) on, evaluation, best/ and last/ "
        "use the equal average of the weights at the end of each epoch, BatchNorm statistics recomputed "
        "for it (0: off; not with --ema_decay)",
        group="optimisation", identity=True, card=True, **at_least(0, " (0: off)"))
    # loss and metric
    loss: str = flag(
        "bce_dice", loss_help(),
        group="loss and metric", identity=True, card=True, choices=tuple(LOSSES),
        check=lambda v: v in LOSSES, what=f"one of {tuple(LOSSES)}")
    focal_gamma: float = flag(
        2.0, "focal loss gamma",
        group="loss and metric", identity=True, **at_least(0))
    tversky_alpha: float = flag(
        0.3, "Tversky weight of false positives",
        group="loss and metric", identity=True, **at_least(0))
    tversky_beta: float = flag(
        0.7, "Tversky weight of false negatives",
        group="loss and metric", identity=True, **at_least(0))
    pixel_loss_weight: float = flag(
        1.0, "weight of the per-pixel term: BCE (multilabel), cross-entropy (multiclass) or focal (--loss "
        "focal); --bce_weight is the old name",
        group="loss and metric", identity=True, card=True, aliases=("--bce_weight",), **at_least(0))
    dice_weight: float = flag(
        1.0, "weight of the overlap term: soft Dice, or Tversky",
        group="loss and metric", identity=True, card=True, **at_least(0))
    lovasz_weight: float = flag(
        1.0, "weight of the Lovász hinge term (--loss lovasz, bce_dice_lovasz)",
        group="loss and metric", identity=True, card=True, **at_least(0))
    dice_absent: str = flag(
        "count", "a class with no pixel in the whole batch: count (it scores best when nothing of it is predicted) "
        "or skip (left out of the overlap term, as segmentation_models_pytorch's DiceLoss does)",
        group="loss and metric", identity=True, choices=DICE_ABSENT)
    aux_weight: float = flag(
        0.4, "weight of the auxiliary head's loss (UperNet, DPT, BEiT); 0 removes the auxiliary head",
        group="loss and metric", identity=True, card=True, **at_least(0))
    threshold: float = flag(
        0.5, "sigmoid threshold of multilabel predictions, every class (saved with the model for giseg predict)",
        group="loss and metric", identity=True, **between(0, 1, low_in=False))
    empty_dice: str = empty_dice_flag(group="loss and metric", identity=True)
    # running
    num_workers: int = flag(
        -1, "data-loader worker processes per training process; -1: 0 on CPU (workers would take cores from the"
        " model; the cached pipeline is cheap), min(8, cores per process) on GPU",
        group="running", identity=False, check=lambda v: v >= -1, what=">= 0, or -1 for automatic")
    log_every: int = flag(
        10, "log train loss / lr / images per second every N steps",
        group="running", identity=False, **at_least(1))
    save_every_steps: int = flag(
        0, "also save a resumable state every N steps (0: epochs only)",
        group="running", identity=False)
    save_total_limit: int = flag(
        2, "resumable states kept (each: weights + optimizer moments, 12 bytes per parameter with AdamW)",
        group="running", identity=False)
    save_last: bool = flag(
        True, "write last/ after every evaluation besides best/ (4 bytes per parameter); false: best/ only",
        group="running", identity=False)
    resume_from_checkpoint: str = flag(
        "", "'latest' (newest state under output_dir/checkpoints) or a checkpoint folder",
        group="running", identity=False)
    overwrite_output_dir: bool = flag(
        False, "allow starting over in a used output_dir",
        group="running", identity=False)
    allow_bin: bool = flag(
        False, ALLOW_BIN_HELP + " (model code from a folder or the Hub never runs)",
        group="running", identity=False)
    torch_compile: bool = flag(
        False, "torch.compile the model and the loss (saved models stay plain; a run resumes with or without it)",
        group="running", identity=False)
    torch_compile_mode: str = flag(
        "default", "torch.compile's mode with --torch_compile: reduce-overhead uses CUDA graphs (for GPUs that wait on "
        "the host's kernel launches); the max-autotune modes search kernels for a longer compile",
        group="running", identity=False, choices=COMPILE_MODES)
    torch_compile_backend: str = flag(
        "inductor", "torch.compile's backend with --torch_compile: inductor generates kernels; aot_eager and eager trace "
        "without generating any (a quick check that the model traces)",
        group="running", identity=False, choices=("inductor", "aot_eager", "eager"))
    tf32: bool = flag(
        True, "on a GPU of the Ampere generation or newer, float32 matmuls and convolutions in TF32 on the tensor "
        "cores (10-bit mantissa inputs, float32 sums): what --mixed_precision no runs at; false: full float32",
        group="running", identity=False)
    channels_last: bool = flag(
        False, "channels-last memory format for model and inputs (often faster for ConvNeXt/UperNet on GPU)",
        group="running", identity=False)
    early_stopping_patience: int = flag(
        0, "stop when the validation mean Dice has not improved for this many evaluations (0: off)",
        group="running", identity=False, **at_least(0))
    final_eval: bool = flag(
        False, "after training, predict the validation fold with best/ at original scan sizes and score it "
        "(val_submission.csv, val_scores.json: Dice, IoU, 3D Hausdorff, competition score, time saved)",
        group="running", identity=False)
    preset: str = flag(
        "", "a named set of defaults, for the flags not given; several comma-separated combine, left to right: "
        + "; ".join(f"{name} = " + ", ".join(f"--{k} {v}" for k, v in values.items()) + f" ({PRESET_NOTES[name]})"
                    for name, values in PRESETS.items())
        + " (the competition recipe, a second family and tuning out of fold, is giseg cv --preset competition)",
        group="running", identity=False, metavar="{" + ",".join(PRESETS) + "}",
        check=lambda v: all(name in PRESETS for name in filter(None, v.split(","))),
        what=f"preset names among {', '.join(PRESETS)}, comma-separated")
    resume_run: str = flag(
        "", "continue the run in this folder from its latest checkpoint, with the settings saved in its "
        "run_config.json (flags given as well change what may change on a resume, e.g. --epochs)",
        group="running", identity=False)
    check_only: bool = flag(
        False, "check the arguments, the data folder and the model, then exit without writing anything (what "
        "run_train.sh does before it starts a run in the background)",
        group="running", identity=False)
    trace_rows: str = flag(
        "", "diagnostics: append the cache rows of every batch to <folder>/rows_rank<R>.txt (a host sync per "
        "batch; the tests use it to check what each process trains on)",
        group="running", identity=False)
    # the Hugging Face ecosystem
    report_to: str = flag(
        "none", "experiment trackers through Accelerate, comma-separated: tensorboard, wandb, mlflow, trackio; all "
        "(every one installed) or none. They get the figures of metrics.jsonl at the same steps and the run"
        " config; files under output_dir/trackers",
        group="the Hugging Face ecosystem", identity=False)
    push_to_hub: bool = flag(
        False, "upload best/ (with its model card) to --hub_model_id at the end; the run never fails for it",
        group="the Hugging Face ecosystem", identity=False)
    hub_model_id: str = flag(
        "", "the Hub repo of --push_to_hub, e.g. me/segformer-gi",
        group="the Hugging Face ecosystem", identity=False)
    hub_private: bool = flag(
        False, "create the --hub_model_id repo private",
        group="the Hugging Face ecosystem", identity=False)


@dataclass
class TrainConfig(HFOptions, SpecFlags, TrainerFlags):
    """Every training flag, declared once: its help, choices and --help section (group), whether a resume must keep
    it (identity: see run_dir.RUN_IDENTITY), whether the model card lists it (card). The parser, the resume check,
    the card and docs/flags.md are derived from these fields; tests/training/test_config.py checks each has them."""



def build_parser() -> argparse.ArgumentParser:
    """The CLI: one option per TrainConfig field, in the --help section its metadata names."""
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="giseg train", description=__doc__.split("\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, TrainConfig)
    return ap


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The configuration of ``argv``: the flags given, then --resume_run's saved settings or --preset's values, then
    the fields' defaults."""
    ap = build_parser()
    known = ap.parse_known_args(argv)[0]
    defaults = preset_values(known.preset)
    if known.resume_run:
        defaults = saved_settings(known.resume_run)
        if known.output_dir not in (TrainConfig.output_dir, known.resume_run):
            raise UserError(f"--resume_run {known.resume_run} continues that folder's run; leave out --output_dir "
                            f"{known.output_dir}")
    ap.set_defaults(**defaults)
    return TrainConfig(**vars(ap.parse_args(argv)))


# flags added after runs were first saved, with the value a run_config.json without them ran with (resumes, CV
# folds and cards compare and record that value, not today's default)
SAVED_WITHOUT = {"head_prior": 0.0}


def saved_settings(run_dir: str) -> dict:
    """The settings of the run in ``run_dir`` (its run_config.json), as defaults that resume it from its latest
    checkpoint."""
    path = Path(run_dir) / "run_config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--resume_run {run_dir}: no readable run_config.json ({e.__class__.__name__}); pass the "
                        "output folder of a run started before (runs/<name>)") from None
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"resume_run", "check_only", "overwrite_output_dir"}
    return {**SAVED_WITHOUT, **{k: v for k, v in saved.items() if k in names}, "output_dir": run_dir,
            "resume_from_checkpoint": "latest"}


def defaults_source(cfg: TrainConfig) -> dict[str, str]:
    """For each flag whose value is not the field's default: where it came from (the command line or --preset)."""
    preset = preset_values(cfg.preset)
    return {f.name: ("preset" if f.name in preset and getattr(cfg, f.name) == preset[f.name] else "given")
            for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) != f.default}


def validate_config(cfg: TrainConfig) -> None:
    """Reject arguments out of range with a message naming the flag: each flag's own check (declared beside it,
    flag(check=...)), then what depends on several flags."""
    check_options(cfg, TrainConfig)
    task = TASKS[cfg.task]
    checks = [
        (task.segments or (cfg.loss == TrainConfig.loss and not (cfg.cutmix_prob or cfg.mixup_prob)),
         "--task presence trains a slice classifier with binary cross-entropy on each class's presence: leave --loss, "
         "--cutmix_prob and --mixup_prob at their defaults"),
        (not task.segments or cfg.task in LOSSES[cfg.loss].tasks,
         f"--loss {cfg.loss}: defined for --task {' or '.join(LOSSES[cfg.loss].tasks)}, not {cfg.task}; use one of "
         "those or another --loss"),
        (cfg.pixel_loss_weight + cfg.dice_weight > 0, "--pixel_loss_weight and --dice_weight cannot both be 0"),
        (cfg.cutmix_prob + cfg.mixup_prob <= 1,
         f"--cutmix_prob and --mixup_prob must add up to at most 1, got {cfg.cutmix_prob} and {cfg.mixup_prob}"),
        (cfg.swa_start_epoch <= cfg.epochs, f"--swa_start_epoch must be in [1, --epochs {cfg.epochs}] (0: off), "
         f"got {cfg.swa_start_epoch}"),
        (not (cfg.swa_start_epoch and cfg.ema_decay), "--swa_start_epoch and --ema_decay are two averages of the "
         "weights: choose one"),
        (cfg.torch_compile_mode == "default" or cfg.torch_compile_backend == "inductor",
         f"--torch_compile_mode {cfg.torch_compile_mode} is inductor's; --torch_compile_backend "
         f"{cfg.torch_compile_backend} takes only the default mode"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    if cfg.fold == -1:
        if cfg.final_eval or cfg.early_stopping_patience:
            raise UserError("--fold -1 trains on every case with no validation set: --final_eval and "
                            "--early_stopping_patience need one (giseg cv gives the cross-validated figures)")
        check_fold(0, cfg.n_folds)
    else:
        check_fold(cfg.fold, cfg.n_folds)
    get_adapter(cfg.dataset)
    parse_report_to(cfg.report_to)
    if cfg.push_to_hub and not cfg.hub_model_id:
        raise UserError("--push_to_hub needs --hub_model_id <owner/name>")
    if cfg.lr_milestones and not re.fullmatch(r"\d+(,\d+)*", cfg.lr_milestones):
        raise UserError(f"--lr_milestones must be comma-separated epochs like 6,9, got {cfg.lr_milestones!r}")
