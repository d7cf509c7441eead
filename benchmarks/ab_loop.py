"""The training loop of this checkout against an older commit's, interleaved: A B A B ... on the same data and model.

    python benchmarks/ab_loop.py                        # against a4c2448 (the speed issue's reference), 2 pairs
    python benchmarks/ab_loop.py --base <commit> --pairs 3 --epochs 2
    python benchmarks/ab_loop.py --smoke                # 64 px, 1 epoch, 1 pair: a quick try of the script

Both trainers run in this venv, each from its own tree (the base commit unpacked with `git archive`), with the same
flags: the tiny SegFormer (`giseg make-tiny`), the base commit's demo data (its own demo_data.py), 288 px, batch 8,
lr 2e-3, 2 epochs, every other flag at each version's default. One untimed run of each first builds its
decode-once cache (the caches are warm for every timed run); then the pairs run back to back, A before B in odd
pairs and B before A in even ones, so a drift in the machine's load hits both. Each run's figure is the median of
its logged images/s (training only: the trainer's clock leaves evaluation and saving out), and its wall time.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402


def unpack(commit: str, into: Path) -> Path:
    """The tree of ``commit`` in ``into`` (git archive: no worktree bookkeeping left behind)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run(tree: Path, args: list[str], out: Path) -> dict:
    """One trainer.py run from ``tree``: median logged images/s, wall seconds, and from the process's resource usage
    its minor page faults, system CPU seconds and peak memory."""
    env = {**os.environ, "PYTHONPATH": str(tree), "CUDA_VISIBLE_DEVICES": ""}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "trainer.py", *args, "--output_dir", str(out), "--overwrite_output_dir"],
                         cwd=tree, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # (runs are sequential: the difference is this one's)
    log = (out / "train.log").read_text() if (out / "train.log").exists() else res.stdout
    if res.returncode:
        raise RuntimeError(f"trainer.py in {tree} failed:\n{log[-1500:]}\n{res.stderr[-1500:]}")
    rates = bench.logged_rates(log)
    return {"img_s": statistics.median(rates), "rates": rates, "wall": wall,
            "faults": usage.ru_minflt - before.ru_minflt, "sys_s": usage.ru_stime - before.ru_stime,
            "rss_gb": usage.ru_maxrss / 2**20}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="a4c2448", help="the commit to compare against (default a4c2448)")
    ap.add_argument("--head", default="", help="a commit to run as B instead of this checkout")
    ap.add_argument("--pairs", type=int, default=2, help="timed A/B pairs (default 2)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    ap.add_argument("--smoke", action="store_true", help="64 px, 1 epoch, 1 pair: checks the script runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.pairs, args.epochs = 1, 1
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="ab-loop-") as work:
        return compare(args, Path(work))


def compare(args, work: Path) -> int:
    from giseg.models.tiny import make_tiny

    base = unpack(args.base, work / "base")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "demo_data.py", "--out", str(work / "data")], cwd=base, check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(base)})
    model = make_tiny("segformer", work / "tiny-segformer")
    size = 64 if args.smoke else 288
    common = ["--base_model", str(model), "--data_dir", str(work / "data"), "--image_size", str(size),
              "--train_batch_size", "8", "--lr", "2e-3", "--epochs", str(args.epochs), "--log_every", "10"]
    trees = {"A": (base, args.base), "B": (ROOT, f"{head}{' + uncommitted changes' if dirty else ''}")}
    if args.head:
        trees["B"] = (unpack(args.head, work / "head"), args.head)
    for key, (tree, _) in trees.items():  # warm each version's cache; untimed
        run(tree, [*common, "--cache_dir", str(work / f"cache-{key}")], work / f"warm-{key}")
    results: dict[str, list[dict]] = {"A": [], "B": []}
    for pair in range(args.pairs):
        for key in ("AB" if pair % 2 == 0 else "BA"):
            tree = trees[key][0]
            results[key].append(run(tree, [*common, "--cache_dir", str(work / f"cache-{key}")],
                                    work / f"run-{key}-{pair}"))
    load = os.getloadavg()[0]
    print(f"# python benchmarks/ab_loop.py --base {args.base}{' --head ' + args.head if args.head else ''} "
          f"--pairs {args.pairs} --epochs {args.epochs}"
          f"{' --smoke' if args.smoke else ''}  ({os.cpu_count()} cores, load average {load:.2f} at the end)")
    print(f"# tiny SegFormer, {size} px, batch 8, lr 2e-3, {args.epochs} epochs, the base commit's demo data; "
          "each cell: median logged images/s (wall s)\n")
    print("| version | " + " | ".join(f"run {k + 1}" for k in range(args.pairs)) + " | median images/s |")
    print("| --- | " + " | ".join("---" for _ in range(args.pairs)) + " | --- |")
    medians = {}
    for key, (_, label) in trees.items():
        cells = [f"{r['img_s']:.1f} ({r['wall']:.1f})" for r in results[key]]
        medians[key] = statistics.median(r["img_s"] for r in results[key])
        print(f"| {key}: {label} | " + " | ".join(cells) + f" | {medians[key]:.1f} |")
    print("\n| version | minor page faults per run | system CPU s per run | peak memory GB |")
    print("| --- | --- | --- | --- |")
    for key, (_, label) in trees.items():
        rs = results[key]
        faults = ", ".join(f"{r['faults'] / 1e6:.2f}M" for r in rs)
        system = ", ".join(f"{r['sys_s']:.1f}" for r in rs)
        print(f"| {key}: {label} | {faults} | {system} | {max(r['rss_gb'] for r in rs):.2f} |")
    print(f"\nB / A: {medians['B'] / medians['A']:.2f}x images/s, "
          f"{statistics.median(r['wall'] for r in results['A']) / statistics.median(r['wall'] for r in results['B']):.2f}x"
          " wall (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
