"""Docs that cannot drift: the flag reference is the parsers' own --help, every page is linked and every link
resolves, the README stays short, and no page names a command that no longer exists."""
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
from giseg.commands.flags import PARSERS, WIDTH, help_text, reference

DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *DOCS]


def test_the_flag_reference_is_what_the_parsers_say():
    assert (ROOT / "docs" / "flags.md").read_text() == reference(), \
        "docs/flags.md is out of date: run `giseg flags --out docs/flags.md`"


@pytest.mark.parametrize("argv, module", [(["trainer.py"], "giseg.commands.train"),
                                          (["-m", "giseg", "train"], "giseg.commands.train"),
                                          (["-m", "giseg", "predict"], "giseg.commands.predict"),
                                          (["-m", "giseg", "cv"], "giseg.commands.cv")])
def test_the_reference_is_the_help_a_user_gets(argv, module):
    """The in-process parsers that write the reference are the ones the commands parse with."""
    env = {**os.environ, "COLUMNS": str(WIDTH + 2)}
    res = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120)
    assert res.returncode == 0 and res.stdout == help_text(module)
    assert module in dict((m, n) for n, m in PARSERS)


def test_the_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 10 * 1024
    for page in DOCS:
        assert f"(docs/{page.name})" in readme, f"docs/{page.name} is not linked from the README"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: broken link {target}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_names_a_command_that_is_gone(page):
    gone = re.findall(r"python (?:tools/)?(?:predict|score|tune|cv|compare|app|export_hf|visualise|demo_data|lgg|"
                      r"fault_injection|make_notebook)\.py", page.read_text())
    assert gone == [], f"{page.relative_to(ROOT)} names {gone}: these are `giseg <command>` now"


def test_what_the_docs_commands_write_into_the_checkout_is_ignored_by_git():
    """A user who follows the docs leaves no untracked clutter: data, models, runs, logs, caches, submissions,
    exports and the notebook's HTML are ignored."""
    written = ["demo/data/train.csv", "runs/x/best/config.json", "logs/x.log", "logs/x.pid", "cache/96px-x/images.npy",
               "figures/a.png", "submission.csv", "exports/gi-demo/data.arrow", "visualisation.html",
               "deploy/model.onnx", "predictions/case1_day1.nii.gz",
               "giseg.egg-info/PKG-INFO", "bench-work/learning/runs/x/metrics.jsonl",
               "gpu-check/gpu_check.json", ".whl/albumentations-2.0.8-py3-none-any.whl"]
    res = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=ROOT, capture_output=True, text=True)
    assert sorted(res.stdout.split()) == sorted(written)


def _ignored_by_git(folder) -> list[str]:
    """The files under ``folder`` that git would NOT ignore at the same place in the checkout."""
    written = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    res = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], input="\n".join(written), cwd=ROOT,
                         capture_output=True, text=True)
    return sorted(set(written) - set(res.stdout.split()))


def test_the_readmes_predict_score_and_export_commands_run_as_written(tracked_run, demo_dir, tmp_path, monkeypatch,
                                                                      capsys):
    """The README's block after training, line by line with the run and data folder put in (issue #43: its pair
    scored the training slices too, which no line said; its outputs landed in the checkout)."""
    import pandas as pd

    from giseg.cli import main as giseg

    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) if "giseg predict" in b)
    monkeypatch.chdir(tmp_path)
    lines = [line.split("  #")[0].replace("runs/<name>", str(tracked_run)).replace("<kaggle folder>", str(demo_dir))
             for line in block.strip().splitlines()]
    assert [shlex.split(line)[1] for line in lines] == ["predict", "predict", "score", "export-onnx"]
    for line in lines:
        argv = shlex.split(line)[1:]
        assert giseg(argv + (["--num_workers", "0"] if argv[0] == "predict" else [])) == 0, line
    every = pd.read_csv(tmp_path / "submission.csv")
    val = pd.read_csv(tmp_path / "predictions" / "val.csv")
    assert 0 < len(val) < len(every) and set(val["id"]) < set(every["id"])  # the validation fold only
    assert (tmp_path / "deploy" / "model.onnx").is_file() and _ignored_by_git(tmp_path) == []


def test_the_own_data_commands_run(tmp_path, monkeypatch, capsys):
    """docs/own-data.md's nnU-Net and volume blocks, run line by line in a fresh folder as a user types them (in this
    process, to spare a start-up per line; giseg cv starts its trainers), at toy size: the demo with 8 slices per
    case-day, one epoch at 32 px, two folds. Each command works and writes what the page says: --dataset nnunet
    trains, predicts, scores, tunes and runs cv; --input writes NIfTI volumes."""
    pytest.importorskip("nibabel")
    from giseg.cli import main as giseg
    from giseg.training.loop import main as trainer

    page = (ROOT / "docs" / "own-data.md").read_text()
    blocks = re.findall(r"<!-- own-data: (\w+) -->\n```bash\n(.*?)```\n<!-- own-data: end -->", page, flags=re.S)
    assert [name for name, _ in blocks] == ["nnunet", "volumes"]
    toy = {"giseg demo-data": ["--slices_per_day", "8"], "python trainer.py": ["--epochs", "1", "--image_size", "32"],
           "giseg cv": ["--epochs", "1", "--image_size", "32", "--n_folds", "2", "--num_workers", "0"]}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # for the trainers giseg cv starts
    for _, block in blocks:
        for line in block.strip().splitlines():
            argv = shlex.split(line) + next((flags for start, flags in toy.items() if line.startswith(start)), [])
            status = trainer(argv[2:]) if argv[0] == "python" else giseg(argv[1:])
            assert status == 0, line
    assert (tmp_path / "demo" / "nnunet" / "dataset.json").is_file()
    assert (tmp_path / "predictions" / "nnunet-val.csv").is_file()
    assert "out of fold" in (tmp_path / "runs" / "nnunet-cv" / "cv_table.md").read_text()
    assert "3D Hausdorff in mm over the" in capsys.readouterr().out  # giseg score --hausdorff_mm
    assert len(list((tmp_path / "predictions" / "volumes").glob("*.nii.gz"))) == 9  # one per case-day of the demo
    assert len(list((tmp_path / "predictions" / "one" / "case2_day1").glob("*.nii.gz"))) == 3
    # what the page's commands wrote, had they run in the checkout, is all ignored by git (they wrote nnunet-val.csv,
    # predictions/ and predictions-one/ into it: issue #43)
    assert _ignored_by_git(tmp_path) == []


def test_the_learning_efficiency_table_in_the_docs_is_the_benchmarks_recorded_output():
    """docs/performance.md quotes rows of benchmarks/learning_efficiency_cpu.txt and demo_seeds_cpu.txt (the
    commands' own output, each with its command line); a row typed or edited by hand, or left behind by a new
    recording, fails here."""
    page = (ROOT / "docs" / "performance.md").read_text()
    blocks = page.split("<!-- learning-efficiency -->")[1::2]  # every block between a pair of markers
    rows = [line for block in blocks for line in block.splitlines()
            if line.startswith("| ") and not line.startswith(("| recipe", "| ---"))]
    recorded = (ROOT / "benchmarks" / "learning_efficiency_cpu.txt").read_text().splitlines()
    assert len(blocks) >= 4 and rows and all(row in recorded for row in rows), [r for r in rows if r not in recorded]
    demo = [line for line in page.split("<!-- demo-seeds -->")[1].splitlines() if line.startswith("| ")]
    recorded = (ROOT / "benchmarks" / "demo_seeds_cpu.txt").read_text().splitlines()
    assert len(demo) > 2 and all(row in recorded for row in demo), [r for r in demo if r not in recorded]


def test_the_techniques_table_in_the_docs_is_the_benchmarks_recorded_output():
    """docs/competition.md's table of what Lovász, SWA and CutMix / MixUp buy on the demo is the summary that
    `benchmarks/demo_figures.py --seeds` printed, recorded in benchmarks/demo_techniques_cpu.txt with its command."""
    page = (ROOT / "docs" / "competition.md").read_text()
    rows = [line for line in page.split("<!-- demo-techniques -->")[1].splitlines() if line.startswith("| ")]
    recorded = (ROOT / "benchmarks" / "demo_techniques_cpu.txt").read_text()
    assert len(rows) == 6 and all(row in recorded.splitlines() for row in rows), [r for r in rows if r not in recorded]
    assert "command: python benchmarks/demo_figures.py --seeds 42,1,2 --compare='--loss bce_dice_lovasz'" in recorded


def test_the_ablation_of_the_techniques_in_the_docs_is_the_benchmarks_recorded_output():
    """docs/competition.md's table of what SWA, CutMix / MixUp, Lovász, the body crop and the slice gate buy by
    cross-validation is the table `benchmarks/ablation.py --part techniques` printed, recorded with its command."""
    page = (ROOT / "docs" / "competition.md").read_text()
    block = page.split("<!-- ablation-techniques -->")[1].splitlines()
    recorded = (ROOT / "benchmarks" / "ablation_techniques_cpu.txt").read_text().splitlines()
    assert recorded[0] == "# python benchmarks/ablation.py --out runs/ablation --part techniques"
    rows = [line for line in block if line.strip()]
    assert len([r for r in rows if r.startswith("| ")]) == 10 and all(r in recorded for r in rows), \
        [r for r in rows if r not in recorded]
    assert any(r.startswith("body crop cost:") for r in rows) and any(r.startswith("slice classifiers") for r in rows)
    assert any(r.startswith("false positives a gate could remove:") for r in rows)


def test_the_gpu_figures_in_the_docs_are_the_recorded_output():
    """docs/performance.md's GPU tables: the bare-loop rows are lines of benchmarks/gpu_check_h200.txt (the device's
    own output), the trainer rows are what `gpu_check.py --summarise` computes from the train.logs recorded there."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import summarise_recording

    page = (ROOT / "docs" / "performance.md").read_text()
    blocks = [[line for line in block.splitlines() if line.startswith("| ")]
              for block in page.split("<!-- gpu-check -->")[1::2]]
    recorded = (ROOT / "benchmarks" / "gpu_check_h200.txt").read_text()
    assert len(blocks) == 2 and len(blocks[0]) == 12  # the header and 11 rows
    assert all(row in recorded.splitlines() for row in blocks[0]), [r for r in blocks[0] if r not in recorded]
    assert blocks[1][2:] == summarise_recording(recorded)


def test_the_backend_table_in_the_docs_is_the_benchmarks_recorded_output():
    page = (ROOT / "docs" / "performance.md").read_text()
    rows = [line for line in page.split("<!-- backends -->")[1].splitlines() if line.startswith("| ")]
    recorded = (ROOT / "benchmarks" / "backends_cpu.txt").read_text().splitlines()
    assert len(rows) == 5 and all(row in recorded for row in rows), [r for r in rows if r not in recorded]


def test_the_loop_ab_tables_in_the_docs_are_the_benchmarks_recorded_output():
    page = (ROOT / "docs" / "performance.md").read_text()
    rows = [line for line in page.split("<!-- ab-loop -->")[1].splitlines() if line.startswith("| ")]
    recorded = (ROOT / "benchmarks" / "ab_loop_cpu.txt").read_text().splitlines()
    assert len(rows) == 16 and all(row in recorded for row in rows), [r for r in rows if r not in recorded]
