"""The ablation of issue #12 on the demo data: what each competition technique adds, measured by cross-validation.

    python benchmarks/ablation.py --out runs/ablation            # about 20 minutes on 2 CPU cores
    python benchmarks/ablation.py --out /tmp/abl --epochs 1 --folds 2   # a smoke run

Rows, each adding to the one before (all at original scan size, the competition score 0.4 Dice + 0.6 (1 - 3D
Hausdorff) and per-class Dice, the mean ± sd over the CV folds, each fold scored on its own validation cases):
  baseline                 cv.py with the demo preset (tiny SegFormer, 128 px)
  + EMA                    --ema_decay
  + thresholds and gating  tune.py --cv --search thresholds,gates (chosen out of fold on the same folds: optimistic)
  + post-processing        tune.py --cv (thresholds, gates and largest 3D component)
  + 5-slice context        --context_slices 5, tuned as above
  fold ensemble            the previous row's fold models averaged, on a held-out synthetic test set (demo_data.py
                           --seed 1: other cases), against the mean of the same models alone there
  + second family          cv.py --ensemble with a tiny UperNet-ConvNeXt CV of the same settings, tuned as above
Every number is measured by this script and printed with the command; the README's table is its output.

    python benchmarks/ablation.py --out runs/ablation --part techniques   # issue #29's rows: about 30 minutes

The techniques of the top solutions, each alone on top of the baseline (same folds, untuned unless said), with the
paired difference to the baseline over the folds (mean ± sd of the per-fold differences; "noise" when the mean is
within one sd of zero):
  + SWA                    --swa_start_epoch 10 (the equal average of the last 5 epochs' weights)
  + CutMix / MixUp         --cutmix_prob 0.25 --mixup_prob 0.25
  + Lovász                 --loss bce_dice_lovasz
  + body crop              --body_crop (and the cost: the cache build with and without it, and the boxes' area)
  + slice-classifier gate  a CV of tiny ConvNeXt slice classifiers (--task presence) on the same folds: at their
                           own threshold (0.5), and with tune.py --cv --gate_model (thresholds, gates and the
                           slice gate chosen out of fold), against the baseline tuned with thresholds and gates
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

CLASSES = ("large_bowel", "small_bowel", "stomach")
COLUMNS = (*(f"dice_{c}" for c in CLASSES), "dice_mean", "hausdorff", "score")


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")


def fold_figures(models_per_fold: list[list[Path]], data_dir: Path, tuned: Path | None, cache_dir: Path,
                 rows_of: str = "validation", gates: list[Path] | None = None, tta: bool = False) -> list[dict]:
    """Figures of each fold's model(s) (averaged when several) on its own validation cases ("validation") or on
    every slice of ``data_dir`` ("all"), with the decisions of ``tuned`` (None: the models' own) and its weights (a
    2D + 3D blend; none: equal), with or without
    test-time augmentation (``tta``: the flips predict uses with --tta)."""

    from giseg.data.folds import split_by_case
    from giseg.data.registry import get_adapter
    from giseg.evaluation.score import score_predictions, submission_to_wide
    from giseg.evaluation.tuning import read_tuned, read_tuned_weights
    from giseg.inference.ensemble import Ensemble
    from giseg.inference.submission import predict_rows

    adapter = get_adapter("gi")
    index = adapter.build_index(data_dir)
    out = []
    for k, models in enumerate(models_per_fold):
        ens = Ensemble.load(models, weights=read_tuned_weights(tuned) if tuned is not None else None)
        if tuned is not None:
            ens = ens.with_decisions(**read_tuned(tuned))
        if gates is not None:  # fold k's slice classifier
            from giseg.inference.gate import SliceGate

            ens = ens.with_gate(SliceGate.load([gates[k]]))
        if rows_of == "validation":
            s = ens.spec.split
            _, rows = split_by_case(index, s["fold"], s["n_folds"], s["split_seed"])
        else:
            rows = np.arange(len(index))
        sub = predict_rows(ens, index, rows, ens.inputs(adapter, index, cache_dir), adapter.volume_columns, tta=tta)
        figures, _ = score_predictions(adapter, index, submission_to_wide(sub, classes=adapter.classes))
        out.append(figures)
    return out


def summary(figures: list[dict]) -> dict:
    values = np.array([[f[c] for c in COLUMNS] for f in figures], float)
    sd = values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(COLUMNS))
    return {"mean": dict(zip(COLUMNS, values.mean(0))), "sd": dict(zip(COLUMNS, sd)), "n": len(figures)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the CVs, tunings and the table (reused)")
    ap.add_argument("--data_dir", default=str(ROOT / "demo" / "data"), help="default: the demo data (made if missing)")
    ap.add_argument("--folds", type=int, default=3, help="CV folds (default 3: two of the demo's six cases each)")
    ap.add_argument("--epochs", type=int, default=0, help="epochs per fold (default: the demo preset's)")
    ap.add_argument("--ema_decay", type=float, default=0.99, help="--ema_decay of the EMA rows (default 0.99)")
    ap.add_argument("--part", default="competition", choices=("competition", "techniques"),
                    help="competition: issue #12's cumulative rows (default); techniques: issue #29's rows")
    args = ap.parse_args(argv)
    from giseg.data.demo import make_demo_data
    from giseg.models.tiny import make_tiny

    out, data = Path(args.out), Path(args.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/ablation.py", *(argv if argv is not None else sys.argv[1:])])
    t0 = time.time()
    make_demo_data(data)
    test_data = make_demo_data(out / "test-data", seed=1)  # other synthetic cases, never trained on
    models = {"segformer": ROOT / "demo" / "models" / "tiny-segformer", "upernet": out / "models" / "tiny-upernet"}
    if not (models["segformer"] / "config.json").is_file():
        make_tiny("segformer", models["segformer"], width=2)
    if not (models["upernet"] / "config.json").is_file():
        make_tiny("upernet", models["upernet"])
    if args.part == "techniques":  # the slice classifiers' starting point
        models["classifier"] = out / "models" / "tiny-convnext-classifier"
        if not (models["classifier"] / "config.json").is_file():
            make_tiny("convnext-classifier", models["classifier"])
    from giseg.training.config import PRESETS

    epochs = str(args.epochs or PRESETS["demo"]["epochs"])  # the demo preset (trainer.py --preset demo)
    common = ["--data_dir", str(data), "--preset", "demo", "--epochs", epochs, "--n_folds", str(args.folds),
              "--num_workers", "0",
              "--cache_dir", str(out / "cache")]
    py = sys.executable

    def cv(name: str, model: str, *extra: str) -> Path:
        run([py, "-m", "giseg", "cv", "--output_dir", str(out / name), "--", "--base_model", str(models[model]), *common, *extra])
        return out / name

    def tune(cv_dirs: list[Path], name: str, search: str, *extra: str) -> Path:
        """Values chosen out of fold (several CVs: their fold-by-fold ensemble), into a file: the specs stay."""
        path = out / f"{name}.json"
        if path.is_file():  # (a rerun keeps what it has, as cv.py keeps finished folds)
            return path
        run([py, "-m", "giseg", "tune", "--cv", *map(str, cv_dirs), "--data_dir", str(data), "--search", search, "--out",
             str(path), "--cache_dir", str(out / "cache"), "--num_workers", "0", *extra])
        return path

    folds = range(args.folds)
    if args.part == "techniques":
        techniques(args, out, data, cv, tune, folds, command, t0)
        return
    base = cv("baseline", "segformer")
    ema = cv("ema", "segformer", "--ema_decay", str(args.ema_decay))
    ctx = cv("ema-context5", "segformer", "--ema_decay", str(args.ema_decay), "--context_slices", "5")
    upn = cv("upernet-ema-context5", "upernet", "--ema_decay", str(args.ema_decay), "--context_slices", "5")
    gated = tune([ema], "ema-thresholds-gates", "thresholds,gates")
    post = tune([ema], "ema-all", "thresholds,gates,postprocess")
    ctx_tuned = tune([ctx], "ema-context5-all", "thresholds,gates,postprocess")
    pair_tuned = tune([ctx, upn], "two-families-all", "thresholds,gates,postprocess")

    def fold_models(*cvs: Path) -> list[list[Path]]:
        return [[c / f"fold_{k}" / "best" for c in cvs] for k in folds]

    rows = [
        ("baseline", summary(fold_figures(fold_models(base), data, None, out / "cache"))),
        (f"+ EMA ({args.ema_decay})", summary(fold_figures(fold_models(ema), data, None, out / "cache"))),
        ("+ tuned thresholds and gating", summary(fold_figures(fold_models(ema), data, gated, out / "cache"))),
        ("+ post-processing (largest 3D component)",
         summary(fold_figures(fold_models(ema), data, post, out / "cache"))),
        ("+ 5-slice context", summary(fold_figures(fold_models(ctx), data, ctx_tuned, out / "cache"))),
        ("+ second family (UperNet-ConvNeXt), ensemble",
         summary(fold_figures(fold_models(ctx, upn), data, pair_tuned, out / "cache"))),
    ]
    # the fold ensemble, on data no fold saw: the fold models alone (mean over them) and averaged
    alone = summary(fold_figures(fold_models(ctx), test_data, ctx_tuned, out / "cache", rows_of="all"))
    together = summary(fold_figures([[ctx / f"fold_{k}" / "best" for k in folds]], test_data, ctx_tuned,
                                    out / "cache", rows_of="all"))
    lines = [f"# {command}", f"# {platform.node()}: {os.cpu_count()} cores, python {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d %H:%M')}, {time.time() - t0:.0f} s", "",
             "| row | " + " | ".join(COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 1)]
    for name, s in rows:
        lines.append(f"| {name} | " + " | ".join(f"{s['mean'][c]:.4f} ± {s['sd'][c]:.4f}" for c in COLUMNS) + " |")
    lines += ["", f"held-out test set ({test_data}, other synthetic cases), the 5-slice EMA models with their tuned "
                  "values:", "", "| models | " + " | ".join(COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 1),
              f"| each fold model alone (mean ± sd of {args.folds}) | " +
              " | ".join(f"{alone['mean'][c]:.4f} ± {alone['sd'][c]:.4f}" for c in COLUMNS) + " |",
              f"| the {args.folds} fold models averaged | " + " | ".join(f"{together['mean'][c]:.4f}" for c in COLUMNS)
              + " |"]
    text = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(text)
    json.dump({"rows": rows, "test_alone": alone, "test_fold_ensemble": together}, open(out / "ablation.json", "w"),
              indent=2, default=float)
    print(text)


def paired(rows: list[dict], base: list[dict], key: str = "score") -> str:
    """The per-fold difference of ``key`` to the baseline's: mean ± sd, and whether it is beyond one sd."""
    d = np.array([r[key] - b[key] for r, b in zip(rows, base)])
    sd = d.std(ddof=1) if len(d) > 1 else 0.0
    return f"{d.mean():+.4f} ± {sd:.4f} ({'noise' if abs(d.mean()) <= sd else 'beyond one sd'})"


def false_positive_slices(cv_dir: Path, data: Path) -> str:
    """How many organ-free slices the CV's out-of-fold predictions give a class: what a slice gate could remove."""
    import pandas as pd

    from giseg.data.registry import get_adapter

    adapter = get_adapter("gi")
    index = adapter.build_index(data)
    sub = pd.read_csv(cv_dir / "oof_submission.csv", dtype=str, keep_default_na=False)
    predicted = sub.groupby("id")["predicted"].apply(lambda s: (s != "").any())
    empty = [r.id for r in index.itertuples() if not adapter.read_masks(r).any()]
    hit = sum(bool(predicted.get(i, False)) for i in empty)
    return (f"false positives a gate could remove: the baseline's out-of-fold predictions give a class to {hit} of the "
            f"{len(empty)} organ-free slices")


def body_crop_cost(data: Path, out: Path, image_size: int) -> str:
    """The cache build of the demo data with and without --body_crop (fresh folders), and the boxes' area."""
    import tempfile

    from giseg.data.cache import build_cache
    from giseg.data.registry import get_adapter

    adapter = get_adapter("gi")
    index = adapter.build_index(data)
    times = {}
    for name, margin in (("plain", None), ("body crop", 8)):
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            t = time.perf_counter()
            cache = build_cache(adapter, index, image_size, tmp, num_threads=os.cpu_count() or 1, crop_margin=margin)
            times[name] = time.perf_counter() - t
            if margin is not None:
                b = cache.boxes.astype(float)
                share = (b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2]) / (index["height"] * index["width"]).to_numpy()
    return (f"body crop cost: the cache of {len(index)} slices at {image_size} px builds in {times['plain']:.2f} s "
            f"plain and {times['body crop']:.2f} s with --body_crop (images decoded once; the boxes add a component search per "
            f"slice); "
            f"the boxes keep {100 * share.mean():.0f}% of a slice's area on average ({100 * share.min():.0f}-"
            f"{100 * share.max():.0f}%)")


def techniques(args, out: Path, data: Path, cv, tune, folds, command: str, t0: float) -> None:
    """Issue #29's rows (see the module's doc), written to <out>/techniques.md."""
    from giseg.training.config import PRESETS

    def fold_models(*cvs: Path) -> list[list[Path]]:
        return [[c / f"fold_{k}" / "best" for c in cvs] for k in folds]

    base = cv("baseline", "segformer")
    alone = [("+ SWA (--swa_start_epoch 10)", cv("swa", "segformer", "--swa_start_epoch", "10")),
             ("+ CutMix / MixUp (0.25 each)", cv("cutmix-mixup", "segformer", "--cutmix_prob", "0.25", "--mixup_prob",
                                                "0.25")),
             ("+ Lovász (--loss bce_dice_lovasz)", cv("lovasz", "segformer", "--loss", "bce_dice_lovasz")),
             ("+ body crop (--body_crop)", cv("body-crop", "segformer", "--body_crop"))]
    presence = cv("presence", "classifier", "--task", "presence")
    plain_tuned = tune([base], "baseline-thresholds-gates", "thresholds,gates")
    gate_tuned = tune([base], "baseline-thresholds-gates-slice-gate", "thresholds,gates,slice_gate", "--gate_model",
                      str(presence))
    cache = out / "cache"
    base_figs = fold_figures(fold_models(base), data, None, cache)
    rows = [("baseline", base_figs, "")]
    for name, c in alone:
        figs = fold_figures(fold_models(c), data, None, cache)
        rows.append((name, figs, paired(figs, base_figs)))
    tuned_figs = fold_figures(fold_models(base), data, plain_tuned, cache)
    gated_figs = fold_figures(fold_models(base), data, gate_tuned, cache,
                              gates=[presence / f"fold_{k}" / "best" for k in folds])
    own_figs = fold_figures(fold_models(base), data, plain_tuned, cache,  # the gate untuned: the classifiers' 0.5
                            gates=[presence / f"fold_{k}" / "best" for k in folds])
    rows += [("baseline, tuned thresholds and gates", tuned_figs, ""),
             ("+ slice-classifier gate at the classifiers' own threshold (untuned)", own_figs,
              paired(own_figs, tuned_figs)),
             ("+ slice-classifier gate, tuned with them (kept only where it helps)", gated_figs,
              paired(gated_figs, tuned_figs))]
    presence_scores = json.loads((presence / "cv_scores.json").read_text())
    cols = ("dice_mean", "hausdorff", "score")
    lines = [f"# {command}", f"# {platform.node()}: {os.cpu_count()} cores, python {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d %H:%M')}, {time.time() - t0:.0f} s", "",
             "| row | " + " | ".join(cols) + " | score minus the reference's (the baseline; for the gate rows the tuned "
             "baseline), paired over folds |",
             "|" + " --- |" * (len(cols) + 2)]
    for name, figs, diff in rows:
        s = summary(figs)
        lines.append(f"| {name} | " + " | ".join(f"{s['mean'][c]:.4f} ± {s['sd'][c]:.4f}" for c in cols) + f" | {diff} |")
    m, sd = presence_scores["mean"], presence_scores["sd"]
    lines += ["", f"slice classifiers (tiny ConvNeXt, --task presence, {len(folds)} folds): mean AUC "
                  f"{m['auc_mean']:.4f} ± {sd['auc_mean']:.4f}, F1 {m['f1_mean']:.4f} ± {sd['f1_mean']:.4f}, empty "
                  f"slices called empty {m['empty_correct']:.4f} ± {sd['empty_correct']:.4f}",
              false_positive_slices(base, data), body_crop_cost(data, out, PRESETS["demo"]["image_size"])]
    text = "\n".join(lines) + "\n"
    (out / "techniques.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
