"""The `giseg` command: one entry with a subcommand per job; bad input is one `error:` line and exit status 2."""
import subprocess
import sys

import pytest

from giseg.cli import COMMANDS, main


def test_the_overview_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS) and "giseg train --help" in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_of_the_table_has_a_parser_and_a_main_and_is_in_the_flag_reference(name):
    """The CLI's table is the one list of commands (LitGPT's _check_commands): each entry's module parses with
    build_parser() and runs main(argv), and the flag reference has its section (giseg export-onnx was missing from
    docs/flags.md while the reference kept a list of its own)."""
    import importlib

    from giseg.commands.flags import PARSERS

    module = importlib.import_module(f"giseg.commands.{COMMANDS[name].module}")
    assert callable(module.build_parser) and callable(module.main)
    parser = module.build_parser()
    assert parser.prog == f"giseg {name}"
    assert parser.allow_abbrev is False  # `--output_d X` slipped past run_train.sh's refusals as --output_dir
    assert (f"giseg {name}", module.__name__) in PARSERS


def test_an_unknown_command_is_one_line_and_exit_2(capsys):
    assert main(["predcit"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'predcit'") and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["predict", "--model", "no/such/folder", "--data_dir", "."], "error: --model no/such/folder: no config.json"),
    (["score", "--pred", "missing.csv", "--data_dir", "no/such/folder"], "error: "),
    (["tune", "--model", "m", "--data_dir", ".", "--batch_size", "0"], "error: --batch_size must be >= 1"),
    (["demo-data", "--size", "huge"], "invalid choice: 'huge'"),
    (["predict", "--model", "m", "--data_dir", ".", "--num_workers", "-1"], "error: --num_workers must be >= 0"),
    (["predict", "--model", "m", "--data_dir", ".", "--out", "/dev/null/sub.csv"], "error: --out /dev/null/sub.csv: its folder"),
    (["predict", "--model", "a", "b", "--data_dir", ".", "--weights", "inf,1"], "error: --weights needs 2 positive"),
    (["cv", "--output_dir", "cv", "--gpus", "0,1", "--", "--data_dir", "."], "this machine has no CUDA GPU"),
    (["export-hf", "--data_dir", ".", "--out", "."], "error: --out"),
    (["make-tiny", "--family", "segformer", "--out", "."], "is the current folder"),
])
def test_bad_input_to_a_command_is_one_line_and_exit_2(argv, message, tmp_path, fresh_python):
    res = fresh_python.run_module("giseg", argv, cwd=tmp_path, timeout=120)  # `python -m giseg ...`
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_the_console_script_and_python_m_are_the_same_entry():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("giseg") == "giseg.cli:main"  # pip install -e . put it on PATH


def test_the_overview_and_cvs_help_import_no_torch():
    """`giseg --help` and `giseg cv --help` (a driver of trainer.py processes) answer without torch's 2 s import."""
    code = "import sys, giseg.cli, giseg.commands.cv; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "False", res.stderr
