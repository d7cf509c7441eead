"""The flag reference (docs/flags.md): every command's --help, generated from the parsers themselves.

    giseg flags                        print it (Markdown)
    giseg flags --out docs/flags.md    write it (tests/test_docs.py fails while the file differs from this)
"""
from __future__ import annotations

import argparse
import functools
import importlib

from giseg.commands import COMMANDS
from giseg.utils.claims import claim_output_file, starts_with
from giseg.utils.exits import command
from giseg.utils.files import atomic_write_text

# (what the user types, the module whose build_parser() is its parser): every command of the CLI's own table, so a
# new command is in the reference (tests/commands/test_cli.py fails for a command without build_parser)
PARSERS = tuple((f"giseg {name}", f"giseg.commands.{c.module}") for name, c in COMMANDS.items())
WIDTH = 100  # the --help of a terminal COLUMNS=102 wide (argparse leaves two columns)


def help_text(module: str) -> str:
    """A command's --help at WIDTH columns."""
    parser = importlib.import_module(module).build_parser()
    parser.formatter_class = functools.partial(parser.formatter_class, width=WIDTH)
    return parser.format_help()


def reference() -> str:
    sections = [f"## `{name}`\n\n```text\n{help_text(module).rstrip()}\n```\n" for name, module in PARSERS]
    index = "\n".join(f"- [`{name}`](#{name.replace(' ', '-').replace('.', '')})" for name, _ in PARSERS)
    return ("# Flag reference\n\nEvery command's `--help`, generated from its parser by `giseg flags --out "
            "docs/flags.md`, one section per command of the CLI (the training flags are declared once, as fields of "
            "`giseg/training/config.py`'s "
            "TrainConfig and of the inference spec; tests/test_docs.py fails while this file differs from the "
            f"parsers).\n\n{index}\n\n" + "\n".join(sections))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="giseg flags", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the reference here instead of printing it")
    return ap


@command
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.out:  # (replaces an earlier reference, never another file)
        claim_output_file(args.out, "--out", ours=starts_with("# Flag reference"))
    text = reference()
    if args.out:
        atomic_write_text(args.out, text)
    else:
        print(text, end="")
