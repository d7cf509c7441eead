"""The `giseg` command: one entry, a subcommand per job (`giseg <command> --help` for each).

Training is `giseg train` (or `python trainer.py` in the checkout, `accelerate launch -m giseg train` on several
GPUs, `bash run_train.sh` in the background). The table of commands is giseg/commands/__init__.py's COMMANDS; a
command module is imported only when it runs, so `giseg --help` and a mistyped command cost no torch import.
"""
from __future__ import annotations

import importlib
import sys

from giseg.commands import COMMANDS


def overview() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {c.about}" for name, c in COMMANDS.items())
    return (f"usage: giseg <command> [options]   (giseg <command> --help for its options)\n\n"
            f"Fine-tuning toolkit for Hugging Face segmentation models on GI-tract MRI.\n\ncommands:\n{rows}\n\n"
            "a run in the background with a log: bash run_train.sh (see README.md)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"giseg.commands.{COMMANDS[name].module}")
    return module.main(rest) or 0
