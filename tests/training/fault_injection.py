"""Kill the trainer at its rename and delete points, resume, and check the run ends as an uninterrupted one.

    python tests/training/fault_injection.py                 every kill point (about 80; ~25 min on 2 CPU cores)
    python tests/training/fault_injection.py --sample 4      4 points spread over the run (what CI runs)

A reference run (2 epochs, a resumable state every 2 steps and at each epoch end, --save_total_limit 1, so
the epoch-end save replaces the step save of the same number) is traced with strace to list its commit points:
every rename(2) (each temp-file-and-rename write, each folder replace) and unlinkat(2) (checkpoint rotation,
clean-up). For each point N, a fresh run is started under `strace -e inject=<syscall>:signal=SIGKILL:when=N`,
so it dies just before its N-th call of that syscall; it is then rerun as a scheduler would
(`--resume_from_checkpoint latest`) without faults. A point passes when the rerun exits 0, metrics.jsonl has
every epoch exactly once with the reference's step, train loss and Dice (within 1e-5), and best/ and last/
load. Needs strace (apt-get install strace).
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
    from giseg.utils import quiet_third_party

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
            "--num_workers", "0", "--log_every", "1", "--resume_from_checkpoint", "latest"]


def environment() -> dict:
    # no .pyc writes: Python writes them with a rename, which would shift the numbering between runs
    return {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1"}


def list_points(work: Path, data: Path, model: Path) -> tuple[list[Point], list[dict]]:
    """Run the reference under strace; return its commit points and its metrics.jsonl records."""
    trace = work / "reference.trace"
    out = work / "reference"
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["strace", "-f", "-qq", "-o", str(trace), "-e", f"trace={','.join(SYSCALLS)}",
           *trainer_args(data, model, out, work / "reference-cache")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=environment())
    if res.returncode != 0:
        raise SystemExit(f"reference run failed ({res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    lines = trace.read_text().splitlines()
    main_pid = lines[0].split()[0]  # the trainer's main thread; every rename and unlinkat of the run is there
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
    return points, records(out)


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


def try_point(point: Point, work: Path, data: Path, model: Path, want: list[dict]) -> Outcome:
    trial = Path(tempfile.mkdtemp(prefix=f"{point.syscall}-{point.n}-", dir=work))
    out, cache = trial / "run", trial / "cache"
    args = trainer_args(data, model, out, cache)
    inject = f"inject={point.syscall}:signal=SIGKILL:when={point.n}"
    faulty = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={point.syscall}", "-e", inject,
                             *args], capture_output=True, text=True, env=environment())
    killed = faulty.returncode in (-9, 137)
    rerun = subprocess.run(args, capture_output=True, text=True, env=environment())
    detail = ""
    if rerun.returncode != 0:
        tail = (rerun.stderr.strip() or rerun.stdout.strip()).splitlines()[-1:]
        detail = f"rerun exited {rerun.returncode}: {tail}"
    else:
        detail = differences(records(out), want) or loadable(out / "best") or loadable(out / "last")
    if not detail:
        shutil.rmtree(trial, ignore_errors=True)
    return Outcome(point, killed, not detail, detail or "identical")


def choose(points: list[Point], sample: int | None) -> list[Point]:
    if sample is None or sample >= len(points):
        return points
    step = len(points) / sample
    return [points[int(i * step + step / 2)] for i in range(sample)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=int, default=None, help="try this many points spread over the run (default: all)")
    ap.add_argument("--work", default=None, help="working folder (default: a new temporary one)")
    args = ap.parse_args(argv)
    if shutil.which("strace") is None:
        print("error: strace not found; install it (apt-get install strace)", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="fault-injection-"))
    work.mkdir(parents=True, exist_ok=True)
    data, model = prepare(work)
    points, want = list_points(work, data, model)
    chosen = choose(points, args.sample)
    print(f"{len(points)} kill points in the reference run ({', '.join(f'{sum(p.syscall == s for p in points)} {s}' for s in SYSCALLS)}); trying {len(chosen)}", flush=True)
    outcomes = []
    for point in chosen:
        o = try_point(point, work, data, model, want)
        outcomes.append(o)
        print(f"{point.syscall} #{point.n:<3} {'killed' if o.killed else 'not reached'} | "
              f"{'ok' if o.ok else 'FAILED'}: {o.detail} | {point.what[:110]}", flush=True)
    killed = sum(o.killed for o in outcomes)
    ok = sum(o.ok for o in outcomes)
    print(f"kill points tried {len(outcomes)}, killed there {killed}, completed identically {ok}; "
          f"command: python tests/training/fault_injection.py{f' --sample {args.sample}' if args.sample else ''}")
    return 0 if ok == len(outcomes) and killed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
