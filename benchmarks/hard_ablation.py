"""The technique ablation on the hard demo (issue #41): what each technique of the top solutions adds, over folds
and seeds, to choose the competition preset on.

    python benchmarks/hard_ablation.py --out runs/hard-ablation         # 3 folds x 3 seeds: 30 CVs, hours on 2
                                                                        # cores; resumable (a rerun keeps what it has)
    python benchmarks/hard_ablation.py --out /tmp/ha --smoke            # 2 folds, 1 seed, 1 epoch: checks it runs

Data: `giseg demo-data --difficulty hard` (its knobs' defaults, data seed 0). Every CV is `giseg cv` with `--preset
demo` (the tiny SegFormer of `bash run_train.sh`) on the same folds (--split_seed fixed), once per training seed.
Rows, each alone on top of the baseline (untuned unless said):
  + EMA                       --ema_decay 0.99
  + 2.5D, 3 and 5 slices      --context_slices 3 / 5
  + Lovász                    --loss bce_dice_lovasz
  + CutMix / MixUp            --cutmix_prob 0.25 --mixup_prob 0.25
  + SWA                       --swa_start_epoch 10
  + body crop                 --body_crop
  + TTA                       the baseline's models predicting with flips (predict --tta)
  + tuned thresholds          tune --cv --search thresholds (chosen out of fold)
  + thresholds, gates, post-processing   tune --cv --search thresholds,gates,postprocess
  + slice-classifier gate     a CV of tiny ConvNeXt slice classifiers (--task presence), tuned out of fold with
                              the thresholds and gates (tune --cv --gate_model)
  + second family, ensemble   the fold-by-fold average with a tiny UperNet-ConvNeXt CV of the same settings
Each row: `giseg score`'s figures of every (seed, fold) on the fold's own validation cases at the scans' sizes, mean
± sd over them, and the difference of the competition score from the baseline's (the tuned rows: from the tuned
baseline's), paired by (seed, fold), mean ± sd: "noise" when within one sd of zero. Writes <out>/hard_ablation.json
and prints the table with the command; with --record also benchmarks/hard_ablation_cpu.json, the recording whose
table docs/hard-demo.md shows.
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
RECORDING = ROOT / "benchmarks" / "hard_ablation_cpu.json"
DOC = ROOT / "docs" / "hard-demo.md"
START, END = ("<!-- hard-ablation: start (python benchmarks/hard_ablation.py --record) -->",
              "<!-- hard-ablation: end -->")

from ablation import COLUMNS, fold_figures, paired, run, summary  # noqa: E402

# (row, the CV it trains: name and trainer flags, or None for a row made of the baseline's models)
TRAINED = (("+ EMA (--ema_decay 0.99)", "ema", ["--ema_decay", "0.99"]),
           ("+ 2.5D, 3 slices (--context_slices 3)", "context3", ["--context_slices", "3"]),
           ("+ 2.5D, 5 slices (--context_slices 5)", "context5", ["--context_slices", "5"]),
           ("+ Lovász (--loss bce_dice_lovasz)", "lovasz", ["--loss", "bce_dice_lovasz"]),
           ("+ CutMix / MixUp (0.25 each)", "cutmix-mixup", ["--cutmix_prob", "0.25", "--mixup_prob", "0.25"]),
           ("+ SWA (the last 5 epochs' average: --swa_start_epoch 10)", "swa", ["--swa_start_epoch", "10"]),
           ("+ body crop (--body_crop)", "body-crop", ["--body_crop"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the data, CVs, tunings and the table (reused)")
    ap.add_argument("--seeds", default="42,1,2", help="training seeds (default 42,1,2)")
    ap.add_argument("--folds", type=int, default=3, help="CV folds (default 3: two of the demo's six cases each)")
    ap.add_argument("--smoke", action="store_true", help="2 folds, the first seed, 1 epoch: checks that it runs")
    ap.add_argument("--record", action="store_true", help=f"also keep the result as {RECORDING.relative_to(ROOT)} "
                    f"and write its table into {DOC.relative_to(ROOT)} (between its markers)")
    ap.add_argument("--render", action="store_true", help="only rewrite the docs' table from the recording")
    args = ap.parse_args(argv)
    if args.render:
        write_docs(json.loads(RECORDING.read_text()))
        return 0
    from giseg.data.demo import make_demo_data
    from giseg.models.tiny import make_tiny

    out, t0 = Path(args.out), time.time()
    seeds = [int(s) for s in args.seeds.split(",")][:1 if args.smoke else None]
    folds = 2 if args.smoke else args.folds
    data = make_demo_data(out / "data", anatomy="hard")
    models = {"segformer": out / "models" / "tiny-segformer", "upernet": out / "models" / "tiny-upernet",
              "classifier": out / "models" / "tiny-convnext-classifier"}
    for family, folder in zip(("segformer", "upernet", "convnext-classifier"), models.values()):
        if not (folder / "config.json").is_file():
            make_tiny(family, folder, width=2 if family == "segformer" else 1)
    common = ["--data_dir", str(data), "--preset", "demo", "--n_folds", str(folds), "--num_workers", "0",
              "--cache_dir", str(out / "cache"), *(["--epochs", "1"] if args.smoke else [])]
    py, cache = sys.executable, out / "cache"

    def cv(name: str, model: str, seed: int, *extra: str) -> Path:
        folder = out / f"{name}-seed{seed}"
        if not (folder / "cv_scores.json").is_file():
            run([py, "-m", "giseg", "cv", "--output_dir", str(folder), "--", "--base_model", str(models[model]),
                 *common, "--seed", str(seed), *extra])
        return folder

    def tune(cvs: list[Path], name: str, search: str, *extra: str) -> Path:
        path = out / f"{name}.json"
        if not path.is_file():
            run([py, "-m", "giseg", "tune", "--cv", *map(str, cvs), "--data_dir", str(data), "--search", search,
                 "--out", str(path), "--cache_dir", str(cache), "--num_workers", "0", *extra])
        return path

    def figures(cvs_of_seed, tuned=None, gates_of_seed=None, tta=False) -> list[dict]:
        """The (seed, fold) figures of the fold-by-fold models of cvs_of_seed(seed)."""
        got = []
        for seed in seeds:
            cvs = cvs_of_seed(seed)
            gates = [gates_of_seed(seed) / f"fold_{k}" / "best" for k in range(folds)] if gates_of_seed else None
            got += fold_figures([[c / f"fold_{k}" / "best" for c in cvs] for k in range(folds)], data,
                                tuned(seed) if tuned else None, cache, gates=gates, tta=tta)
        return got

    base = lambda s: [cv("baseline", "segformer", s)]  # noqa: E731
    rows = {"baseline": (figures(base), None)}
    for label, name, flags in TRAINED:
        flags = ["--swa_start_epoch", "1"] if args.smoke and name == "swa" else flags  # (1 epoch)
        rows[label] = (figures(lambda s, n=name, f=flags: [cv(n, "segformer", s, *f)]), "baseline")
    rows["+ TTA (flips, predict --tta)"] = (figures(base, tta=True), "baseline")
    rows["+ second family (UperNet-ConvNeXt), fold ensemble"] = (
        figures(lambda s: [cv("baseline", "segformer", s), cv("upernet", "upernet", s)]), "baseline")
    tuned = lambda what, search: lambda s: tune(base(s), f"baseline-{what}-seed{s}", search)  # noqa: E731
    rows["baseline, tuned thresholds (out of fold)"] = (figures(base, tuned("thresholds", "thresholds")), "baseline")
    rows["+ tuned gates and post-processing"] = (
        figures(base, tuned("all", "thresholds,gates,postprocess")), "baseline, tuned thresholds (out of fold)")
    presence = lambda s: cv("presence", "classifier", s, "--task", "presence")  # noqa: E731
    def gated(s: int) -> Path:
        return tune(base(s), f"baseline-slice-gate-seed{s}", "thresholds,gates,postprocess,slice_gate",
                    "--gate_model", str(presence(s)))

    rows["+ slice-classifier gate (tuned out of fold)"] = (figures(base, gated, presence),
                                                          "+ tuned gates and post-processing")
    command = " ".join(["python", "benchmarks/hard_ablation.py", *(argv if argv is not None else sys.argv[1:])])
    recording = {"command": command, "seeds": seeds, "folds": folds,
                 "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}",
                 "wall_s": round(time.time() - t0), "rows": {k: {"figures": f, "reference": ref}
                                                            for k, (f, ref) in rows.items()}}
    text = json.dumps(recording, indent=1, default=float) + "\n"
    (out / "hard_ablation.json").write_text(text)
    if args.record and not args.smoke:
        RECORDING.write_text(text)
        write_docs(json.loads(text))
    print(table(recording))
    return 0


def write_docs(recording: dict) -> None:
    """The recording's table between the markers of docs/hard-demo.md (added at its end the first time)."""
    doc = DOC.read_text()
    block = f"{START}\n{table(recording)}\n{END}"
    if START in doc:
        doc = doc[:doc.index(START)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(doc)


def table(recording: dict) -> str:
    """The Markdown table of a recording: each row's mean ± sd over (seed, fold) and its paired difference."""
    rows = recording["rows"]
    lines = [f"{len(recording['seeds'])} seeds x {recording['folds']} folds, `giseg score` at the scans' sizes; "
             f"command: `{recording['command']}` ({recording['machine']}, {recording['wall_s']} s)", "",
             "| row | " + " | ".join(COLUMNS) + " | score minus the reference's, paired (reference) |",
             "|" + " --- |" * (len(COLUMNS) + 2)]
    for name, row in rows.items():
        s = summary(row["figures"])
        diff = "" if row["reference"] is None else \
            f"{paired(row['figures'], rows[row['reference']]['figures'])} ({row['reference']})"
        lines.append(f"| {name} | " + " | ".join(f"{s['mean'][c]:.4f} ± {s['sd'][c]:.4f}" for c in COLUMNS)
                     + f" | {diff} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
