"""Experiment tracking through Accelerate's trackers (``--report_to``): the figures of metrics.jsonl at the same
steps, the run config as hyper-parameters, from the main process only. ``none`` (the default) loads nothing.

    trackers = parse_report_to("tensorboard")         # checked at start: a missing package is one line
    Accelerator(log_with=trackers, project_config=ProjectConfiguration(project_dir=..., logging_dir=...))
    start(accelerator, trackers, run_name, config)     # accelerator.init_trackers
    log_record(accelerator, trackers, record)           # accelerator.log(..., step=record["step"])
"""
from __future__ import annotations

import importlib.util

from giseg.utils.errors import UserError
from giseg.utils.log import logger

# --report_to name -> (the module that must import, what to pip install)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}
LOG_FOLDER = "trackers"  # under --output_dir


def installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name][0]) is not None


def parse_report_to(value: str) -> list[str]:
    """``--report_to`` as a list of tracker names; ``all``: every installed one. A name that is unknown or whose
    package is missing is a UserError saying what to install."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names or names == ["none"]:
        return []
    if names == ["all"]:
        found = [n for n in TRACKERS if installed(n)]
        if not found:
            raise UserError(f"--report_to all: no tracker is installed; pip install one of {', '.join(TRACKERS)}")
        return found
    for n in names:
        if n not in TRACKERS:
            raise UserError(f"--report_to: unknown tracker {n!r}; choose from none, {', '.join(TRACKERS)}, all")
        if not installed(n):
            raise UserError(f"--report_to {n}: the package is not installed; pip install {TRACKERS[n][1]}")
    return names


def hparams(config: dict) -> dict:
    """The run config as tracker hyper-parameters: scalars kept, anything else as its string."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


def start(accelerator, trackers: list[str], run_name: str, config: dict) -> None:
    if trackers:
        accelerator.init_trackers(run_name, config=hparams(config))
        logger.info("trackers: %s, files under %s (tensorboard --logdir %s)", ", ".join(trackers),
                    accelerator.logging_dir, accelerator.logging_dir)


def log_record(accelerator, trackers: list[str], record: dict) -> None:
    """One evaluation's record (a metrics.jsonl row): every finite number, at the record's optimizer step."""
    if trackers:
        values = {k: float(v) for k, v in record.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step",) and v == v}
        accelerator.log(values, step=int(record["step"]))
