"""Shared helpers, at a glance: one-line user errors (UserError and the @command wrapper), atomic writes and folder
replaces, the folder lock, logging, options declared as dataclass fields. The code is giseg/utils.py.

    from utils import setup_logging, atomic_write_json, UserError
"""
from giseg.utils import *  # noqa: F401,F403
