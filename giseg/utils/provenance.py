"""Which code a run trained with: the sha256 of the package's own source files, recorded in run_config.json
(``code_sha256``), so that a run of other code is never taken for one of this code (the docs-figures test reuses
the README's demo run only when it ran the code being tested)."""
from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]


def code_digest(package: Path = PACKAGE) -> str:
    """sha256 over the package's .py files: each one's path (relative to the package) and bytes, in path order."""
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" not in path.parts:
            h.update(f"{path.relative_to(package).as_posix()}\0".encode() + path.read_bytes() + b"\0")
    return h.hexdigest()
