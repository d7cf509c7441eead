"""One module per `giseg <command>`: argument parsing and the command's own flow, on the layers below.

COMMANDS is the CLI's table: giseg/cli.py dispatches by it, the flag reference (commands/flags.py) has a
section per entry, each entry's module has ``build_parser()`` and ``main(argv)`` (tests/commands/test_cli.py), and
``outputs`` names every flag that says where the command writes, a folder (DIR) or a file (FILE): each is claimed
before anything is written and never replaces what the command did not write (tests/commands/test_outputs.py runs
every one of them against a folder or a file of the user's)."""
from typing import NamedTuple

DIR, FILE = "dir", "file"


class Command(NamedTuple):
    module: str  # under giseg.commands
    about: str  # one line for the overview
    outputs: tuple[tuple[str, str], ...] = ()  # (output flag, DIR or FILE)


COMMANDS = {
    "train": Command("train", "fine-tune a model (every flag: giseg train --help); bash run_train.sh starts it in the "
                     "background", (("--output_dir", DIR),)),
    "launch": Command("launch", "start a training run in the background with a log (what bash run_train.sh calls)",
                      (("--output_dir", DIR), ("--log_file", FILE))),
    "predict": Command("predict", "predict every slice of a data folder with a model or an ensemble; write a "
                       "submission", (("--out", FILE),)),
    "score": Command("score", "score a submission against the ground truth: Dice, IoU, 3D Hausdorff, competition "
                     "score", (("--json", FILE),)),
    "tune": Command("tune", "choose thresholds, empty-slice gates and 3D post-processing out of fold; save them in "
                    "the spec", (("--out", FILE),)),
    "cv": Command("cv", "cross-validation: train every fold, then the CV table and the out-of-fold score",
                  (("--output_dir", DIR),)),
    "compare": Command("compare", "compare run folders (figures, speed, size) as one Markdown table"),
    "figures": Command("figures", "save a run's figures (curves, overlays, per-case table) as PNGs",
                       (("--out", DIR),)),
    "app": Command("app", "a local web page (Gradio, 127.0.0.1) to try a model on one scan"),
    "cache": Command("cache", "list the decode-once caches (size, last use) and remove them (--clear)"),
    "demo-data": Command("demo_data", "write the synthetic demo data (Kaggle GI layout, or LGG)", (("--out", DIR),)),
    "export-onnx": Command("export_onnx", "export a trained model to ONNX (parity-checked) for --backend "
                           "onnxruntime", (("--out", DIR),)),
    "export-hf": Command("export_hf", "export a dataset as a Hugging Face `datasets` folder (optionally push it)",
                         (("--out", DIR),)),
    "make-tiny": Command("make_tiny", "save a small random model of a real architecture (offline tries, tests)",
                         (("--out", DIR),)),
    "flags": Command("flags", "print the flag reference of every command (docs/flags.md)", (("--out", FILE),)),
}
