"""Building a run: data (index, split, cache), model with its spec, loaders, optimizer, schedule, loss, resume."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from giseg.data.base import DatasetAdapter
from giseg.data.cache import SliceCache, build_cache
from giseg.data.dataset import SliceDataset
from giseg.data.folds import data_changes, data_record, split_by_case
from giseg.data.hf.options import dataset_options
from giseg.data.masks import any_labelled, classes_present
from giseg.data.registry import get_adapter
from giseg.data.volumes import check_volume_sizes, neighbour_table
from giseg.evaluation.metrics import summarise
from giseg.inference.spec import InferenceSpec, model_input_channels, spec_flags
from giseg.models.registry import compile_refusal
from giseg.models.tasks import get_task
from giseg.training import batch_size
from giseg.training.checkpoints import SCHEDULER_FILE, TrainState, read_state
from giseg.training.config import TrainConfig
from giseg.training.ema import WeightEMA, WeightSWA, has_batchnorm
from giseg.training.losses import PresenceLoss, SegmentationLoss, make_loss
from giseg.training.mixing import BatchMixer
from giseg.training.optim import lr_factor, make_optimizer
from giseg.training.run_dir import OutputDir, check_output_dir
from giseg.training.volume import check_flags as check_volume_flags
from giseg.training.volume import is_volume_model, make_volume_loaders, resolve_patch
from giseg.utils.claims import check_no_overlap
from giseg.utils.errors import UserError
from giseg.utils.files import atomic_write_json
from giseg.utils.log import logger, wrap
from giseg.utils.memory import release_memory


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
    loss_fn: SegmentationLoss | PresenceLoss
    total_steps: int
    state: TrainState = field(default_factory=TrainState)
    history: list[dict] = field(default_factory=list)
    stop: bool = False  # max_train_steps reached, or early stopping
    query_based: bool = False  # a mask-classification model (Mask2Former), trained with its own loss
    family: str = ""  # the model family (models/), for the model cards
    trackers: list = field(default_factory=list)  # --report_to, parsed
    ema: WeightEMA | WeightSWA | None = None  # --ema_decay or --swa_start_epoch: the average that evaluation and
    # the saved models use
    mixer: BatchMixer | None = None  # --cutmix_prob, --mixup_prob
    ema_source: torch.nn.Module | None = None  # the unwrapped model it follows


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
                            verify=cfg.verify_cache, crop_margin=cfg.crop_margin if cfg.body_crop else None)
    if cache.boxes is not None:
        b = cache.boxes.astype(np.float64)
        share = (b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2]) / (index["height"].to_numpy() * index["width"].to_numpy())
        logger.info("body crop: each volume's slices cut to its body's box (margin %d px) before resizing: the boxes "
                    "keep %.0f%% of a slice's area on average (%.0f%%-%.0f%%)", cfg.crop_margin, 100 * share.mean(),
                    100 * share.min(), 100 * share.max())
    if adapter.may_have_unlabelled:  # (a label map: 255 is unlabelled; an all-255 part would "score" Dice 1.0)
        for part, rows in (("training", train_rows), ("validation", val_rows)):
            if len(rows) and not any_labelled(cache.masks, rows):
                raise UserError(f"{cfg.data_dir}: every pixel of the {len(rows)} {part} slices (fold {cfg.fold}) is "
                                "unlabelled (255): there is nothing to learn or to score (an empty truth would score "
                                "Dice 1.0). Check the label column and --reduce_labels")
    # the cache holds the masks now: drop the codes, and give back what reading them took (the training process and
    # each data-loader worker forked from it would otherwise grow with the dataset)
    index = adapter.without_labels(index)
    release_memory()
    neighbours = neighbour_table(index, cfg.context_slices, cfg.context_stride, adapter.volume_columns,
                                 adapter.channels)
    if cfg.fold == -1:
        logger.info("data: %d slices, %d cases from %s (%s); --fold -1: all of them train, no validation set",
                    len(index), index["case"].nunique(), cfg.data_dir, adapter.name)
        return Data(index, train_rows, val_rows, cache, neighbours)
    val_cases = sorted(index["case"].iloc[val_rows].unique())
    logger.info("data: %d slices, %d cases from %s (%s); fold %d/%d: train %d slices (%d cases), val %d slices "
                "(%s %s)", len(index), index["case"].nunique(), cfg.data_dir, adapter.name, cfg.fold, cfg.n_folds,
                len(train_rows), index["case"].iloc[train_rows].nunique(), len(val_rows),
                "case" if len(val_cases) == 1 else "cases", ",".join(map(str, val_cases)))
    if len(val_rows) == 0 or len(train_rows) == 0:
        raise UserError(f"fold {cfg.fold} leaves the {'validation' if len(val_rows) == 0 else 'training'} set empty")
    # the truth as the evaluation sees it (the cache, at --image_size): the floor is in the log's own terms
    shown = classes_present(cache.masks, val_rows, len(adapter.classes))
    if not get_task(cfg.task).segments:
        logger.info("presence on this validation set: %s; %.1f%% of its slices show no class", ", ".join(
            f"{c} on {100 * shown[:, k].mean():.1f}%" for k, c in enumerate(adapter.classes)),
            100 * (~shown.any(1)).mean())
        return Data(index, train_rows, val_rows, cache, neighbours)
    nothing = np.stack([np.zeros_like(shown), np.zeros_like(shown), shown], axis=-1).astype(float)
    logger.info("floor: predicting nothing scores mean Dice %.4f on this validation set (--empty_dice %s); read the "
                "evaluations against it", summarise(nothing, cfg.empty_dice, adapter.classes)["dice_mean"],
                cfg.empty_dice)
    return Data(index, train_rows, val_rows, cache, neighbours)


def check_data_unchanged(out: OutputDir, record: dict, is_main: bool) -> None:
    """A resume trains on the data and split the run started with (data_record, saved in run_config.json): a case
    removed or added since (which would move a training case into validation) is refused with one line naming
    the change. A fresh run records it."""
    path = out.path / "run_config.json"
    saved = json.loads(path.read_text())
    if out.resume is not None and "data" in saved:
        change = data_changes(saved["data"], record)
        if change:
            raise UserError(f"cannot resume {out.path}: the data changed since the run started ({change}); resuming "
                            "would go on with another split. Restore the data, or start a new run "
                            "(--overwrite_output_dir, or another --output_dir)")
    elif is_main and saved.get("data") != record:
        atomic_write_json(path, {**saved, "data": record})


def build_model(cfg: TrainConfig, adapter: DatasetAdapter, processes: int) -> tuple[torch.nn.Module, InferenceSpec, str]:
    """The checkpoint with a new head for the adapter's classes, wrapped to return (logits, aux), the inference
    spec saved with it, and its family. Under DDP (``processes`` > 1) gradients are put in their parameters'
    layout."""
    from giseg.models.load import load_model  # transformers (2 s): not for a refused argument
    from giseg.models.wrapper import SegmentationModel, freeze_unused_parameters, match_gradient_layout

    loaded = load_model(cfg.base_model, cfg.task, adapter.classes, cfg.aux_weight, cfg.allow_bin,
                        in_channels=model_input_channels(cfg.context_slices, adapter.channels),
                        head_prior=cfg.head_prior, modalities=adapter.channels)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    logger.info("model: %s (%s), %.2fM parameters, task %s, labels %s", cfg.base_model, loaded.family, n_params / 1e6,
                cfg.task, list(loaded.model.config.id2label.values()))
    for line in wrap("re-initialised for our labels: ", loaded.reinitialised or ["nothing (head already fits)"], "; "):
        logger.info("%s", line)
    logger.info("input normalisation: mean %s, std %s (%s)", list(loaded.mean), list(loaded.std), loaded.stats_source)
    spec = InferenceSpec(dataset=adapter.name, classes=adapter.classes, mean=loaded.mean, std=loaded.std,
                         **{f.name: getattr(cfg, f.name) for f in spec_flags()},  # task, image_size, context ...
                         thresholds=(cfg.threshold,) * get_task(cfg.task).n_thresholds(adapter.classes),
                         split={"n_folds": cfg.n_folds, "fold": cfg.fold, "split_seed": cfg.split_seed},
                         dataset_options=adapter.options or None, channels=adapter.channels)
    if get_task(cfg.task).background and cfg.threshold != TrainConfig.threshold:
        logger.warning("--threshold %g is ignored: a multiclass model takes the argmax over background and classes",
                       cfg.threshold)
    volume = is_volume_model(loaded.model)
    check_volume_flags(cfg, volume)
    if volume:
        spec = dataclasses.replace(spec, patch_size=resolve_patch(cfg, loaded.model))
    model = SegmentationModel(loaded.model)
    frozen = freeze_unused_parameters(model)
    if frozen:
        logger.info("frozen %d parameter tensors the architecture never uses: %s", len(frozen),
                    ", ".join(n.removeprefix("hf.") for n in frozen[:4]) + (" ..." if len(frozen) > 4 else ""))
    if cfg.channels_last or volume:  # (3D: channels_last_3d, faster 3D convolutions: benchmarks/volume_step.py)
        model = model.to(memory_format=torch.channels_last_3d if volume else torch.channels_last)
    if processes > 1:  # only DDP compares layouts; one process needs no hook per parameter per step
        match_gradient_layout(model)
    return model, spec, loaded.family


def compile_model(cfg: TrainConfig, model: torch.nn.Module, family: str, spec: InferenceSpec) -> None:
    """--torch_compile, in place (nn.Module.compile): the state's keys stay the plain model's, no "_orig_mod."."""
    config = model.hf.config
    refusal = compile_refusal(family, cfg.torch_compile_mode, getattr(config, "architecture", "") or getattr(
        config, "encoder", ""))
    if refusal:
        raise UserError(refusal)
    install_output_hooks(model, cfg.image_size)
    model.compile(**compile_options(cfg))
    logger.info("torch.compile: backend %s, mode %s (the first steps compile)", cfg.torch_compile_backend,
                cfg.torch_compile_mode)


def compile_options(cfg: TrainConfig) -> dict:
    """torch.compile's backend and mode for --torch_compile_backend and --torch_compile_mode."""
    return {"backend": cfg.torch_compile_backend,
            "mode": None if cfg.torch_compile_mode == "default" else cfg.torch_compile_mode}


def install_output_hooks(model: torch.nn.Module, size: int) -> None:
    """One forward of a blank image, in eval mode without gradients (no running statistic moves): transformers
    installs its hidden-state hooks on a model's first forward, under a lock that torch.compile cannot trace (a graph
    break in every SegFormer, DPT and BEiT step); done here, the compiled step has none."""
    from giseg.models.wrapper import blank_input  # (transformers: imported with the model already)

    was_training, device = model.training, next(model.parameters()).device  # (on the GPU after --auto_batch_size)
    model.eval()
    with torch.no_grad():
        model(blank_input(model.hf, size, device))
    model.train(was_training)


def compiled_loss(loss_fn, cfg: TrainConfig):
    """The loss compiled like the model (--torch_compile): the step's forward and loss, and their backward, run as
    compiled graphs (tests/training/test_compile.py: no graph break in any family's but Mask2Former's)."""
    return torch.compile(loss_fn.__call__, **compile_options(cfg))


def make_loaders(cfg: TrainConfig, data: Data, spec: InferenceSpec, device: torch.device, processes: int,
                 unlabelled: bool = False):
    from giseg.data.augment import train_transform  # albumentations (1 s): only where training needs it

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
    transform = train_transform(cfg.image_size, cfg.strong_aug, cfg.seed, unlabelled)
    train_ds = SliceDataset(data.cache, rows, data.neighbours, transform,
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
    check_data_unchanged(out, data_record(data.index, data.train_rows, data.val_rows), accelerator.is_main_process)
    model, spec, family = build_model(cfg, adapter, accelerator.num_processes)
    if cfg.auto_batch_size:  # (before compiling: the search's batch sizes would each compile)
        shape = (spec.input_channels(), cfg.image_size, cfg.image_size)
        batch, lr = batch_size.resolve(cfg, model, accelerator, out.path, shape, len(data.train_rows))
        cfg = dataclasses.replace(cfg, train_batch_size=batch, lr=lr)
    if cfg.torch_compile:
        compile_model(cfg, model, family, spec)
    if spec.patch() is not None:  # a 3D model: patches; each process scores its share of the validation volumes
        train_dl, val_dl = make_volume_loaders(cfg, data, spec, adapter.volume_columns, accelerator.process_index,
                                               accelerator.num_processes)
    else:
        train_dl, val_dl = make_loaders(cfg, data, spec, accelerator.device, accelerator.num_processes,
                                        adapter.may_have_unlabelled)
    optimizer = make_optimizer(cfg, model, accelerator.device)
    if val_dl is not None and spec.patch() is None:
        model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)
    else:  # --fold -1, or a 3D model's validation volumes (shared out by make_volume_loaders)
        model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    steps_per_epoch = math.ceil(len(train_dl) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_train_steps or cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg, steps_per_epoch))
    loss_fn = make_loss(
        cfg.loss, cfg.task, adapter.classes, adapter.priority, pixel_weight=cfg.pixel_loss_weight,
        dice_weight=cfg.dice_weight, lovasz_weight=cfg.lovasz_weight, focal_gamma=cfg.focal_gamma,
        tversky_alpha=cfg.tversky_alpha, tversky_beta=cfg.tversky_beta, dice_absent=cfg.dice_absent,
        unlabelled=adapter.may_have_unlabelled)
    query_based = getattr(accelerator.unwrap_model(model), "query_based", False)
    if cfg.torch_compile and not query_based:
        loss_fn = compiled_loss(loss_fn, cfg)
    run = Run(cfg, accelerator, out.path, adapter, data, spec, model, optimizer, scheduler, train_dl, val_dl, loss_fn,
              total_steps, state=TrainState(run_id=out.run_id))
    run.query_based = query_based
    run.family = family
    add_mixing(run, cfg)
    add_weight_average(run, cfg, total_steps)
    if out.resume is not None:
        restore(run, out.resume)
    logger.info("training: %d epoch%s x %d steps (%d total), batch %d x %d processes x %d accumulation, lr %g %s",
                cfg.epochs, "" if cfg.epochs == 1 else "s", steps_per_epoch, total_steps, cfg.train_batch_size, accelerator.num_processes,
                cfg.gradient_accumulation_steps, cfg.lr, cfg.scheduler_name)
    run.stop = run.state.global_step >= total_steps
    return run


def add_mixing(run: Run, cfg: TrainConfig) -> None:
    """--cutmix_prob / --mixup_prob: the run's batch mixer."""
    if not (cfg.cutmix_prob or cfg.mixup_prob):
        return
    if run.query_based:
        raise UserError("--cutmix_prob / --mixup_prob: Mask2Former trains on one mask per label present in a "
                        "slice, which a mixed batch does not have; leave them at 0 for this model")
    run.mixer = BatchMixer(cfg.cutmix_prob, cfg.mixup_prob, cfg.mix_alpha, cfg.seed)
    logger.info("batch mixing: CutMix with probability %g, else MixUp with probability %g, lam ~ Beta(%g, %g)",
                cfg.cutmix_prob, cfg.mixup_prob, cfg.mix_alpha, cfg.mix_alpha)


def add_weight_average(run: Run, cfg: TrainConfig, total_steps: int) -> None:
    """--ema_decay / --swa_start_epoch: the average of the weights that evaluation and saving use."""
    accelerator, model = run.accelerator, run.model
    average = "--ema_decay" if cfg.ema_decay else "--swa_start_epoch" if cfg.swa_start_epoch else ""
    if average:  # (validate_config refuses both at once)
        if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
            raise UserError(f"{average} is not supported with {accelerator.distributed_type.value} (sharded "
                            "weights); use DDP, or leave it at 0")
        run.ema_source = accelerator.unwrap_model(model)
    if cfg.ema_decay:
        run.ema = WeightEMA(run.ema_source, cfg.ema_decay)
        logger.info("EMA of the weights: decay %g after every optimizer step (warmed up: min(decay, (1 + t) / "
                    "(10 + t)) at step t); evaluation, best/ and last/ use it", cfg.ema_decay)
        horizon = 1 / (1 - cfg.ema_decay)
        if horizon > total_steps / 2:
            logger.warning("--ema_decay %g averages over about %d steps, but this run has %d: its average still holds "
                           "weights of the run's first half at the end; for %d steps take about %.3g, or 0 (off)",
                           cfg.ema_decay, round(horizon), total_steps, total_steps, 1 - 10 / max(total_steps, 20))
    if cfg.swa_start_epoch:
        run.ema = WeightSWA(run.ema_source, cfg.swa_start_epoch)
        logger.info("SWA of the weights: the equal average of the weights at the end of epochs %d..%d; evaluation, "
                    "best/ and last/ use it from epoch %d on%s", cfg.swa_start_epoch, cfg.epochs, cfg.swa_start_epoch,
                    ", BatchNorm statistics recomputed for it on the training slices" if has_batchnorm(model) else "")


def restore(run: Run, resume: Path) -> None:
    """The run's state from the checkpoint ``resume``: weights, optimizer, schedule, averages, counters, history."""
    run.accelerator.load_state(str(resume))  # (its files were checked against the manifest: checkpoints.py)
    run.scheduler.load_state_dict(json.loads((resume / SCHEDULER_FILE).read_text()))
    if run.ema is not None:
        if not (resume / run.ema.file).is_file():
            raise UserError(f"{resume}: no {run.ema.file} (the run had no --ema_decay or --swa_start_epoch?); "
                            "resume with its settings")
        run.ema.load(resume / run.ema.file)
    run_id = run.state.run_id
    run.state = read_state(resume)
    run.state.run_id = run_id  # (a checkpoint of an older version has none)
    metrics_file = run.output_dir / "metrics.jsonl"
    if metrics_file.exists():  # the evaluations this state knows of; later rows (written after it) are redone
        run.history = [r for r in map(json.loads, metrics_file.read_text().splitlines())
                       if r["step"] <= run.state.evaluated_step]
    logger.info("resumed from %s: step %d, epoch %d, batch %d of that epoch, best mean Dice %.4f", resume,
                run.state.global_step, run.state.epoch + 1, run.state.batches_in_epoch, run.state.best_dice)


def launched_without_accelerator() -> bool:
    """Several processes (torchrun, ``accelerate launch`` with a multi-GPU config) on a machine with no GPU or
    other accelerator: Accelerate must be told to use the CPU (gloo), or each process would train alone."""
    accel = getattr(torch, "accelerator", None)
    available = accel.is_available() if accel is not None else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not available


def check_run(cfg: TrainConfig) -> str:
    """--check_only: the arguments (validated before), the data folder (its index, every label checked) and the split,
    and the model, in a few seconds and with nothing written. Returns one line saying what was found."""
    from giseg.models.load import check_base_model  # transformers (1.8 s)

    check_no_overlap(Path(cfg.output_dir), {"--data_dir": cfg.data_dir, "--base_model": cfg.base_model}, "--output_dir")
    start = check_output_dir(cfg)  # the run's own decision on its folder (run_dir.py), dry: they cannot disagree
    adapter = get_adapter(cfg.dataset).bind(cfg.data_dir, dataset_options(cfg))
    index = adapter.build_index(cfg.data_dir)
    if cfg.fold != -1:
        split_by_case(index, cfg.fold, cfg.n_folds, cfg.split_seed)
    model = check_base_model(cfg.base_model, cfg.allow_bin)
    return (f"checked: data {cfg.data_dir} ({adapter.name}: {len(index)} slices, {index['case'].nunique()} cases), "
            f"model {model}, {start}, arguments")
