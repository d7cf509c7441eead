import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from giseg.data.registry import DATASETS
from giseg.data.cache import build_cache
from giseg.data.gi import build_index

GI = DATASETS["gi"]


def test_cache_holds_resized_scans_and_masks_and_is_reused(demo_dir, tmp_path):
    index = build_index(demo_dir)
    cache = build_cache(GI, index, 64, tmp_path)
    assert cache.images.shape == (len(index), 64, 64) and cache.images.dtype == np.float16
    assert cache.masks.shape == (len(index), 64, 64) and cache.masks.dtype == np.uint8
    assert 0.0 <= float(cache.images.min()) and float(cache.images.max()) <= 1.0
    # every slice with an organ keeps it after resizing; empty slices stay empty
    has_organ = np.array([GI.read_masks(r).any() for r in index.itertuples()])
    np.testing.assert_array_equal(cache.masks.reshape(len(index), -1).any(1), has_organ)
    assert (cache.masks >= 3).any()  # overlap of two organs survives (bits 0 and 1, or more)
    again = build_cache(GI, index, 64, tmp_path)
    assert again.path == cache.path and [p for p in os.listdir(tmp_path) if not p.startswith(".")] == [cache.path.name]


def test_cache_is_rebuilt_when_size_or_labels_change(demo_dir, tmp_path):
    index = build_index(demo_dir)
    a = build_cache(GI, index, 64, tmp_path).path
    b = build_cache(GI, index, 96, tmp_path).path
    changed = index.copy()
    changed.loc[0, "rle_stomach"] = "1 5"
    c = build_cache(GI, changed, 64, tmp_path)
    assert len({a, b, c.path}) == 3
    assert c.masks[0].any()


def _one_line_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]


def test_a_truncated_or_zeroed_cache_is_rebuilt_with_one_line(demo_dir, tmp_path, caplog):
    index = build_index(demo_dir)
    cache = build_cache(GI, index, 64, tmp_path)
    want = np.array(cache.images)
    images = cache.path / "images.npy"
    del cache
    size = images.stat().st_size
    images.write_bytes(images.read_bytes()[: size // 2])  # truncated: used to fail every later run with a traceback
    again = build_cache(GI, index, 64, tmp_path)
    assert np.array_equal(np.array(again.images), want)
    images.write_bytes(b"\0" * size)  # right size, wrong content: used to be reused silently
    again = build_cache(GI, index, 64, tmp_path)
    assert np.array_equal(np.array(again.images), want)
    lines = _one_line_warnings(caplog)
    assert len(lines) == 2 and "images.npy is" in lines[0] and "does not match its checksum" in lines[1]


def test_verify_checks_every_block_where_the_default_checks_a_sample(demo_dir, tmp_path, caplog):
    from giseg.data.cache import check_cache

    index = build_index(demo_dir)
    path = build_cache(GI, index, 256, tmp_path).path  # 9.4 MB of images: 10 blocks of 1 MiB
    with open(path / "images.npy", "r+b") as f:
        f.seek((1 << 20) + 100)  # block 1: not in the sample (first, last, a third, two thirds)
        f.write(b"\xff" * 64)
    assert check_cache(path) is None
    assert check_cache(path, verify=True) == "images.npy block 1 of 10 does not match its checksum"
    build_cache(GI, index, 256, tmp_path, verify=True)
    assert check_cache(path, verify=True) is None and len(_one_line_warnings(caplog)) == 1


def test_too_little_free_space_is_refused_before_writing(demo_dir, tmp_path, monkeypatch):
    import shutil

    from giseg.data import cache as cache_module
    from giseg.utils.errors import UserError

    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(UserError, match=r"needs \d+\.\d MB but only 1\.0 kB are free"):  # (was "0.00 GB")
        build_cache(GI, build_index(demo_dir), 64, tmp_path)
    assert [p for p in os.listdir(tmp_path) if not p.endswith(".lock")] == []  # nothing half-written left


BUILD = """
import sys, time
from giseg.data.registry import DATASETS
from giseg.data.cache import build_cache
from giseg.data.gi import build_index
from giseg.utils.exits import command
from giseg.utils.log import setup_logging
setup_logging()
gi = DATASETS["gi"]
class Slow(type(gi)):
    def read_image(self, row):
        time.sleep({delay})
        return super().read_image(row)
sys.exit(command(lambda argv: build_cache(Slow(), build_index({data!r}), 64, {cache!r}, num_threads=1) and 0)())
"""


def _builder(demo_dir, cache_dir, delay):
    from conftest import ROOT

    code = BUILD.format(root=str(ROOT), data=str(demo_dir), cache=str(cache_dir), delay=delay)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_building_one_cache_build_it_once(demo_dir, tmp_path):
    procs = [_builder(demo_dir, tmp_path, 0.01) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum(o.count("building decode-once cache") for o in outputs) == 1  # the other waited, then used it
    assert len([p for p in os.listdir(tmp_path) if not p.startswith(".")]) == 1


def test_sigterm_during_the_build_leaves_no_temporary_folder(demo_dir, tmp_path):
    proc = _builder(demo_dir, tmp_path, 0.1)  # 72 slices x 0.1 s
    deadline = time.monotonic() + 60
    while not any(p.endswith(".tmp") for p in os.listdir(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM
    assert [p for p in os.listdir(tmp_path) if not p.endswith(".lock")] == []  # used to stay forever
    assert "stopped by SIGTERM; the cache build of " in out and "unfinished folder removed" in out  # (was silent)


def test_giseg_cache_lists_the_caches_and_clears_only_its_own_unused_ones(demo_dir, tmp_path, capsys):
    """The caches grew with every run and predicted volume with no command or doc line to clean them (issue #43):
    giseg cache lists them with size and last use, and --clear removes caches only (a folder of other files beside
    them stays), --unused_days only the stale ones, never one that a run is building."""
    import os
    import time

    from giseg.commands.cache import main as cache_main
    from giseg.utils.locks import FolderLock

    index = GI.build_index(demo_dir)
    old, new, busy = (build_cache(GI, index, size, tmp_path).path for size in (32, 48, 64))
    os.utime(old / "manifest.json", (time.time() - 40 * 86400,) * 2)  # last used 40 days ago
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "manifest.json").write_text("mine")
    assert cache_main(["--cache_dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert listing.index(old.name) < listing.index(new.name) and "3 cache(s)" in listing and "notes" not in listing
    assert cache_main(["--cache_dir", str(tmp_path), "--clear", "--unused_days", "30"]) == 0
    assert not old.exists() and new.exists() and "removed 1 cache(s)" in capsys.readouterr().out
    with FolderLock(tmp_path / f".{busy.name}.lock"):  # a run is building it
        assert cache_main(["--cache_dir", str(tmp_path), "--clear"]) == 0
    assert f"kept {busy}: a run is building it" in capsys.readouterr().out
    assert not new.exists() and busy.exists() and (tmp_path / "notes" / "manifest.json").is_file()
    build_cache(GI, index, 48, tmp_path)  # a cleared cache is rebuilt by the next run


def test_a_stop_during_the_cache_build_says_what_it_removed_and_leaves_no_folder(demo_dir, tmp_path):
    """SIGTERM while the cache is being written: the one-line stop (utils/exits.Stopped, exit 128 + 15 through
    @command) names the cache build and what went, and no half-written folder stays (it used to exit 143 silently)."""
    from giseg.data.gi import GIAdapter
    from giseg.utils.exits import Stopped

    class StoppedMidway(GIAdapter):
        def read_image(self, row):
            if row.Index == 5:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
            return super().read_image(row)

    adapter = StoppedMidway()
    index = build_index(demo_dir)
    with pytest.raises(Stopped, match="the cache build of .* was stopped and its unfinished folder removed") as e:
        build_cache(adapter, index, 32, tmp_path / "cache", num_threads=1)
    assert e.value.signum == signal.SIGTERM
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
