"""giseg tune writes what it tuned all-or-none."""
import errno
import os
import shutil

import pytest

from giseg.inference.spec import SPEC_FILE


def test_a_full_disk_while_saving_tuned_specs_leaves_every_spec_as_it_was(saved_model, tmp_path, monkeypatch):
    from giseg.commands import tune

    folders = [tmp_path / f"fold_{k}" / "best" for k in (0, 1)]
    for f in folders:
        shutil.copytree(saved_model, f)
    before = [(f / SPEC_FILE).read_text() for f in folders]
    real_fsync, calls = os.fsync, []

    def fsync(fd):  # the second spec's write meets a full disk
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(tune.os, "fsync", fsync)
    with pytest.raises(OSError):
        tune.save_tuned_specs(folders, {"thresholds": (0.3, 0.4, 0.5)})
    assert [(f / SPEC_FILE).read_text() for f in folders] == before  # fold 0 was not tuned alone
    assert all(sorted(p.name for p in f.iterdir()) == sorted(p.name for p in saved_model.iterdir()) for f in folders)
    monkeypatch.setattr(tune.os, "fsync", real_fsync)
    tune.save_tuned_specs(folders, {"thresholds": (0.3, 0.4, 0.5)})
    assert all('"thresholds": [\n    0.3,' in (f / SPEC_FILE).read_text() for f in folders)
