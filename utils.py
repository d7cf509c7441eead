"""Shared helpers, at a glance: one-line user errors (UserError and the @command wrapper), atomic writes and folder
replaces, output claims, the folder lock, logging, options declared as dataclass fields. The code is giseg/utils/,
one job per module.

    from utils import setup_logging, atomic_write_json, UserError
"""
from giseg.utils.claims import *  # noqa: F401,F403
from giseg.utils.errors import *  # noqa: F401,F403
from giseg.utils.exits import *  # noqa: F401,F403
from giseg.utils.files import *  # noqa: F401,F403
from giseg.utils.locks import *  # noqa: F401,F403
from giseg.utils.log import *  # noqa: F401,F403
from giseg.utils.memory import *  # noqa: F401,F403
from giseg.utils.options import *  # noqa: F401,F403
