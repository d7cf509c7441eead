"""The training loop: fine-tune a Hugging Face segmentation model (or a CNN baseline, or a slice classifier) on
UW-Madison GI-tract MRI or any --dataset adapter, with Accelerate.

Single process:   giseg train --base_model <hub id or folder> --data_dir <kaggle folder> --output_dir runs/x
                  (python trainer.py ... in the checkout is the same)
Several GPUs:     accelerate launch --multi_gpu --num_processes 2 -m giseg train ...   (or GPUS=0,1 bash run_train.sh;
                  accelerate launch ... trainer.py ... too)

Writes to --output_dir: run_config.json, train.log, metrics.jsonl (one JSON object per evaluation), best/ and
last/ (save_pretrained folders that AutoModelForSemanticSegmentation / AutoImageProcessor load, with the
inference_spec.json that giseg predict reads) and checkpoints/step_<N>/ (accelerator state for
--resume_from_checkpoint latest).

The loop reads top to bottom: train() sets the run up (giseg/training/: configuration, run folder and identity, data,
model, loaders, optimizer), train_epochs() runs the epochs, train_one_epoch() the batches (training_step per batch,
after_optimizer_step per optimizer step), end_epoch() evaluates and saves (best/, last/, a resumable state), and
evaluation/final.py scores best/ at original sizes (--final_eval). Every flag: giseg train --help
(giseg/training/config.py).
"""
from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

import torch

from giseg.data.dataset import SliceDataset
from giseg.evaluation.final import final_evaluation, final_presence
from giseg.evaluation.metrics import describe
from giseg.evaluation.presence import describe_presence, evaluate_presence, selection_figure
from giseg.evaluation.validation import evaluate
from giseg.inference.segmenter import Segmenter, upsample_like
from giseg.models.tasks import get_task
from giseg.training.build import Run, build_run, check_run, launched_without_accelerator
from giseg.training.checkpoints import save_checkpoint
from giseg.training.config import TrainConfig, parse_config, validate_config
from giseg.training.ema import WeightSWA, has_batchnorm, recompute_batchnorm
from giseg.training.meter import LossMeter
from giseg.training.optim import should_stop_early
from giseg.training.run_dir import open_output_dir
from giseg.training.tracking import LOG_FOLDER as TRACKER_FOLDER
from giseg.training.tracking import log_record, parse_report_to
from giseg.training.tracking import start as start_trackers
from giseg.utils.errors import storage_guard
from giseg.utils.exits import StopSignals, Stopped, command
from giseg.utils.files import atomic_write_text, json_safe
from giseg.utils.log import logger, quiet_third_party
from giseg.utils.memory import keep_freed_memory

# transformers (giseg.models), accelerate and albumentations are imported where they are used: together they cost
# about 3 s of start-up that `--help` and a rejected argument do not need.


def train(cfg: TrainConfig) -> dict:
    """Run the whole fine-tuning; returns the last evaluation's figures (with final_* ones after --final_eval)."""
    validate_config(cfg)
    quiet_third_party()
    keep_freed_memory()  # 9 % of a CPU step was the allocator faulting in the previous step's freed blocks again
    if cfg.check_only:  # run_train.sh's check before it starts a run in the background: nothing is written
        print(check_run(cfg), flush=True)
        return {}
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
    if accelerator.device.type == "cuda" and cfg.tf32:  # float32 matmuls and convolutions on tensor cores (Ampere+)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
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
            best = next((r for r in run.history if r["step"] == run.state.best_step), None)
            logger.info("done: %d steps, best %s %.4f at step %d (%s)", run.state.global_step,
                        selected(best, not get_task(cfg.task).segments)[0] if best else "figure", run.state.best_dice,
                        run.state.best_step, run.output_dir / "best")
        if cfg.final_eval:
            if accelerator.is_main_process:
                presence = not get_task(cfg.task).segments
                final = (final_presence if presence else final_evaluation)(out.path, cfg, run.adapter, run.data,
                                                                           accelerator.device)
                last = {**last, **{f"final_{k}": v for k, v in final.items()}}
                best = next((r for r in run.history if r["step"] == run.state.best_step), None)
                if best is not None and (out.path / "best").is_dir() and not presence:  # the card gets the score
                    atomic_write_text(out.path / "best" / "README.md", model_card(run, "best", best, final))
            accelerator.wait_for_everyone()
        if cfg.push_to_hub and accelerator.is_main_process:
            from giseg.training.model_card import push_folder  # huggingface_hub: only for --push_to_hub

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
    with StopSignals(at_once=False) as stop_signal:
        for epoch in range(run.state.epoch, run.cfg.epochs):
            if run.state.batches_in_epoch < len(run.train_dl) and not run.stop:
                train_one_epoch(run, epoch, stop_signal, meter)
            if run.state.evaluated_step < run.state.global_step:
                last = end_epoch(run, epoch, meter)
                meter.restart_clock()
            if run.stop:
                break
    return last


def train_one_epoch(run: Run, epoch: int, stop_signal: StopSignals, meter: LossMeter) -> None:
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
    trace = run.cfg.trace_rows
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


def training_step(run: Run, batch: dict) -> torch.Tensor:
    """Forward, loss (plus the auxiliary head's), backward, clipping and the optimizer step of one batch."""
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    pixels = batch["pixel_values"]
    if pixels.ndim == 5:  # a 3D model's patches, in its weights' layout (training/volume.py)
        pixels = pixels.contiguous(memory_format=torch.channels_last_3d)
    elif cfg.channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    with accelerator.accumulate(model):
        if run.query_based:  # Mask2Former: its own Hungarian-matched loss on one mask per present label
            from giseg.models.wrapper import query_targets  # (transformers: imported with the model already)

            targets = query_targets(batch["mask"], cfg.task, run.adapter.classes, run.adapter.priority)
            with accelerator.autocast():
                _, loss = model(pixels, targets)
        elif not get_task(cfg.task).segments:  # a slice classifier: (B, C) logits against the classes each slice shows
            with accelerator.autocast():
                logits, _ = model(pixels)
            loss = run.loss_fn(logits, batch["mask"])
        else:
            masks, mix = batch["mask"], None
            if run.mixer is not None:  # CutMix / MixUp, drawn from (seed, epoch, batch, process): resumes replay them
                pixels, masks, mix = run.mixer(pixels, masks, run.state.epoch, run.state.batches_in_epoch,
                                               accelerator.process_index)
            with accelerator.autocast():
                logits, aux = model(pixels)
            if logits.ndim == 5:  # a 3D model's (B, K, d, h, w) patches: the loss sees their B x d slices
                logits, masks = logits.transpose(1, 2).flatten(0, 1), masks.flatten(0, 1)
            size = masks.shape[-2:]
            loss = run.loss_fn(upsample_like(logits, size), masks, mix)
            if aux is not None and cfg.aux_weight > 0:
                loss = loss + cfg.aux_weight * run.loss_fn(upsample_like(aux, size), masks, mix)
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def after_optimizer_step(run: Run, meter: LossMeter, epoch: int, stop_signal: StopSignals) -> None:
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
        resume = f"continue with: giseg train --resume_run {run.output_dir} (or RESUME={run.output_dir} bash run_train.sh)"
        logger.warning("stopped by %s after step %d: saved resumable state %s; %s", name, step, path, resume)
        raise Stopped(signum, f"saved resumable state {path} at step {step}; {resume}")
    run.stop = step >= run.total_steps


def agreed_signal(accelerator, signum: int, step: int, log_every: int) -> int:
    """The signal every rank acts on: one process decides alone; several agree at each log step (a collective
    every log interval, not every step), or as soon as one of them has a signal (it waits for the others)."""
    if accelerator.num_processes == 1:
        return signum
    if step % log_every and not signum:
        return 0
    flag = torch.tensor(float(signum), device=accelerator.device)
    return int(accelerator.reduce(flag, "max").item())


def log_progress(run: Run, meter: LossMeter, epoch: int) -> None:
    """The periodic log line (the one host sync of the training loop); a NaN/inf loss stops the run."""
    step = run.state.global_step
    mean_loss = float(run.accelerator.reduce(meter.running, "mean")) / max(1, meter.running_n)
    if bool(meter.nonfinite):
        raise FloatingPointError(f"loss became NaN/inf between step {step - meter.running_n + 1} and {step}; "
                                 "best/ and the last checkpoint hold the last good model. Lower --lr or use "
                                 "--mixed_precision bf16 instead of fp16")
    device = run.accelerator.device  # (the allocator's peak: a host-side counter, no device sync)
    memory = f" | peak GPU {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB" if device.type == "cuda" else ""
    logger.info("epoch %d step %d/%d | train_loss %.4f | lr %.3g | %.1f img/s | %s%s", epoch + 1, step,
                run.total_steps, mean_loss, run.scheduler.get_last_lr()[0], meter.bank(),
                meter.eta(step, run.total_steps), memory)
    meter.running.zero_()
    meter.running_n = 0


def save_state(run: Run, meter: LossMeter) -> Path:
    """A resumable state of this moment, with the epoch's running loss sum."""
    run.state.epoch_loss_sum = meter.epoch_sum(run.accelerator)
    return save_checkpoint(run.accelerator, run.output_dir, run.state, run.cfg.save_total_limit, run.ema,
                           run.scheduler)


def end_epoch(run: Run, epoch: int, meter: LossMeter) -> dict:
    """Evaluate, keep the best model, decide on early stopping, save last/, metrics.jsonl and a resumable state
    that records this evaluation (so a resume neither repeats nor skips it). Returns the evaluation's record."""
    cfg, state, out = run.cfg, run.state, run.output_dir
    train_loss = meter.epoch_sum(run.accelerator) / max(1, meter.epoch_n)
    images_per_s = meter.banked_rate()
    whole_epoch = state.batches_in_epoch >= len(run.train_dl)
    if isinstance(run.ema, WeightSWA) and whole_epoch and run.ema.end_epoch(run.ema_source, epoch + 1):
        swa_snapshot(run, epoch)
    model = run.ema.model if run.ema is not None else run.model
    presence = not get_task(cfg.task).segments  # a slice classifier: AUC / F1 / empty slices kept empty, not Dice
    if run.val_dl is None:
        figures = {}
    elif presence:
        figures = evaluate_presence(model, run.val_dl, run.accelerator, run.spec.thresholds, run.spec.classes)
    else:
        figures = evaluate(Segmenter(model, run.spec, run.accelerator.device), run.val_dl, run.loss_fn,
                           run.accelerator, cfg.empty_dice)
    record = {"epoch": epoch + 1, "step": state.global_step, "train_loss": train_loss,
              "lr": run.scheduler.get_last_lr()[0], "images_per_s": images_per_s, **figures}
    run.history = [r for r in run.history if r["step"] < state.global_step] + [record]  # one row per evaluated step
    state.evaluated_step = state.global_step
    if figures:
        logger.info("eval epoch %d | loss %.4f | %s", epoch + 1, figures["val_loss"],  # (step: the line above)
                    (describe_presence if presence else describe)(figures, run.spec.classes))
        if figures.get("global_dice_mean") == 0:  # the pooled Dice: 0 when no organ pixel is predicted right
            logger.info("eval epoch %d: no organ pixel predicted yet: the mean Dice of predicting nothing (usual early "
                        "on, from random weights)", epoch + 1)
    else:
        logger.info("epoch %d step %d | train_loss %.4f | no validation set (--fold -1): best/ is this model",
                    epoch + 1, state.global_step, train_loss)
    if whole_epoch:  # the state points at the next epoch
        state.epoch, state.batches_in_epoch = epoch + 1, 0
        meter.new_epoch()
    if not figures:  # --fold -1: the latest model is the one to keep
        state.best_step = state.global_step
        save_models(run, "best", record)
    metric, value = selected(figures, presence) if figures else ("", 0.0)
    if figures and value > state.best_dice:  # (best_dice: the mean AUC of a presence run, or its stand-in)
        state.best_dice, state.best_step = value, state.global_step
        save_models(run, "best", record)
        logger.info("new best %s %.4f at step %d: saved %s", metric, state.best_dice, state.global_step,
                    out / "best")
    if should_stop_early(run.history, state.best_step, cfg.early_stopping_patience):
        logger.info("early stopping: no better %s than %.4f (step %d) for %d evaluations", metric,
                    state.best_dice, state.best_step, cfg.early_stopping_patience)
        run.stop = True
    if cfg.save_last:
        save_models(run, "last", record)
    if run.accelerator.is_main_process:
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(json_safe(r)) + "\n" for r in run.history))
    log_record(run.accelerator, run.trackers, record)
    path = save_state(run, meter)
    logger.info("saved %sresumable state %s in %s", "last/ and " if cfg.save_last else "", path.relative_to(out)
                if path.is_relative_to(out) else path, out)  # (the run's folder once: the line fits 160 columns)
    return record


def selected(figures: dict, presence: bool) -> tuple[str, float]:
    """(name, value) of the figure best/ is chosen by: the mean Dice, or a slice classifier's mean AUC (or its
    stand-in where no AUC is defined: evaluation/presence.py)."""
    return selection_figure(figures) if presence else ("mean Dice", figures["dice_mean"])


def swa_snapshot(run: Run, epoch: int) -> None:
    """After the weights of ``epoch`` joined the SWA average: its BatchNorm statistics recomputed on the training
    slices (unaugmented, in order; every rank the same, as the weights are), when the model has BatchNorm."""
    if not has_batchnorm(run.ema.model):
        logger.info("SWA: epoch %d joined the average (%d epochs averaged)", epoch + 1, run.ema.averaged)
        return
    data, spec = run.data, run.spec
    loader = torch.utils.data.DataLoader(SliceDataset(data.cache, data.train_rows, data.neighbours, None, spec.mean,
                                                      spec.std), batch_size=run.cfg.eval_batch_size)
    t = time.perf_counter()
    seen = recompute_batchnorm(run.ema.model, loader, run.accelerator.device)
    logger.info("SWA: epoch %d joined the average (%d epochs averaged); BatchNorm statistics recomputed on %d "
                "training slices in %.1f s", epoch + 1, run.ema.averaged, seen, time.perf_counter() - t)


def save_models(run: Run, tag: str, record: dict) -> None:
    """best/ or last/: save_pretrained folder + image processor + inference spec + model card (gathered on every
    rank)."""
    from giseg.models.load import save_model  # transformers (1.8 s): not for --help or a rejected argument

    if run.ema is not None:  # the average (never sharded: --ema_decay refuses FSDP and DeepSpeed)
        sd = run.ema.model.state_dict()
    else:
        sd = run.accelerator.get_state_dict(run.model)  # all ranks (needed under DeepSpeed ZeRO-3 / FSDP)
    if run.accelerator.is_main_process:
        sd = {k.removeprefix("hf."): v for k, v in sd.items()}  # (--torch_compile compiles in place: plain keys)
        wrapper = run.ema.model if run.ema is not None else run.accelerator.unwrap_model(run.model)
        with storage_guard(run.output_dir / tag, f"the {tag}/ model"):
            save_model(wrapper.hf, run.output_dir / tag, run.spec, state_dict=sd,
                       card=model_card(run, tag, record))


def model_card(run: Run, tag: str, record: dict, scores: dict | None = None) -> str:
    """The README.md of best/ or last/ (training/model_card.py) for the evaluation ``record``."""
    from giseg.training.model_card import card_text  # huggingface_hub: only when a model is saved

    cfg, d = run.cfg, run.data
    sizes = {"slices": len(d.index), "cases": int(d.index["case"].nunique()), "train": len(d.train_rows),
             "val": len(d.val_rows)}
    return card_text(config=dataclasses.asdict(cfg), spec=run.spec, record=record, family=run.family,
                     split_sizes=sizes, scores=scores, repo=cfg.hub_model_id or str(run.output_dir / tag), what=tag)


@command
def main(argv: list[str] | None = None) -> int:
    """The CLI: exit 0 when done, 2 for bad input, 3 for a NaN/inf loss, 128 + N when stopped by signal N (@command:
    the loop raises Stopped after saving)."""
    cfg = parse_config(argv)
    try:
        train(cfg)
    except FloatingPointError as e:
        logger.error("stopped: %s", e)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
