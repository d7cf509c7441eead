"""One Markdown row per run, to compare models on one table.

    giseg compare runs/*

Columns: run, model, parameters, epochs run, per-class and mean Dice of the best evaluation (per slice, the run's
--empty_dice rule), the competition score when the run has val_scores.json (trainer.py --final_eval or giseg score
--json into the run folder), and the median training images/s from its log.
"""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from safetensors import safe_open

from giseg.inference.spec import InferenceSpec
from giseg.models.tasks import MULTILABEL, get_task
from giseg.utils.errors import UserError

BUFFERS = (".running_mean", ".running_var", ".num_batches_tracked")  # BatchNorm state: saved, not parameters


def count_parameters(model_dir: Path) -> int | None:
    """Parameters of a saved model, read from the safetensors header (no weights loaded); BatchNorm buffers are
    left out, so the count is the trainer log's ``sum(p.numel() for p in model.parameters())``."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(f, "pt") as st:
            for key in (k for k in st.keys() if not k.endswith(BUFFERS)):
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def run_folders(folder: Path) -> list[Path]:
    """The run folders of ``folder``: itself, or for a CV (giseg cv) its fold_<k> runs and its final model."""
    if (folder / "run_config.json").is_file() or not (folder / "cv_config.json").is_file():
        return [folder]
    folds = sorted((p for p in folder.glob("fold_*") if p.name.split("_")[1].isdigit()),
                   key=lambda p: int(p.name.split("_")[1]))
    return folds + ([folder / "final"] if (folder / "final" / "run_config.json").is_file() else [])


class NotComparable(Exception):
    """A folder with no figures to compare; the message says why."""


def summarise_run(run: Path) -> dict:
    """The comparison figures of one run folder; NotComparable says why a folder has none."""
    if not (run / "run_config.json").is_file():
        raise NotComparable("not a run (no run_config.json)")
    if not (run / "metrics.jsonl").is_file():
        raise NotComparable("no evaluation yet (no metrics.jsonl)")
    cfg = json.loads((run / "run_config.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not records:
        raise NotComparable("no evaluation yet (metrics.jsonl is empty)")
    if not get_task(cfg.get("task", MULTILABEL.name)).segments:
        raise NotComparable("a slice classifier (--task presence): its figures are AUC and F1, not Dice (its "
                            "metrics.jsonl and val_scores.json have them)")
    best = max(records, key=lambda r: r["dice_mean"] if r["dice_mean"] is not None else -1)
    try:
        classes = InferenceSpec.load(run / "best").classes
    except UserError as e:
        raise NotComparable(f"no usable best/ model ({e})") from None
    name = f"{run.parent.name}/{run.name}" if (run.parent / "cv_config.json").is_file() else run.name
    out = {"run": name, "model": cfg["base_model"], "task": cfg.get("task", MULTILABEL.name),
           "params": count_parameters(run / "best"), "epochs": records[-1]["epoch"], "best_epoch": best["epoch"],
           "classes": classes, **{f"dice_{c}": best.get(f"dice_{c}") for c in classes}, "dice_mean": best["dice_mean"],
           "score": None, "images_per_s": None}
    scores = run / "val_scores.json"
    if scores.is_file():
        out["score"] = json.loads(scores.read_text()).get("score")
    log = run / "train.log"
    if log.is_file():
        rates = [float(x) for x in re.findall(r"\| ([\d.]+) img/s", log.read_text())]
        if rates:
            out["images_per_s"] = statistics.median(rates)
    return out


def markdown(rows: list[dict]) -> str:
    def f(v, spec):
        return "–" if v is None else format(v, spec)

    classes = list(dict.fromkeys(c for r in rows for c in r["classes"]))  # every run's classes, in order
    head = ["run", "model", "task", "params", "epochs", *(f"dice {c}" for c in classes), "dice mean", "score", "img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in sorted(rows, key=lambda r: -(r["dice_mean"] or 0)):
        params = "–" if r["params"] is None else f"{r['params'] / 1e6:.2f}M"
        cells = [r["run"], r["model"], r["task"], params, f"{r['epochs']} (best {r['best_epoch']})",
                 *(f(r.get(f"dice_{c}"), ".4f") for c in classes), f(r["dice_mean"], ".4f"), f(r["score"], ".4f"),
                 f(r["images_per_s"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
