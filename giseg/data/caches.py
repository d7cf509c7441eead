"""The decode-once caches under a --cache_dir (data/cache.py), listed and removed: giseg cache.

A cache folder is one this toolkit built: a ``manifest.json`` of ours beside its arrays. Its last use is its
manifest's time (touched at every open). A cache that a process is building (its lock held) is never removed.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from giseg.data.cache import MANIFEST
from giseg.utils.errors import UserError
from giseg.utils.locks import FolderLock


@dataclass
class CacheEntry:
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch


def is_cache(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "files" in manifest and "version" in manifest


def list_caches(root: str | Path) -> list[CacheEntry]:
    """The caches under ``root``, least recently used first; a missing root has none."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--cache_dir {root} is a file; pass a folder")
    entries = [CacheEntry(f, sum(p.stat().st_size for p in f.iterdir() if p.is_file()),
                          (f / MANIFEST).stat().st_mtime)
               for f in sorted(root.iterdir()) if f.is_dir() and is_cache(f)] if root.is_dir() else []
    return sorted(entries, key=lambda e: e.last_used)


def remove_caches(root: str | Path, unused_days: float = 0.0) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Remove the caches under ``root`` not used for ``unused_days`` days (0: all); (removed, kept because a
    process holds its lock: being built)."""
    removed, busy = [], []
    for entry in list_caches(root):
        if time.time() - entry.last_used < unused_days * 86400:
            continue
        lock = FolderLock(Path(root) / f".{entry.path.name}.lock", wait=False)
        try:
            lock.acquire()
        except BlockingIOError:
            busy.append(entry)
            continue
        try:
            shutil.rmtree(entry.path)
            removed.append(entry)
        finally:
            lock.release()
            lock.path.unlink(missing_ok=True)
    return removed, busy
