"""giseg cache: the decode-once caches that training, predict, tune and the app build (default folder: cache/ in the
folder you run from, as --cache_dir says), listed with their size and last use, and removed.

    giseg cache                                 list them
    giseg cache --clear                         remove every one (a later run rebuilds what it needs)
    giseg cache --clear --unused_days 30        remove those not used for 30 days
"""
from __future__ import annotations

import argparse
import time

from giseg.data.caches import list_caches, remove_caches
from giseg.utils.exits import command
from giseg.utils.errors import human_bytes


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="giseg cache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache_dir", default="cache", help="the folder of the caches (default: cache, the commands' "
                    "default --cache_dir)")
    ap.add_argument("--clear", action="store_true", help="remove the caches (only folders this toolkit built; "
                    "never one that a run is building)")
    ap.add_argument("--unused_days", type=float, default=0.0, help="with --clear: only caches not used for this "
                    "many days (default 0: all)")
    return ap


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.clear:
        removed, busy = remove_caches(args.cache_dir, args.unused_days)
        print(f"removed {len(removed)} cache(s) from {args.cache_dir}, {human_bytes(sum(e.bytes for e in removed))}"
              + "".join(f"\nkept {e.path}: a run is building it" for e in busy))
        return 0
    entries = list_caches(args.cache_dir)
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        print(f"{e.path}  {human_bytes(e.bytes)}  last used {used}")
    print(f"{len(entries)} cache(s) in {args.cache_dir}, {human_bytes(sum(e.bytes for e in entries))}"
          + ("; giseg cache --clear removes them" if entries else ""))
    return 0
