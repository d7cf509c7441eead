"""One output contract, over the CLI's own table: every flag that says where a command writes is declared in
COMMANDS, and each one, pointed at a folder or a file of the user's, is refused with one line and leaves it as it
was (export-onnx replaced another model's spec, predict overwrote a patient's files: issue #38)."""
import contextlib
import importlib
import os
import signal

import pytest

from giseg.cli import main
from giseg.commands import COMMANDS, DIR

WHERE = ("--out", "--output_dir", "--out_dir", "--json", "--log_file", "--csv", "--report")  # names of output flags
REFUSED = ("did not write", "was not written by this command")
WRITERS = [(name, flag, kind) for name, c in COMMANDS.items() for flag, kind in c.outputs]


def parser_of(name):
    return importlib.import_module(f"giseg.commands.{COMMANDS[name].module}").build_parser()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_output_flag_of_a_command_is_in_the_table(name):
    flags = {o for a in parser_of(name)._actions for o in a.option_strings if o in WHERE}
    assert flags == {flag for flag, _ in COMMANDS[name].outputs}


def dummy_arguments(name, skip: str, tmp_path) -> list[str]:
    """Every required option of the command, pointing at nothing that exists (the claim must come first)."""
    parser = parser_of(name)
    wanted = [a for a in parser._actions if a.required and a.option_strings]
    wanted += [g._group_actions[0] for g in parser._mutually_exclusive_groups if g.required]  # (its first choice)
    argv = []
    for action in wanted:
        if skip not in action.option_strings:
            value = sorted(action.choices)[0] if action.choices else str(tmp_path / f"missing-{action.dest}")
            argv += [action.option_strings[0], value]
    return argv


@pytest.mark.parametrize("name, flag, kind", WRITERS, ids=[f"{n} {f}" for n, f, _ in WRITERS])
def test_a_writer_refuses_a_folder_or_file_it_did_not_write_and_leaves_it_as_it_was(name, flag, kind, tmp_path,
                                                                                   monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # (defaults such as demo/data point nowhere here)
    if kind == DIR:
        target = tmp_path / "users-folder"
        target.mkdir()
        (target / "notes.txt").write_text("the user's own notes\n")
    else:
        target = tmp_path / "users-file.json"
        target.write_text('{"the user\'s": "own file"}\n')
    before = {p: p.read_bytes() for p in ([target] if kind != DIR else target.iterdir())}
    try:
        code = main([name, *dummy_arguments(name, flag, tmp_path), flag, str(target)])
    finally:  # a launch that was not refused started a run in the background: it must not outlive the test
        for pid_file in (tmp_path / "logs").glob("*.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
    err = capfd.readouterr().err  # (the foreground check of giseg launch is a child process)
    assert code == 2 and any(r in err for r in REFUSED), err[-1500:]
    assert {p: p.read_bytes() for p in ([target] if kind != DIR else target.iterdir())} == before
