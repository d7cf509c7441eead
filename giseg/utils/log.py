"""Logging: one timestamped line per event (the `gi_seg` logger), third-party noise silenced."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


logger = logging.getLogger("gi_seg")


def setup_logging(is_main_process: bool = True, log_file: str | Path | None = None) -> logging.Logger:
    """One timestamped line per event on stdout (and ``log_file``); non-main ranks log warnings only."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
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
