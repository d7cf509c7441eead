"""Logging: one timestamped line per event (the `gi_seg` logger), third-party noise silenced."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


logger = logging.getLogger("gi_seg")
LINE = 160  # a log line's most characters, timestamp and level included (a terminal beside an editor)
MESSAGE = LINE - len("2026-12-04 19:53:57 WARNING ")  # what is left for the message


def flag_groups(tokens: list[str]) -> list[str]:
    """Command-line tokens with each ``--flag`` kept together with its value(s)."""
    groups: list[str] = []
    for token in tokens:
        if groups and not token.startswith("--") and groups[-1].startswith("--"):
            groups[-1] = f"{groups[-1]} {token}"
        else:
            groups.append(token)
    return groups


def pack(items: list[str], sep: str, first: int, rest: int) -> list[str]:
    """``items`` joined by ``sep`` into lines of at most ``first`` characters (the first line) and ``rest`` (the
    others), greedily; an item longer than its line stays whole on a line of its own."""
    lines, current = [], ""
    for item in items:
        if current and len(current) + len(sep) + len(item) > (rest if lines else first):
            lines.append(current)
            current = item
        else:
            current = f"{current}{sep}{item}" if current else item
    lines.append(current)
    return lines


def wrap(head: str, items: list[str], sep: str = " ", width: int = MESSAGE) -> list[str]:
    """``head`` + ``items`` (joined by ``sep``) as lines of at most ``width`` characters (an item longer than that
    alone on its line): the first starts with ``head``, the next ones with ``<head> (continued):``, so that a long
    event still reads one line at a time under `tail -f` and every line says what it continues."""
    heads = (head, f"{head.rstrip(': ')} (continued): ")
    lines = pack(items, sep, width - len(heads[0]), width - len(heads[1]))
    return [heads[k > 0] + text for k, text in enumerate(lines)]


class FittingFormatter(logging.Formatter):
    """`<time> <LEVEL> <message>`, in lines of at most LINE characters: a longer message (a path-heavy one) goes on
    as timestamped lines that start with `... `, broken between words (a word longer than a line keeps its own)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if all(len(line) <= LINE for line in text.splitlines()):
            return text
        head = text[:len(text) - len(record.getMessage())] if text.endswith(record.getMessage()) else ""
        if not head:
            return text
        room = LINE - len(head)
        lines = []
        for part in record.getMessage().splitlines() or [""]:
            packed = pack(part.split(" "), " ", room, room - len("... "))
            lines += [packed[0], *(f"... {line}" for line in packed[1:])]
        return "\n".join(head + line for line in lines)


def setup_logging(is_main_process: bool = True, log_file: str | Path | None = None) -> logging.Logger:
    """One timestamped line per event on stdout (and ``log_file``); non-main ranks log warnings only."""
    fmt = FittingFormatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main_process else logging.WARNING)
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if log_file is not None and is_main_process:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def quiet_third_party() -> None:
    """Silence library progress bars and load tables; we log what matters ourselves."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
