"""--empty_dice, declared once for giseg train, score and tune: the Dice of a (slice, class) pair whose prediction
and truth are both empty (metrics.py applies it). Without torch, so that every command's --help stays quick."""
from __future__ import annotations

from giseg.utils.options import flag

EMPTY_RULES = ("1", "0", "skip")


def empty_dice_flag(**meta):
    """The --empty_dice option (``meta``: the trainer's --help section and resume identity)."""
    return flag("1", "Dice of a slice-class pair whose prediction and truth are both empty: 1 (the 1st-place "
                "solution's rule, the default), 0 (the competition text's) or skip (left out of the mean, as a public "
                "grader does)", choices=EMPTY_RULES, check=lambda v: v in EMPTY_RULES,
                what=f"one of {EMPTY_RULES}", **meta)
