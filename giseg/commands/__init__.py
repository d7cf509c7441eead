"""One module per `giseg <command>`: argument parsing and the command's own flow, on the layers below.

COMMANDS is the CLI's table: giseg/cli.py dispatches by it, the flag reference (commands/flags.py) has a
section per entry, and each entry's module has ``build_parser()`` and ``main(argv)``
(tests/commands/test_cli.py)."""

# subcommand -> (module under giseg.commands, one line for the overview)
COMMANDS = {
    "train": ("train", "fine-tune a model (every flag: giseg train --help); bash run_train.sh starts it in the background"),
    "launch": ("launch", "start a training run in the background with a log (what bash run_train.sh calls)"),
    "predict": ("predict", "predict every slice of a data folder with a model or an ensemble; write a submission"),
    "score": ("score", "score a submission against the ground truth: Dice, IoU, 3D Hausdorff, competition score"),
    "tune": ("tune", "choose thresholds, empty-slice gates and 3D post-processing out of fold; save them in the spec"),
    "cv": ("cv", "cross-validation: train every fold, then the CV table and the out-of-fold score"),
    "compare": ("compare", "compare run folders (figures, speed, size) as one Markdown table"),
    "figures": ("figures", "save a run's figures (curves, overlays, per-case table) as PNGs"),
    "app": ("app", "a local web page (Gradio, 127.0.0.1) to try a model on one scan"),
    "cache": ("cache", "list the decode-once caches (size, last use) and remove them (--clear)"),
    "demo-data": ("demo_data", "write the synthetic demo data (Kaggle GI layout, or LGG)"),
    "export-onnx": ("export_onnx", "export a trained model to ONNX (parity-checked) for --backend onnxruntime"),
    "export-hf": ("export_hf", "export a dataset as a Hugging Face `datasets` folder (optionally push it)"),
    "make-tiny": ("make_tiny", "save a small random model of a real architecture (offline tries, tests)"),
    "flags": ("flags", "print the flag reference of every command (docs/flags.md)"),
}
