"""The technique ablation on the hard demo (issue #41): what each technique of the top solutions adds, over folds
and seeds, to choose the competition preset on.

    python benchmarks/hard_ablation.py --out runs/hard-ablation         # 3 folds x 3 seeds: 30 CVs, hours on 2
                                                                        # cores; resumable (a rerun keeps what it has)
    python benchmarks/hard_ablation.py --out runs/ha --seeds 1          # one seed: two processes share the work
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
  + second family, ensemble   the fold-by-fold average with a tiny UperNet-ConvNeXt CV of the same settings (untuned)
  + Lovász, tuned             the Lovász CV tuned out of fold (thresholds, gates, post-processing): does the one
                              trained technique that did not lose add to tuning?
  --preset competition        giseg cv --preset competition (giseg/commands/cv.py CV_PRESETS: the recipe chosen on
                              the rows above): the folds of both families, the ensemble tuned out of fold
Each row: `giseg score`'s figures of every (seed, fold) on the fold's own validation cases at the scans' sizes, mean
± sd over them, and the difference of the competition score from its reference row's (the baseline; the tuned rows:
the less tuned baseline; the preset: the untuned two-family ensemble, so what its tuning adds), paired by (seed,
fold), mean ± sd: "noise" when within one sd of zero. Each (row, seed) is kept as it is measured, with its commit
and time, as one file under --parts (benchmarks/hard_ablation_parts/: the recording in progress, so that a run cut
off keeps its figures); when every part is there, it writes <out>/hard_ablation.json
and prints the table with the command; with --record also benchmarks/hard_ablation_cpu.json, the recording whose
table docs/hard-demo.md shows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
RECORDING = ROOT / "benchmarks" / "hard_ablation_cpu.json"
PARTS = ROOT / "benchmarks" / "hard_ablation_parts"
MACHINE = (f"{os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}"
           + (f", OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}" if "OMP_NUM_THREADS" in os.environ else ""))
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


def preset_label() -> str:
    """The preset's row, named by what it runs as giseg cv's CV_PRESETS says now (a changed preset is a new row)."""
    from giseg.commands.cv import CV_PRESETS

    p = CV_PRESETS["competition"]
    return ("giseg cv --preset competition (" + ("a second family, UperNet-ConvNeXt; " if p.second_family else "")
            + (f"tuned out of fold: {p.tune}" if p.tune else "untuned") + ")")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the data, CVs and tunings (reused)")
    ap.add_argument("--parts", default=str(PARTS.relative_to(ROOT)), help="folder of the finished (row, seed) "
                    "figures, one JSON file each, kept as they come (default: the recording in progress, "
                    f"{PARTS.relative_to(ROOT)}; another folder measures anew); a present part is not measured again")
    ap.add_argument("--seeds", default="42,1,2", help="training seeds (default 42,1,2), measured one after another")
    ap.add_argument("--folds", type=int, default=3, help="CV folds (default 3: two of the demo's six cases each)")
    ap.add_argument("--rows", default=":", help="only these rows, a Python slice of the table's rows, e.g. 0:7 or 7: "
                    "(two processes measure one seed, each its rows, with --out folders of their own)")
    ap.add_argument("--smoke", action="store_true", help="2 folds, the first seed, 1 epoch, parts under --out: "
                    "checks that it runs")
    ap.add_argument("--record", action="store_true", help=f"also keep the result as {RECORDING.relative_to(ROOT)} "
                    f"and write its table into {DOC.relative_to(ROOT)} (between its markers)")
    ap.add_argument("--render", action="store_true", help="only rewrite the docs' table from the recording")
    args = ap.parse_args(argv)
    if args.render:
        write_docs(json.loads(RECORDING.read_text()))
        return 0
    seeds = [int(s) for s in args.seeds.split(",")][:1 if args.smoke else None]
    bench = Ablation(Path(args.out), 2 if args.smoke else args.folds, args.smoke)
    parts = Path(args.out) / "parts" if args.smoke else ROOT / args.parts
    for seed in seeds:
        chosen = slice(*(int(i) if i else None for i in args.rows.split(":")))
        for label, reference, measure in bench.rows(seed)[chosen]:
            path = part_path(parts, label, seed)
            if path.is_file():
                continue
            t0 = time.time()
            figures = measure()
            write_json(path, {"row": label, "seed": seed, "reference": reference, "figures": figures,
                              "commit": commit(), "machine": MACHINE, "wall_s": round(time.time() - t0)})
            print(f"{time.strftime('%H:%M:%S')} {label}, seed {seed}: score {summary(figures)['mean']['score']:.4f}"
                  f" ({round(time.time() - t0)} s) -> {path}", flush=True)
    labels = [label for label, _, _ in bench.rows(seeds[0])]
    missing = [part_path(parts, label, seed).name for seed in seeds for label in labels
               if not part_path(parts, label, seed).is_file()]
    if missing:
        print(f"{len(labels) * len(seeds) - len(missing)} of {len(labels) * len(seeds)} parts under {parts}; the "
              f"table comes when the rest are there ({', '.join(missing)})")
        return 0
    command = "python benchmarks/hard_ablation.py --out runs/hard-ablation" + (" --smoke" if args.smoke else "")
    recording = assemble(parts, labels, seeds, bench.folds, command)
    text = json.dumps(recording, indent=1, default=float) + "\n"
    write_json(Path(args.out) / "hard_ablation.json", recording)
    if args.record and not args.smoke:
        RECORDING.write_text(text)
        write_docs(recording)
    print(table(recording))
    return 0


def part_path(parts: Path, label: str, seed: int) -> Path:
    return parts / f"{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}-seed{seed}.json"


def write_json(path: Path, obj: dict) -> None:
    """Atomically: a part is there whole or not at all (a killed run leaves no half-written figures)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def commit() -> str:
    res = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return res.stdout.strip() or "unknown"


def assemble(parts: Path, labels: list[str], seeds: list[int], folds: int, command: str) -> dict:
    """The recording from the parts: each row's figures over the seeds in order (paired by (seed, fold))."""
    got = {(label, seed): json.loads(part_path(parts, label, seed).read_text()) for label in labels for seed in seeds}
    return {"command": command, "seeds": seeds, "folds": folds, "machine": MACHINE,
            "commits": sorted({p["commit"] for p in got.values()}),
            "wall_s": sum(p["wall_s"] for p in got.values()),
            "rows": {label: {"figures": [f for seed in seeds for f in got[label, seed]["figures"]],
                             "reference": got[label, seeds[0]]["reference"]} for label in labels}}


class Ablation:
    """The data, the tiny models and the CVs of the ablation under one folder; rows(seed) says how to measure."""

    def __init__(self, out: Path, folds: int, smoke: bool):
        from giseg.data.demo import make_demo_data
        from giseg.models.tiny import make_tiny

        self.out, self.folds, self.smoke, self.py = out, folds, smoke, sys.executable
        self.data, self.cache = make_demo_data(out / "data", anatomy="hard"), out / "cache"
        self.models = {"segformer": out / "models" / "tiny-segformer", "upernet": out / "models" / "tiny-upernet",
                       "classifier": out / "models" / "tiny-convnext-classifier"}
        for family, folder in zip(("segformer", "upernet", "convnext-classifier"), self.models.values()):
            if not (folder / "config.json").is_file():
                make_tiny(family, folder, width=2 if family == "segformer" else 1)
        self.common = ["--data_dir", str(self.data), "--preset", "demo", "--n_folds", str(folds),
                       "--num_workers", "0", "--cache_dir", str(self.cache), *(["--epochs", "1"] if smoke else [])]

    def cv(self, name: str, model: str, seed: int, *extra: str) -> Path:
        folder = self.out / f"{name}-seed{seed}"
        if not (folder / "cv_scores.json").is_file():
            run([self.py, "-m", "giseg", "cv", "--output_dir", str(folder), "--", "--base_model",
                 str(self.models[model]), *self.common, "--seed", str(seed), *extra])
        return folder

    def tune(self, cvs: list[Path], name: str, search: str, *extra: str) -> Path:
        path = self.out / f"{name}.json"
        if not path.is_file():
            run([self.py, "-m", "giseg", "tune", "--cv", *map(str, cvs), "--data_dir", str(self.data), "--search",
                 search, "--out", str(path), "--cache_dir", str(self.cache), "--num_workers", "0", *extra])
        return path

    def figures(self, cvs: list[Path], tuned: Path | None = None, gates: Path | None = None,
                tta: bool = False) -> list[dict]:
        """The figures of each fold of one seed: the fold's models of ``cvs`` (averaged), on its validation cases."""
        gate_models = [gates / f"fold_{k}" / "best" for k in range(self.folds)] if gates else None
        return fold_figures([[c / f"fold_{k}" / "best" for c in cvs] for k in range(self.folds)], self.data,
                            tuned, self.cache, gates=gate_models, tta=tta)

    def preset(self, seed: int) -> list[dict]:
        """giseg cv --preset competition as a user runs it (the second family: the tiny UperNet-ConvNeXt)."""
        from giseg.commands.cv import CV_PRESETS

        folder, p = self.out / f"preset-competition-seed{seed}", CV_PRESETS["competition"]
        if not (folder / "preset.json").is_file() or not (folder / "tuned.json").is_file() and p.tune:
            run([self.py, "-m", "giseg", "cv", "--output_dir", str(folder), "--preset", "competition",
                 "--second_model", str(self.models["upernet"]), "--", "--base_model", str(self.models["segformer"]),
                 *self.common, "--seed", str(seed)])
        cvs = [folder / "first"] + ([folder / "second"] if p.second_family else [])
        return self.figures(cvs, folder / "tuned.json" if p.tune else None)

    def rows(self, seed: int) -> list[tuple]:
        """(label, reference row, a function measuring the row's figures for ``seed``): the CVs train on demand."""
        base = lambda: [self.cv("baseline", "segformer", seed)]  # noqa: E731
        rows = [("baseline", None, lambda: self.figures(base()))]
        for label, name, flags in TRAINED:
            flags = ["--swa_start_epoch", "1"] if self.smoke and name == "swa" else flags  # (1 epoch)
            rows.append((label, "baseline", lambda n=name, f=flags: self.figures([self.cv(n, "segformer", seed, *f)])))
        thresholds = lambda: self.tune(base(), f"baseline-thresholds-seed{seed}", "thresholds")  # noqa: E731
        tuned_all = lambda: self.tune(base(), f"baseline-all-seed{seed}", "thresholds,gates,postprocess")  # noqa
        presence = lambda: self.cv("presence", "classifier", seed, "--task", "presence")  # noqa: E731
        upernet = lambda: self.cv("upernet", "upernet", seed)  # noqa: E731
        lovasz = lambda: [self.cv("lovasz", "segformer", seed, "--loss", "bce_dice_lovasz")]  # noqa: E731
        gated = lambda: self.tune(base(), f"baseline-slice-gate-seed{seed}",  # noqa: E731
                                  "thresholds,gates,postprocess,slice_gate", "--gate_model", str(presence()))
        preset = lambda: self.preset(seed)  # noqa: E731
        return rows + [
            ("+ TTA (flips, predict --tta)", "baseline", lambda: self.figures(base(), tta=True)),
            ("+ second family (UperNet-ConvNeXt), fold ensemble", "baseline",
             lambda: self.figures(base() + [upernet()])),
            ("baseline, tuned thresholds (out of fold)", "baseline", lambda: self.figures(base(), thresholds())),
            ("+ tuned gates and post-processing", "baseline, tuned thresholds (out of fold)",
             lambda: self.figures(base(), tuned_all())),
            ("+ slice-classifier gate (tuned out of fold)", "+ tuned gates and post-processing",
             lambda: self.figures(base(), gated(), presence())),
            ("+ Lovász, tuned out of fold (thresholds, gates, post-processing)", "+ tuned gates and post-processing",
             lambda: self.figures(lovasz(), self.tune(lovasz(), f"lovasz-all-seed{seed}",
                                                      "thresholds,gates,postprocess"))),
            (preset_label(), "+ second family (UperNet-ConvNeXt), fold ensemble", preset)]  # (what tuning adds)


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
             f"command: `{recording['command']}` ({recording['machine']}; commit "
             f"{', '.join(recording.get('commits', []))}; {recording['wall_s']} s of measurement)", "",
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
