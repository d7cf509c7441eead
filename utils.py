"""Shared helpers (giseg/utils.py): one-line user errors, atomic writes, folder locks, logging.

    from utils import setup_logging, atomic_write_json, UserError
"""
from giseg.utils import *  # noqa: F401,F403
from giseg.utils import (  # noqa: F401
                         FolderLock,
                         UserError,
                         atomic_dir,
                         atomic_write_json,
                         atomic_write_text,
                         command,
                         logger,
                         quiet_third_party,
                         setup_logging,
)
