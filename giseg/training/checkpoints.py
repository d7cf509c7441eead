"""Resumable states: checkpoints/step_<N> (accelerator state + trainer_state.json, the manifest: every file's size
and SHA-256).

A state is written to a temporary folder and renamed; an incomplete, changed or foreign one is never resumed. The
schedule is saved as JSON (scheduler.json) and the average as safetensors; the optimizer moments and the RNG states
are Accelerate's pickles (loaded with torch.load(weights_only=True)), and they are opened only when the manifest
matches, byte for byte: a damaged, zeroed or swapped file is refused (a zeroed RNG state would otherwise be skipped
silently, and the resume would not be exact)."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from giseg.training.ema import WeightEMA, WeightSWA
from giseg.utils.errors import UserError, storage_guard
from giseg.utils.files import atomic_write_json, atomic_write_text, file_sha256, replace_dir


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
SCHEDULER_FILE = "scheduler.json"  # the learning-rate schedule's state
RESUMABLE_MARK = ".resumable"  # written once the run's first checkpoint is complete


def _step_dirs(root: Path) -> list[Path]:
    found = (p for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name))
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def checkpoint_problem(path: Path, run_id: str, verify: bool = False) -> str | None:
    """None when ``path`` is a complete checkpoint of run ``run_id``, else what is wrong with it. ``verify`` also
    compares every file with its checksum (done before a state is loaded)."""
    try:
        raw = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return f"no readable {STATE_FILE}"
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, dict) or not files:
        return f"{STATE_FILE} has no file list"
    if not all(isinstance(v, dict) and "sha256" in v for v in files.values()):
        return (f"{STATE_FILE} has no checksums (written by an earlier version, which also pickled the schedule); "
                "resume it with that version, or start over")
    present = {str(f.relative_to(path)) for f in path.rglob("*") if f.is_file()} - {STATE_FILE}
    if present - set(files):
        return f"{sorted(present - set(files))[0]} is not in its manifest (added after the save)"
    for name, meta in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != meta["size"]:
            return f"{name} is {'missing' if not f.is_file() else 'truncated' if f.stat().st_size < meta['size'] else 'larger than saved'}"
    if run_id and raw.get("run_id") != run_id:
        return f"it belongs to run {raw.get('run_id') or '(unknown)'}, not to run {run_id} of this output_dir"
    if verify:
        for name, meta in files.items():
            if file_sha256(path / name) != meta["sha256"]:
                return f"{name} does not match its checksum (changed or damaged since it was saved)"
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
            problem = checkpoint_problem(path, run_id, verify=True)
            if problem is None:
                return path
            notes.append(f"skipped checkpoint {path}: {problem}")
        return None
    path = Path(spec)
    problem = checkpoint_problem(path, run_id, verify=True) if path.is_dir() else "not a folder"
    if problem is not None:
        raise UserError(f"--resume_from_checkpoint {spec}: {problem}; use 'latest' or a complete folder under "
                        f"{output_dir / 'checkpoints'}")
    return path


def save_checkpoint(accelerator, output_dir: Path, state: TrainState, keep: int,
                    ema: WeightEMA | WeightSWA | None = None, scheduler=None) -> Path:
    """Accelerator state, the schedule (JSON), the average and trainer_state.json (the manifest: size and SHA-256 of
    every file, so an incomplete or changed copy is never used)
    to checkpoints/step_<N>, via a temporary folder and utils.replace_dir; older ones beyond ``keep`` are removed
    only after this one is complete."""
    root = output_dir / "checkpoints"
    final = root / f"step_{state.global_step:08d}"
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        # the main process creates the folder that every rank's save_state then finds (accelerate makes it on each
        # rank: otherwise whichever rank comes first creates it, and under several machines that may be another's)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with storage_guard(tmp, "a resumable state"):
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.save(tmp / ema.file)
        if scheduler is not None:
            atomic_write_json(tmp / SCHEDULER_FILE, scheduler.state_dict())
        files = {str(f.relative_to(tmp)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
                 for f in sorted(tmp.rglob("*")) if f.is_file()}
        atomic_write_json(tmp / STATE_FILE, {**dataclasses.asdict(state), "files": files})
        replace_dir(tmp, final)
        if not (output_dir / RESUMABLE_MARK).exists():
            atomic_write_text(output_dir / RESUMABLE_MARK, f"{state.run_id}\n")
        older = [p for p in _step_dirs(root) if int(p.name.split("_")[1]) < state.global_step]
        for p in older[:max(0, len(older) - (keep - 1))] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
