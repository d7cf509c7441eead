"""Options declared once, as dataclass fields: one command-line option per field."""
from __future__ import annotations

import argparse
import dataclasses


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
        meta = {k: v() if callable(v) else v for k, v in f.metadata.items()}
        help_, aliases, title = meta.pop("help", ""), meta.pop("aliases", ()), meta.pop("group", None)
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
