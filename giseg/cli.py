"""The `giseg` command: one entry, a subcommand per job (`giseg <command> --help` for each).

Training is `python trainer.py` (or `accelerate launch trainer.py`, or `bash run_train.sh`); everything else is here.
A command module is imported only when it runs, so `giseg --help` and a mistyped command cost no torch import.
"""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module under giseg.commands, one line for the overview)
COMMANDS = {
    "predict": ("predict", "predict every slice of a data folder with a model or an ensemble; write a submission"),
    "score": ("score", "score a submission against the ground truth: Dice, IoU, 3D Hausdorff, competition score"),
    "tune": ("tune", "choose thresholds, empty-slice gates and 3D post-processing out of fold; save them in the spec"),
    "cv": ("cv", "cross-validation: train every fold, then the CV table and the out-of-fold score"),
    "compare": ("compare", "compare run folders (figures, speed, size) as one Markdown table"),
    "figures": ("figures", "save a run's figures (curves, overlays, per-case table) as PNGs"),
    "app": ("app", "a local web page (Gradio, 127.0.0.1) to try a model on one scan"),
    "demo-data": ("demo_data", "write the synthetic demo data (Kaggle GI layout, or LGG)"),
    "export-onnx": ("export_onnx", "export a trained model to ONNX (parity-checked) for --backend onnxruntime"),
    "export-hf": ("export_hf", "export a dataset as a Hugging Face `datasets` folder (optionally push it)"),
    "make-tiny": ("make_tiny", "save a small random model of a real architecture (offline tries, tests)"),
    "flags": ("flags", "print the flag reference of every command (docs/flags.md)"),
}


def overview() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items())
    return (f"usage: giseg <command> [options]   (giseg <command> --help for its options)\n\n"
            f"Fine-tuning toolkit for Hugging Face segmentation models on GI-tract MRI.\n\ncommands:\n{rows}\n\n"
            "training: python trainer.py --help   (or bash run_train.sh; see README.md)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"giseg.commands.{COMMANDS[name][0]}")
    return module.main(rest) or 0
