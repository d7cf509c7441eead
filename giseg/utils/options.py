"""Options declared once, as dataclass fields made by flag(): one command-line option per field, with its default,
help, --help section, resume identity, model-card listing and check beside it."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Callable

from giseg.utils.errors import UserError


def flag_metadata(help, *, group: str | None = None, identity: bool | None = None, card: bool = False,
                  check: Callable[[object], bool] | None = None, what: str = "", choices=None, aliases=(),
                  metavar: str | None = None) -> dict:
    """What flag() keeps in a field's metadata (for a field whose default lives elsewhere: the inference spec's)."""
    if (check is None) != (not what):
        raise ValueError("a flag's check comes with what it must be (what), and the other way round")
    meta = {"help": help, "group": group, "identity": identity, "card": card, "check": check, "what": what,
            "choices": choices, "aliases": tuple(aliases), "metavar": metavar}
    return {k: v for k, v in meta.items() if v not in (None, (), "")}


def flag(default, help, **meta) -> dataclasses.Field:
    """One option, declared once, as a dataclass field: its ``default``; its ``help`` (a string, or a callable
    evaluated when the parser is built); ``group``, its --help section; ``identity``, whether a resume must keep it
    (training flags: run_dir.RUN_IDENTITY); ``card``, whether the model card lists it; ``check`` with ``what`` it must
    be (check_options refuses another value naming the flag); ``choices``, ``aliases`` and ``metavar`` for argparse."""
    return dataclasses.field(default=default, metadata=flag_metadata(help, **meta))


PRECISIONS = ("no", "fp16", "bf16")  # --mixed_precision: Accelerate's names


def mixed_precision_flag(default: str, **meta):
    """--mixed_precision, declared once for giseg train and the commands that run models (``meta``: the trainer's
    --help section, identity, card)."""
    return flag(default, "autocast on GPU: bf16, or fp16 (in training with loss scaling); no: float32; ignored on CPU",
                choices=PRECISIONS, check=lambda v: v in PRECISIONS, what=f"one of {PRECISIONS}", **meta)


def at_least(low, note: str = "") -> dict:
    """flag(**at_least(1)): a value >= ``low`` (``note`` said after it, e.g. " (0: off)")."""
    return {"check": lambda v: v >= low, "what": f">= {low}{note}"}


def above(low, note: str = "") -> dict:
    """flag(**above(0)): a value > ``low``."""
    return {"check": lambda v: v > low, "what": f"> {low}{note}"}


def between(low, high, note: str = "", *, low_in: bool = True, high_in: bool = False) -> dict:
    """flag(**between(0, 1)): a value in [low, high) (``low_in`` / ``high_in``: whether each end is allowed)."""
    def check(v) -> bool:
        return (low <= v if low_in else low < v) and (v <= high if high_in else v < high)
    return {"check": check, "what": f"in {'[(' [not low_in]}{low}, {high}{'])'[not high_in]}{note}"}


def check_options(values, options: type) -> None:
    """Each field's own check (flag(check=...)) on ``values`` (a dataclass or an argparse namespace with the fields
    of ``options``): the first value out of range is one line naming its flag."""
    for f in dataclasses.fields(options):
        check = f.metadata.get("check")
        value = getattr(values, f.name)
        if check is not None and not check(value):
            raise UserError(f"--{f.name} must be {f.metadata['what']}, got {value}")


def parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_options(parser: argparse.ArgumentParser, options: type, groups: dict | None = None) -> None:
    """One command-line option per field of the dataclass ``options``: its help, choices and aliases come from the
    field's metadata (callables there are evaluated now), its type and default from the field. A bool takes
    ``--flag``, ``--flag true`` or ``--flag false``. ``metadata["group"]`` names the --help section (``groups``
    caches the argparse groups across calls)."""
    groups = {} if groups is None else groups
    for f in dataclasses.fields(options):
        meta = {k: v() if callable(v) and k in ("help", "choices") else v for k, v in f.metadata.items()}
        help_, aliases, title = meta.get("help", ""), meta.get("aliases", ()), meta.get("group")
        kwargs = {k: meta[k] for k in ("choices", "metavar") if k in meta}
        where = parser
        if title:
            where = groups.setdefault(title, parser.add_argument_group(title))
        if f.type in ("bool", bool):
            where.add_argument(f"--{f.name}", *aliases, dest=f.name, type=parse_bool, nargs="?", const=True,
                               default=f.default, metavar="true|false",
                               help=f"{help_} (default: {str(f.default).lower()})")
            continue
        typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        where.add_argument(f"--{f.name}", *aliases, dest=f.name, type=typ, default=f.default,
                           help=f"{help_} (default: {f.default!r})", **kwargs)


def options_of(options: type, args) -> dict:
    """The values of ``options``' fields in ``args`` (an argparse namespace, or a dataclass with those fields)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(options)}
