"""Atomic replaces and their recovery, file modes, storage errors as one line, the folder lock."""
import errno
import os
import time

import pytest

from giseg.utils.errors import UserError, storage_guard
from giseg.utils.exits import command
from giseg.utils.files import atomic_dir, atomic_write_text, current_umask, recover_replaced, replace_dir
from giseg.utils.locks import FolderLock


def _folder(path, text):
    path.mkdir()
    (path / "f.txt").write_text(text)
    return path


def test_replace_interrupted_between_its_renames_is_undone_at_start(tmp_path):
    # the state a kill leaves between "best -> .best.old" and ".best.X.tmp -> best": only the old copy is whole
    _folder(tmp_path / ".best.old", "old")
    _folder(tmp_path / ".best.abc.tmp", "half-written")
    done = recover_replaced(tmp_path)
    assert (tmp_path / "best" / "f.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["best"] and len(done) == 2


def test_replace_interrupted_after_its_renames_keeps_the_new_copy(tmp_path):
    _folder(tmp_path / "best", "new")
    _folder(tmp_path / ".best.old", "old")
    recover_replaced(tmp_path)
    assert (tmp_path / "best" / "f.txt").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["best"]


def test_recovery_limited_to_one_name_leaves_other_writers_alone(tmp_path):
    _folder(tmp_path / ".a.1.tmp", "x")
    _folder(tmp_path / ".b.2.tmp", "someone else's build")
    recover_replaced(tmp_path, "a")
    assert sorted(os.listdir(tmp_path)) == [".b.2.tmp"]


def test_replace_dir_when_only_the_old_copy_survived(tmp_path):
    _folder(tmp_path / ".x.old", "old")
    new = _folder(tmp_path / "new", "new")
    replace_dir(new, tmp_path / "x")
    assert (tmp_path / "x" / "f.txt").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["x"]


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_get_the_umask_modes_not_owner_only(tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)  # the process's own umask, as a user's shell sets it
    try:
        assert current_umask() == umask
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "x").write_text("1")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == file_mode  # tempfile alone gives 0600 / 0700
        assert (tmp_path / "folder").stat().st_mode & 0o777 == dir_mode
    finally:
        os.umask(previous)


def test_atomic_write_leaves_the_old_file_when_it_fails(tmp_path, monkeypatch):
    atomic_write_text(tmp_path / "m.jsonl", "old\n")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "m.jsonl", "new\n")
    assert (tmp_path / "m.jsonl").read_text() == "old\n" and os.listdir(tmp_path) == ["m.jsonl"]
    with pytest.raises(OSError), atomic_dir(tmp_path / "d"):
        pass
    assert sorted(os.listdir(tmp_path)) == ["m.jsonl"]  # the temporary folder is gone too


@pytest.mark.parametrize("error, phrase", [
    (OSError(errno.ENOSPC, "No space left on device", "/out/x"), "cannot write /out/x: no space left on the device"),
    (OSError(errno.EROFS, "Read-only file system", "/ro"), "cannot write /ro: read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied", "/p"), "cannot write /p: permission denied"),
])
def test_storage_errors_end_a_command_in_one_line(capsys, error, phrase):
    @command
    def main(argv=None):
        raise error
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {phrase}; free space, fix the permissions or choose another folder"


def test_other_os_errors_keep_their_traceback():
    @command
    def main(argv=None):
        raise OSError(errno.EBADF, "Bad file descriptor")
    with pytest.raises(OSError):
        main([])


def test_storage_guard_reads_the_os_message_of_foreign_savers(tmp_path):
    with pytest.raises(UserError, match=r"cannot save the best/ model to .*best: .*No space left on device.*intact"):
        with storage_guard(tmp_path / "best", "the best/ model"):
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(ValueError), storage_guard(tmp_path, "x"):
        raise ValueError("a program error stays one")


def test_folder_lock_refuses_a_second_holder_until_released(tmp_path):
    first = FolderLock(tmp_path / ".lock", wait=False).acquire()
    with pytest.raises(BlockingIOError):
        FolderLock(tmp_path / ".lock", wait=False).acquire()
    assert first.holder() == str(os.getpid())
    first.release()
    FolderLock(tmp_path / ".lock", wait=False).acquire().release()


def test_an_output_folder_holding_foreign_files_or_the_input_is_refused_and_left_as_it_was(tmp_path):
    from giseg.utils.claims import OUTPUT_MARK, claim_output_dir
    from giseg.utils.errors import UserError

    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train.csv").write_text("id,class,segmentation\n")
    for out, message in ((data, "is --data_dir"), (data / "train", "lies inside --data_dir"),
                         (tmp_path, "holds --data_dir")):
        with pytest.raises(UserError, match=message):
            claim_output_dir(out, "--out", "export-hf", {"--data_dir": data})
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("x")
    with pytest.raises(UserError, match=r"already holds files that giseg export-hf did not write \(e.g. chapter1.tex\)"):
        claim_output_dir(mine, "--out", "export-hf")
    assert [p.name for p in mine.iterdir()] == ["chapter1.tex"]
    new = claim_output_dir(tmp_path / "new", "--out", "export-hf")  # created with its mark ...
    assert (new / OUTPUT_MARK).is_file()
    (new / "rows.arrow").write_text("x")
    assert claim_output_dir(new, "--out", "export-hf") == new  # ... so a rerun may replace what it wrote
    with pytest.raises(UserError, match="giseg cv did not write"):
        claim_output_dir(new, "--out", "cv")  # but another command may not
    (tmp_path / "empty").mkdir()
    claim_output_dir(tmp_path / "empty", "--out", "cv")


def test_an_output_file_not_written_by_the_command_is_refused(tmp_path):
    from giseg.utils.claims import claim_output_file, starts_with
    from giseg.utils.errors import UserError

    ours = starts_with("id,class,predicted")
    (tmp_path / "notes.csv").write_text("name,grade\n")
    with pytest.raises(UserError, match="exists and was not written by this command"):
        claim_output_file(tmp_path / "notes.csv", "--out", ours=ours)
    (tmp_path / "sub.csv").write_text("id,class,predicted\n")
    claim_output_file(tmp_path / "sub.csv", "--out", ours=ours)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.csv").write_text("id,class,segmentation\n")
    with pytest.raises(UserError, match="exists and was not written by this command"):
        claim_output_file(tmp_path / "d" / "train.csv", "--out", {"--data_dir": tmp_path / "d"}, ours=ours)
    with pytest.raises(UserError, match="is --data_dir"):
        claim_output_file(tmp_path / "d" / "train.csv", "--out", {"--data_dir": tmp_path / "d" / "train.csv"})
    claim_output_file(tmp_path / "d" / "submission.csv", "--out", {"--data_dir": tmp_path / "d"}, ours=ours)
    with pytest.raises(UserError, match="is a folder"):
        claim_output_file(tmp_path, "--out", ours=ours)


def test_a_signal_inside_stop_on_signals_runs_the_cleanup_and_ends_in_one_line(tmp_path, capsys):
    import signal

    from giseg.utils.exits import command, stop_on_signals
    from giseg.utils.files import atomic_dir
    from giseg.utils.log import setup_logging

    setup_logging()  # (on this test's stdout: an earlier test's captured stream may be closed)

    @command
    def main(argv=None):
        with stop_on_signals():
            with atomic_dir(tmp_path / "out") as tmp:
                (tmp / "half").write_text("x")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        return 0

    assert main([]) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone, and nothing half-written took its place
    assert capsys.readouterr().err.startswith("stopped by SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_anywhere_in_a_command_ends_it_in_one_line_after_its_cleanups(signum, capsys):
    """Every command, not only those with a stop_on_signals of their own: Ctrl-C in giseg predict or tune was a
    KeyboardInterrupt traceback, SIGTERM during the cache build an exit 143 without a word (issue #38)."""
    import signal

    from giseg.utils.exits import command
    from giseg.utils.log import setup_logging

    setup_logging()  # (on this test's stdout: an earlier test's captured stream may be closed)
    cleaned, before = [], signal.getsignal(signal.SIGINT)  # (SIG_IGN where the suite was started in the background)

    @command
    def main(argv=None):
        try:
            os.kill(os.getpid(), getattr(signal, signum))
            time.sleep(5)
        finally:
            cleaned.append(True)
        return 0

    assert main([]) == 128 + getattr(signal, signum) and cleaned == [True]
    err = capsys.readouterr().err
    assert err.startswith(f"stopped by {signum}") and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is before  # (the handler it found, given back)


def test_keep_freed_memory_fixes_mallocs_thresholds_unless_the_user_set_them(monkeypatch):
    """The trainer and every command keep glibc from mapping each step's large blocks afresh (docs/performance.md,
    "The training loop against an older commit"); a user's own MALLOC_* settings win."""
    import subprocess
    import sys

    from giseg.utils.memory import keep_freed_memory

    probe = "from giseg.utils.memory import keep_freed_memory; print(keep_freed_memory())"  # (mallopt accepted both)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env).stdout.strip()
    assert out == ("True" if sys.platform == "linux" else "False")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert keep_freed_memory() is False


def test_a_long_log_message_goes_on_in_timestamped_lines_that_fit_160_columns():
    """Path-heavy lines reached 181 characters (issue #43): the formatter breaks them between words, each line with
    its timestamp and level, the continuations starting with '... ', and nothing of the message lost."""
    import logging

    from giseg.utils.log import LINE, FittingFormatter

    fmt = FittingFormatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    message = "model: " + "/tmp/pytest-of-root/pytest-49/models0/tiny-segformer " * 5 + "(segformer), 0.52M parameters"
    record = logging.LogRecord("gi_seg", logging.INFO, __file__, 1, message, None, None)
    lines = fmt.format(record).splitlines()
    assert len(lines) > 1 and max(map(len, lines)) <= LINE
    assert all(" INFO " in line for line in lines) and all(" INFO ... " in line for line in lines[1:])
    words = " ".join(line.split(" INFO ", 1)[1].removeprefix("... ") for line in lines)
    assert words == message
    short = logging.LogRecord("gi_seg", logging.INFO, __file__, 1, "eval epoch 1 | loss 0.5", None, None)
    assert fmt.format(short).endswith(" INFO eval epoch 1 | loss 0.5")
