"""One Markdown row per run, to compare models on one table.

    python compare.py runs/*

Columns: run, model, parameters, epochs run, per-class and mean Dice of the best evaluation (per slice, the run's
--empty_dice rule), the competition score when the run has val_scores.json (trainer.py --final_eval or score.py
--json into the run folder), and the median training images/s from its log.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from safetensors import safe_open

from inference import InferenceSpec
from utils import UserError, command


def count_parameters(model_dir: Path) -> int | None:
    """Parameters of a saved model, read from the safetensors header (no weights loaded)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(f, "pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def summarise_run(run: Path) -> dict | None:
    """The comparison figures of one run folder, or None when it is not a run."""
    if not (run / "run_config.json").is_file() or not (run / "metrics.jsonl").is_file():
        return None
    cfg = json.loads((run / "run_config.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not records:
        return None
    best = max(records, key=lambda r: r["dice_mean"] if r["dice_mean"] is not None else -1)
    try:
        classes = InferenceSpec.load(run / "best").classes
    except UserError:
        return None  # no usable best/ model
    out = {"run": run.name, "model": cfg["base_model"], "task": cfg.get("task", "multilabel"),
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


@command
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (output_dir of trainer.py)")
    args = ap.parse_args(argv)
    rows = [r for r in (summarise_run(Path(p)) for p in args.runs) if r is not None]
    if not rows:
        raise UserError("none of the given folders is a run (run_config.json + metrics.jsonl + best/)")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
