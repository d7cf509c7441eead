"""2.5D alone, 3D alone and their blend on the hard demo (issue #42), over folds and seeds.

    python benchmarks/volume_blend.py --out runs/volume-blend                      # 3 folds x 3 seeds; resumable
    python benchmarks/volume_blend.py --out runs/volume-blend --reuse runs/hard-ablation   # its 2.5D CVs, if there
    python benchmarks/volume_blend.py --out /tmp/vb --smoke                        # 2 folds, 1 seed, 1 epoch

Data: `giseg demo-data --difficulty hard` (its defaults, data seed 0: the ablation's data). Every CV is `giseg cv
--preset demo` on the same folds, once per training seed:
  2.5D    the tiny SegFormer of the demo with --context_slices 3 (the ablation's "+ 2.5D, 3 slices" row)
  3D      a tiny SegResNet (giseg make-tiny --family segresnet3d), --patch_size 16,96,96
  blend   the fold-by-fold average of both, its 2D share chosen out of fold by `giseg tune --cv ... --search blend`
          (from the winner's 0.6; the decisions stay untuned, as in the other two rows)
Each row: `giseg score`'s figures of every (seed, fold) on the fold's own validation cases at the scans' sizes,
mean ± sd, and the paired difference of the score from the 2.5D row's ("noise" when within one sd of zero). Writes
<out>/volume_blend.json and prints the table with the command; --record also keeps it as
benchmarks/volume_blend_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
RECORDING = ROOT / "benchmarks" / "volume_blend_cpu.json"

from ablation import COLUMNS, fold_figures, paired, run, summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the data, CVs, tunings and the table (reused)")
    ap.add_argument("--reuse", default="", help="a hard_ablation.py --out folder whose 2.5D CVs (context3-seed<S>) "
                    "and data stand in for this script's own (waited for while that script trains them)")
    ap.add_argument("--seeds", default="42,1,2", help="training seeds (default 42,1,2)")
    ap.add_argument("--folds", type=int, default=3, help="CV folds (default 3)")
    ap.add_argument("--smoke", action="store_true", help="2 folds, the first seed, 1 epoch: checks that it runs")
    ap.add_argument("--record", action="store_true", help=f"also keep the result as {RECORDING.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    from giseg.data.demo import make_demo_data
    from giseg.models.tiny import make_tiny

    out, t0, py = Path(args.out), time.time(), sys.executable
    reuse = Path(args.reuse) if args.reuse else None
    seeds = [int(s) for s in args.seeds.split(",")][:1 if args.smoke else None]
    folds = 2 if args.smoke else args.folds
    data = reuse / "data" if reuse else make_demo_data(out / "data", anatomy="hard")
    models = {"segformer": out / "models" / "tiny-segformer", "segresnet3d": out / "models" / "tiny-segresnet3d"}
    for family, folder in models.items():
        if not (folder / "config.json").is_file():
            make_tiny(family, folder, width=2 if family == "segformer" else 1)
    if reuse:
        models["segformer"] = reuse / "models" / "tiny-segformer"
    cache = out / "cache"
    common = ["--data_dir", str(data), "--preset", "demo", "--n_folds", str(folds), "--num_workers", "0",
              "--cache_dir", str(cache), *(["--epochs", "1"] if args.smoke else [])]

    def cv(name: str, model: str, seed: int, *extra: str) -> Path:
        folder = out / f"{name}-seed{seed}"
        if name == "context3" and reuse:  # hard_ablation.py's own: waited for while it trains (never twice)
            while not (reuse / folder.name / "cv_scores.json").is_file():
                time.sleep(60)
            return reuse / folder.name
        if not (folder / "cv_scores.json").is_file():
            run([py, "-m", "giseg", "cv", "--output_dir", str(folder), "--", "--base_model", str(models[model]),
                 *common, "--seed", str(seed), *extra])
        return folder

    def blend(seed: int) -> Path:
        path = out / f"blend-seed{seed}.json"
        if not path.is_file():
            run([py, "-m", "giseg", "tune", "--cv", str(flat(seed)), str(deep(seed)), "--data_dir", str(data),
                 "--search", "blend", "--out", str(path), "--cache_dir", str(cache), "--num_workers", "0"])
        return path

    flat = lambda s: cv("context3", "segformer", s, "--context_slices", "3")  # noqa: E731
    deep = lambda s: cv("segresnet3d", "segresnet3d", s, "--patch_size", "16,96,96")  # noqa: E731
    rows = {"2.5D (3 slices)": [], "3D (SegResNet)": [], "blend (2D share chosen out of fold)": []}
    shares = {}
    for seed in seeds:  # the 3D CVs first: --reuse's 2.5D ones may still be training
        deep(seed)
    for seed in seeds:
        per_fold = lambda *cvs: [[c / f"fold_{k}" / "best" for c in cvs] for k in range(folds)]  # noqa: E731
        rows["2.5D (3 slices)"] += fold_figures(per_fold(flat(seed)), data, None, cache)
        rows["3D (SegResNet)"] += fold_figures(per_fold(deep(seed)), data, None, cache)
        rows["blend (2D share chosen out of fold)"] += fold_figures(per_fold(flat(seed), deep(seed)), data,
                                                                    blend(seed), cache)
        shares[seed] = json.loads(blend(seed).read_text())["blend"]
    command = " ".join(["python", "benchmarks/volume_blend.py", *(argv if argv is not None else sys.argv[1:])])
    recording = {"command": command, "seeds": seeds, "folds": folds, "blend": shares,
                 "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}",
                 "wall_s": round(time.time() - t0), "rows": rows}
    text = json.dumps(recording, indent=1, default=float) + "\n"
    (out / "volume_blend.json").write_text(text)
    if args.record and not args.smoke:
        RECORDING.write_text(text)
    print(table(json.loads(text)))
    return 0


def table(recording: dict) -> str:
    """Each row's mean ± sd over (seed, fold), its paired score difference from the 2.5D row, the shares chosen."""
    rows, first = recording["rows"], next(iter(recording["rows"]))
    lines = [f"{len(recording['seeds'])} seeds x {recording['folds']} folds, `giseg score` at the scans' sizes; "
             f"command: `{recording['command']}` ({recording['machine']}, {recording['wall_s']} s)", "",
             "| row | " + " | ".join(COLUMNS) + f" | score minus {first}'s, paired |",
             "|" + " --- |" * (len(COLUMNS) + 2)]
    for name, figures in rows.items():
        s = summary(figures)
        diff = "" if name == first else paired(figures, rows[first])
        lines.append(f"| {name} | " + " | ".join(f"{s['mean'][c]:.4f} ± {s['sd'][c]:.4f}" for c in COLUMNS)
                     + f" | {diff} |")
    chosen = ", ".join(f"seed {s}: {b['share_2d']:g}" for s, b in recording["blend"].items())
    return "\n".join(lines) + f"\n\nThe 2D share chosen out of fold: {chosen}."


if __name__ == "__main__":
    sys.exit(main())
