"""Kill the trainer (or giseg export-hf, or giseg cv) at its rename and delete points, rerun it, and check it ends
as an uninterrupted one.

    python tests/training/fault_injection.py                 every kill point (about 80)
    python tests/training/fault_injection.py --sample 4      4 points spread over the run (what CI runs)
    python tests/training/fault_injection.py --target export every point of `giseg export-hf` of the demo data
    python tests/training/fault_injection.py --target cv     every point of a 2-fold `giseg cv` (its own saves; its
                                                             running trainer gets SIGTERM as the CV process dies)

A reference run (2 epochs, a resumable state every 2 steps and at each epoch end, --save_total_limit 1, so
the epoch-end save replaces the step save of the same number) is traced with strace to list its commit points:
every rename(2) (each temp-file-and-rename write, each folder replace) and unlinkat(2) (checkpoint rotation,
clean-up). For each point N, a fresh run is started so that it dies by SIGKILL just before its N-th call of that
syscall (through Python's audit hooks, kill_at.py, at the call of the same paths' shape and occurrence; or with
--kill_by strace under `strace -e inject=<syscall>:signal=SIGKILL:when=N`, 4x slower); it is then rerun as a
scheduler would (`--resume_from_checkpoint latest`) without faults. A point passes when the rerun exits 0,
metrics.jsonl has every epoch exactly once with the reference's step, train loss and Dice (within 1e-5), and best/
and last/ load. For export: the rerun exits 0, the folder loads with the reference's rows and classes, the data
folder is untouched and no temporary folder is left. For cv: the rerun exits 0 with the reference's CV figures
(every fold, the mean and the out-of-fold row, within 1e-5) and no trainer of the killed CV is left running. Needs
strace (apt-get install strace).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).parent))
import kill_at  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SYSCALLS = ("rename", "unlinkat")
TOLERANCE = 1e-5
COMPARED = ("epoch", "step", "train_loss", "val_loss", "dice_mean")


@dataclass
class Point:
    syscall: str
    n: int  # the n-th call of syscall in the main thread (1-based)
    what: str  # the call as strace printed it


@dataclass
class Outcome:
    point: Point
    killed: bool  # the faulty run died by SIGKILL (not: ended before reaching the point)
    ok: bool
    detail: str


def prepare(work: Path) -> tuple[Path, Path]:
    """A small demo dataset and a tiny SegFormer in ``work`` (built once)."""
    from giseg.data.demo import make_demo_data
    from giseg.models.tiny import make_tiny
    from giseg.utils.log import quiet_third_party

    quiet_third_party()  # no "Writing model shards" bar in the report
    data, model = work / "data", work / "model"
    if not (data / "train.csv").exists():
        make_demo_data(data, slices_per_day=8, anatomy="large")
    if not (model / "config.json").exists():
        make_tiny("segformer", model)
    return data, model


def trainer_args(data: Path, model: Path, out: Path, cache: Path) -> list[str]:
    return [sys.executable, str(ROOT / "trainer.py"), "--base_model", str(model), "--data_dir", str(data),
            "--output_dir", str(out), "--cache_dir", str(cache), "--image_size", "64", "--train_batch_size", "8",
            "--lr", "2e-3", "--n_folds", "3", "--epochs", "2", "--save_every_steps", "2", "--save_total_limit", "1",
            "--num_workers", "0", "--log_every", "1", "--resume_from_checkpoint", "latest",
            "--head_prior", "0"]  # zero bias: epoch 2 beats epoch 1, so best/ is replaced (a commit point to kill at)


# the reference trace stops its processes only at the traced calls, not at each of the thousands of stats of Python's
# imports (3-4x faster). Not in the faulty runs: strace 6.1 delivers no injected signal under --seccomp-bpf (checked:
# `strace -f --seccomp-bpf -e inject=rename:signal=SIGKILL:when=2 python3 -c ...` leaves the process running)
SECCOMP = ("--seccomp-bpf",)


def environment() -> dict:
    # no .pyc writes: Python writes them with a rename, which would shift the numbering between runs
    return {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1"}


def list_points(work: Path, data: Path, model: Path, target: str = "train") -> tuple[list[Point], Path]:
    """Run the reference under strace; return its commit points and its output folder."""
    trace = work / f"reference-{target}.trace"
    argv, out = TARGETS[target].command(data, model, work / f"reference-{target}")
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    DATA_FILES.setdefault(str(data), _files(data))
    cmd = ["strace", "-f", *SECCOMP, "-qq", "-o", str(trace), "-e", f"trace=execve,{','.join(SYSCALLS)}", *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, env=environment(), cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"reference run failed ({res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    lines = trace.read_text().splitlines()
    main_pid = lines[0].split()[0]  # the command's own execve: its main thread, where its renames and unlinkats are
    counts = {s: 0 for s in SYSCALLS}
    points = []
    for line in lines:
        found = re.match(r"(\d+)\s+(\w+)\((.*)", line)  # strace pads the pid column: "987   rename(..."
        if not found:
            continue
        pid, name = found.group(1), found.group(2)
        call = f"{name}({found.group(3)}"
        if pid == main_pid and name in counts:
            counts[name] += 1
            points.append(Point(name, counts[name], re.sub(r"\s+=.*$", "", call)))
    return points, out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def differences(got: list[dict], want: list[dict]) -> str:
    """'' when ``got`` has the reference's evaluations (each epoch once, figures within TOLERANCE)."""
    if [r["epoch"] for r in got] != [r["epoch"] for r in want]:
        return f"epochs {[r['epoch'] for r in got]}, want {[r['epoch'] for r in want]}"
    for g, w in zip(got, want):
        for key in COMPARED:
            if abs(float(g[key]) - float(w[key])) > TOLERANCE:
                return f"epoch {w['epoch']} {key} {g[key]} != {w[key]}"
    return ""


def loadable(folder: Path) -> str:
    from transformers import AutoModelForSemanticSegmentation

    try:
        AutoModelForSemanticSegmentation.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 (any failure to load is the finding)
        return f"{folder.name}/ does not load: {type(e).__name__}: {e}"
    return ""


def try_point(point: Point, points: list[Point], work: Path, data: Path, model: Path, reference: Path,
              target: str = "train", by: str = "audit") -> Outcome:
    """Kill a fresh run at ``point`` of the reference's ``points`` (through Python's audit hooks, kill_at.py, or
    strace's injection with by="strace"), rerun it plainly, and compare the rerun's output with the reference's."""
    trial = Path(tempfile.mkdtemp(prefix=f"{target}-{point.syscall}-{point.n}-", dir=work))
    spec = TARGETS[target]
    args, out = spec.command(data, model, trial)
    if by == "strace":  # only the command's own process is traced (and killed): the trainers a CV starts are not
        inject = f"inject={point.syscall}:signal=SIGKILL:when={point.n}"
        faulty_args = ["strace", *(["-f"] if spec.follow else []), "-qq", "-o", "/dev/null", "-e",
                       f"trace={point.syscall}", "-e", inject, *args]
    else:  # the same call (its paths' shape, and which occurrence of that shape), through Python's audit hooks
        want, occurrence = point_shape(point, work / f"reference-{target}", points)
        faulty_args = [args[0], str(Path(__file__).with_name("kill_at.py")), point.syscall, json.dumps(want),
                       str(occurrence), str(trial), "--", *args[1:]]
    faulty = subprocess.run(faulty_args, capture_output=True, text=True, env=environment(), cwd=ROOT)
    killed = faulty.returncode in (-9, 137) and (by == "strace" or "kill_at: " in faulty.stderr)
    spec.settle(trial)
    rerun = subprocess.run(args, capture_output=True, text=True, env=environment(), cwd=ROOT)
    if rerun.returncode != 0:
        tail = (rerun.stderr.strip() or rerun.stdout.strip()).splitlines()[-1:]
        detail = f"rerun exited {rerun.returncode}: {tail}"
    else:
        detail = spec.compare(out, reference, data)
    if not detail:
        shutil.rmtree(trial, ignore_errors=True)
    return Outcome(point, killed, not detail, detail or "identical")


def point_shape(point: Point, base: Path, points: list[Point]) -> tuple[list[str], int]:
    """The point's paths as kill_at.shape() writes them, and which occurrence of that shape it is in ``points``."""
    def of(p: Point) -> list[str]:
        return kill_at.shape(re.findall(r'"([^"]*)"', p.what), str(base))

    want = of(point)
    same = [p for p in points if p.syscall == point.syscall and of(p) == want]
    return want, next(i for i, p in enumerate(same, 1) if p is point)


# ---------------------------------------------------------------- what each target runs and how its result is compared
def _train_command(data: Path, model: Path, trial: Path) -> tuple[list[str], Path]:
    return trainer_args(data, model, trial / "run", trial / "cache"), trial / "run"


def _train_compare(out: Path, reference: Path, data: Path) -> str:
    return differences(records(out), records(reference)) or loadable(out / "best") or loadable(out / "last")


def _export_command(data: Path, model: Path, trial: Path) -> tuple[list[str], Path]:
    out = trial / "exports" / "gi"
    return [sys.executable, "-m", "giseg", "export-hf", "--data_dir", str(data), "--out", str(out)], out


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _export_compare(out: Path, reference: Path, data: Path) -> str:
    import datasets

    left = [p.name for p in out.parent.iterdir() if p.name != out.name]
    if left:
        return f"left beside the export: {left}"
    got, want = datasets.load_from_disk(str(out)), datasets.load_from_disk(str(reference))
    if got["id"] != want["id"] or got.column_names != want.column_names:
        return f"{len(got)} rows, columns {got.column_names}; want {len(want)} rows, {want.column_names}"
    if (out / "id2label.json").read_text() != (reference / "id2label.json").read_text():
        return "id2label.json differs"
    return "" if _files(data) == DATA_FILES.get(str(data), _files(data)) else "the data folder changed"


def _cv_command(data: Path, model: Path, trial: Path) -> tuple[list[str], Path]:
    out = trial / "cv"
    return [sys.executable, "-m", "giseg", "cv", "--output_dir", str(out), "--", "--base_model", str(model),
            "--data_dir", str(data), "--cache_dir", str(trial / "cache"), "--image_size", "64", "--train_batch_size",
            "8", "--lr", "2e-3", "--n_folds", "2", "--epochs", "1", "--num_workers", "0", "--log_every", "1"], out


def _no_trainer_left(trial: Path) -> None:
    """Wait until no trainer of ``trial`` runs (a killed CV's trainer gets SIGTERM, saves and ends)."""
    import time

    deadline = time.time() + 120
    while time.time() < deadline:
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        if str(trial) not in ps:
            return
        time.sleep(0.5)
    raise SystemExit(f"a trainer of {trial} still runs 120 s after its CV was killed")


def _cv_compare(out: Path, reference: Path, data: Path) -> str:
    got, want = (json.loads((d / "cv_scores.json").read_text()) for d in (out, reference))
    for part in ("mean", "out_of_fold"):
        for key, value in want[part].items():
            if isinstance(value, (int, float)) and abs(float(got[part][key]) - float(value)) > TOLERANCE:
                return f"{part} {key} {got[part][key]} != {value}"
    for k in (0, 1):
        detail = differences(records(out / f"fold_{k}"), records(reference / f"fold_{k}"))
        if detail:
            return f"fold {k}: {detail}"
    return ""


@dataclass
class Target:
    command: Callable[[Path, Path, Path], tuple[list[str], Path]]  # (data, model, trial folder) -> (argv, output)
    compare: Callable[[Path, Path, Path], str]  # (output, reference output, data) -> '' or what differs
    follow: bool = True  # strace -f in the faulty run (the trainer's threads); False: the command's process only
    settle: Callable[[Path], None] = lambda trial: None  # after the kill, before the rerun


TARGETS = {"train": Target(_train_command, _train_compare),
           "export": Target(_export_command, _export_compare, follow=False),
           "cv": Target(_cv_command, _cv_compare, follow=False, settle=_no_trainer_left)}
DATA_FILES: dict[str, dict[str, int]] = {}  # the data folder's files before any export, by its path


def choose(points: list[Point], sample: int | None) -> list[Point]:
    if sample is None or sample >= len(points):
        return points
    step = len(points) / sample
    return [points[int(i * step + step / 2)] for i in range(sample)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=int, default=None, help="try this many points spread over the run (default: all)")
    ap.add_argument("--work", default=None, help="working folder (default: a new temporary one)")
    ap.add_argument("--target", default="train", choices=tuple(TARGETS),
                    help="what is killed: trainer.py (default), giseg export-hf, or giseg cv")
    ap.add_argument("--kill_by", default="audit", choices=("audit", "strace"),
                    help="how: Python's audit hooks (kill_at.py, default) or strace's syscall injection")
    args = ap.parse_args(argv)
    if shutil.which("strace") is None:
        print("error: strace not found; install it (apt-get install strace)", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="fault-injection-"))
    work.mkdir(parents=True, exist_ok=True)
    data, model = prepare(work)
    points, reference = list_points(work, data, model, args.target)
    chosen = choose(points, args.sample)
    print(f"{len(points)} kill points in the reference run ({', '.join(f'{sum(p.syscall == s for p in points)} {s}' for s in SYSCALLS)}); trying {len(chosen)}", flush=True)
    outcomes = []
    for point in chosen:
        o = try_point(point, points, work, data, model, reference, args.target, args.kill_by)
        outcomes.append(o)
        print(f"{point.syscall} #{point.n:<3} {'killed' if o.killed else 'not reached'} | "
              f"{'ok' if o.ok else 'FAILED'}: {o.detail} | {point.what[:110]}", flush=True)
    killed = sum(o.killed for o in outcomes)
    ok = sum(o.ok for o in outcomes)
    print(f"kill points tried {len(outcomes)}, killed there {killed}, completed identically {ok}; "
          f"command: python tests/training/fault_injection.py --target {args.target}"
          f"{f' --sample {args.sample}' if args.sample else ''}")
    return 0 if ok == len(outcomes) and killed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
