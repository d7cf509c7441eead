"""Measure, side by side, what the toolkit's speed work buys.

    python benchmarks/bench.py                 # the full run (about 5 minutes on 2 CPU cores)
    python benchmarks/bench.py --quick         # smaller, for a smoke test

1. run-length decoding: rle.decode_rle vs the per-run loop decoder of public notebooks (written below);
2. data pipeline (images/s to a ready batch): the straightforward per-sample pipeline (read PNG, loop-decode the
   codes, normalise, resize, augment) vs ours for a first epoch (building the decode-once cache) and a cached epoch;
3. training (images/s, median step time, peak memory): a bare forward/backward/step loop for the tiny models
   and a SegFormer-b0-sized config, in 1 process and in 2 processes (DDP over gloo); and trainer.py on the
   same model, to show the trainer's overhead.
Figures are medians over repeats; ratios are to the baseline of each section.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


# ---------------------------------------------------------------- baselines, as public notebooks write them
def loop_decode_rle(mask_rle: str, shape: tuple[int, int]) -> np.ndarray:
    """The per-run loop decoder of public UW-Madison notebooks (baseline)."""
    s = mask_rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for lo, hi in zip(starts, ends):
        img[lo:hi] = 1
    return img.reshape(shape)


class NaiveDataset:
    """The straightforward per-sample pipeline (baseline): every item reads its PNG and decodes its codes."""

    def __init__(self, index, rows, image_size, transform):
        self.index, self.rows, self.size, self.transform = index, rows, image_size, transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        import cv2
        import torch

        from utils import CLASSES

        r = self.index.iloc[int(self.rows[i])]
        img = cv2.imread(r.path, cv2.IMREAD_UNCHANGED).astype(np.float32)
        lo, hi = np.percentile(img, [0.5, 99.5])
        img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
        img = cv2.resize(img, (self.size, self.size))
        mask = np.stack([loop_decode_rle(r[f"rle_{c}"], (r.height, r.width)) if r[f"rle_{c}"] else
                         np.zeros((r.height, r.width), np.uint8) for c in CLASSES], -1)
        mask = cv2.resize(mask, (self.size, self.size), interpolation=cv2.INTER_NEAREST)
        out = self.transform(image=np.repeat(img[..., None], 3, -1), mask=mask)
        return {"pixel_values": torch.from_numpy(out["image"].transpose(2, 0, 1).copy()),
                "mask": torch.from_numpy(out["mask"].copy())}


# ---------------------------------------------------------------- helpers
def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def iterate(dataset, batch_size: int, workers: int) -> int:
    import torch

    dl = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                     persistent_workers=False)
    n = 0
    for batch in dl:
        n += batch["pixel_values"].shape[0]
    return n


def fmt_row(cells, widths):
    return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"


def table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [fmt_row(header, widths), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + [fmt_row(r, widths) for r in rows])


# ---------------------------------------------------------------- 1. run-length decoding
def bench_rle(data_dir: Path, repeats: int) -> list[list]:
    from data import build_index
    from rle import decode_rle
    from utils import CLASSES

    index = build_index(data_dir)
    items = [(getattr(r, f"rle_{c}"), (r.height, r.width)) for r in index.itertuples() for c in CLASSES
             if getattr(r, f"rle_{c}")]
    for code, shape in items[:50]:
        assert np.array_equal(decode_rle(code, shape), loop_decode_rle(code, shape))
    runs = statistics.mean(len(c.split()) // 2 for c, _ in items)
    base = median_time(lambda: [loop_decode_rle(c, s) for c, s in items], repeats)
    ours = median_time(lambda: [decode_rle(c, s) for c, s in items], repeats)
    per = lambda t: f"{t / len(items) * 1e6:.1f}"  # noqa: E731
    return [["per-run loop decoder (baseline)", len(items), f"{runs:.0f}", per(base), "1.00x"],
            ["rle.decode_rle (ours, validating)", len(items), f"{runs:.0f}", per(ours), f"{base / ours:.2f}x"]]


# ---------------------------------------------------------------- 2. data pipeline
def bench_pipeline(data_dir: Path, image_size: int, repeats: int, workers: int) -> list[list]:
    from augment import train_transform
    from cache import build_cache
    from data import build_index, neighbour_table
    from dataset import SliceDataset

    index = build_index(data_dir)
    rows = np.arange(len(index))
    tf = train_transform(image_size)
    naive = median_time(lambda: iterate(NaiveDataset(index, rows, image_size, tf), 8, workers), repeats)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))

    def first_epoch():
        shutil.rmtree(tmp, ignore_errors=True)
        cache = build_cache(index, image_size, tmp, num_threads=max(1, workers))
        iterate(SliceDataset(cache, rows, neighbour_table(index, 1), tf), 8, workers)

    first = median_time(first_epoch, repeats)
    cache = build_cache(index, image_size, tmp)
    ds = SliceDataset(cache, rows, neighbour_table(index, 1), tf)
    cached = median_time(lambda: iterate(ds, 8, workers), repeats)
    shutil.rmtree(tmp, ignore_errors=True)
    n = len(index)
    return [["straightforward per-sample (baseline)", n, f"{n / naive:.0f}", "1.00x"],
            ["ours, first epoch (builds the cache)", n, f"{n / first:.0f}", f"{naive / first:.2f}x"],
            ["ours, cached epoch", n, f"{n / cached:.0f}", f"{naive / cached:.2f}x"]]


# ---------------------------------------------------------------- 3. training
def _model_config(name: str):
    from model import ADE_LIKE_LABELS, TINY_CONFIGS

    if name == "segformer-b0":
        from transformers import SegformerConfig

        return SegformerConfig(id2label=ADE_LIKE_LABELS)  # the defaults are the b0 architecture
    family = name.removeprefix("tiny-")
    return TINY_CONFIGS[family](ADE_LIKE_LABELS)


def train_worker(args) -> None:
    """Bare forward/backward/step loop on synthetic batches; prints one JSON line (rank 0)."""
    import resource

    import torch
    from transformers import AutoModelForSemanticSegmentation

    from losses import SegmentationLoss, upsample_like
    from model import SegmentationModel, freeze_unused_parameters

    torch.manual_seed(0)
    cfg = _model_config(args.model)
    cfg.id2label = {0: "large_bowel", 1: "small_bowel", 2: "stomach"}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    model = SegmentationModel(AutoModelForSemanticSegmentation.from_config(cfg))
    freeze_unused_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    world, rank = 1, 0
    if args.ddp:
        from accelerate import Accelerator

        acc = Accelerator()
        model, opt = acc.prepare(model, opt)
        world, rank = acc.num_processes, acc.process_index
    loss_fn = SegmentationLoss("multilabel")
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 8, (args.batch, args.size, args.size), dtype=torch.uint8)
    times = []
    for step in range(args.warmup + args.steps):
        t = time.perf_counter()
        logits, aux = model(x)
        loss = loss_fn(upsample_like(logits, y.shape[-2:]), y)
        if aux is not None:
            loss = loss + 0.4 * loss_fn(upsample_like(aux, y.shape[-2:]), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    step_time = statistics.median(times)
    if rank == 0:
        print(json.dumps({"model": args.model, "processes": world, "size": args.size, "batch": args.batch,
                          "img_s": world * args.batch / step_time, "step_s": step_time,
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          "params_m": sum(p.numel() for p in model.parameters()) / 1e6}), flush=True)


def run_worker(model: str, size: int, batch: int, steps: int, processes: int) -> dict:
    args = ["train-worker", "--model", model, "--size", str(size), "--batch", str(batch), "--steps", str(steps)]
    env = {**os.environ}
    if processes == 1:
        cmd = [sys.executable, __file__, *args]
    else:
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // processes)))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__, *args, "--ddp"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])


def bench_training(models: list[tuple[str, int, int]], steps: int, processes: list[int]) -> list[list]:
    rows = []
    for model, size, batch in models:
        for p in processes:
            r = run_worker(model, size, batch, steps, p)
            rows.append([model, f"{r['params_m']:.2f}M", size, f"{batch} x {p}", f"{r['img_s']:.1f}",
                         f"{r['step_s'] * 1000:.0f}", f"{r['peak_rss_mb']:.0f}"])
    return rows


def bench_trainer_overhead(data_dir: Path, model: str, size: int, batch: int, steps: int, workers: int,
                           repeats: int) -> list[list]:
    """trainer.py vs the bare loop on the same model, size and batch: median images/s of the trainer's logged
    intervals (the first of each run left out: start-up), median over ``repeats`` runs of each."""
    import re

    from transformers import AutoModelForSemanticSegmentation

    tmp = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    try:
        folder = tmp / "model"
        AutoModelForSemanticSegmentation.from_config(_model_config(model)).save_pretrained(folder)
        trainer_rates = []
        for k in range(repeats):
            out = tmp / f"run{k}"
            cmd = [sys.executable, str(ROOT / "trainer.py"), "--base_model", str(folder), "--data_dir",
                   str(data_dir), "--output_dir", str(out), "--image_size", str(size), "--train_batch_size",
                   str(batch), "--max_train_steps", str(steps), "--epochs", "100", "--log_every", "5",
                   "--num_workers", str(workers), "--cache_dir", str(tmp / "cache"), "--n_folds", "2"]
            subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            rates = [float(m) for m in re.findall(r"\| ([\d.]+) img/s", (out / "train.log").read_text())]
            trainer_rates.append(statistics.median(rates[1:]))
        bare = statistics.median(run_worker(model, size, batch, 20, 1)["img_s"] for _ in range(repeats))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer = statistics.median(trainer_rates)
    return [[model, size, batch, "bare loop (synthetic batches)", f"{bare:.1f}", "1.00"],
            [model, size, batch, "trainer.py (demo data, default workers)", f"{trainer:.1f}", f"{trainer / bare:.2f}"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    w = sub.add_parser("train-worker")
    w.add_argument("--model", required=True)
    w.add_argument("--size", type=int, required=True)
    w.add_argument("--batch", type=int, required=True)
    w.add_argument("--steps", type=int, default=10)
    w.add_argument("--warmup", type=int, default=2)
    w.add_argument("--ddp", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small sizes and one repeat (smoke test)")
    ap.add_argument("--data_dir", default=None, help="Kaggle-layout folder (default: a fresh demo dataset)")
    ap.add_argument("--repeats", type=int, default=5, help="repeats for the medians (default 5)")
    ap.add_argument("--json", default=None, help="also write all tables here")
    args = ap.parse_args()
    if args.cmd == "train-worker":
        train_worker(args)
        return
    from utils import quiet_third_party

    quiet_third_party()
    import torch

    repeats = 1 if args.quick else args.repeats
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    if args.data_dir:
        data_dir = Path(args.data_dir)
    else:
        from demo_data import make_demo_data

        data_dir = make_demo_data(tmp / "data", slices_per_day=6 if args.quick else 24)
    cpu = platform.processor() or platform.machine()
    print(f"machine: {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), numpy {np.__version__}, python {platform.python_version()}")
    print(f"command: python benchmarks/bench.py {' '.join(sys.argv[1:])}".rstrip())
    results = {}

    rows = bench_rle(data_dir, repeats * 2)
    results["rle"] = rows
    print("\n1. run-length decoding, every non-empty code of the data (median of repeats)\n")
    print(table(["decoder", "codes", "runs/code", "us/code", "speed-up"], rows))

    size = 64 if args.quick else 288
    rows = bench_pipeline(data_dir, size, repeats, workers=0)
    results["pipeline"] = rows
    print(f"\n2. data pipeline to ready batches of 8, {size}px, with augmentation, 0 workers (median of repeats)\n")
    print(table(["pipeline", "slices", "images/s", "speed-up"], rows))

    if args.quick:
        models = [("tiny-segformer", 64, 4)]
        procs, steps = [1], 3
    else:
        models = [("tiny-segformer", 288, 8), ("tiny-upernet", 288, 8), ("tiny-dpt", 288, 8), ("tiny-beit", 288, 8),
                  ("segformer-b0", 288, 8)]
        procs, steps = [1, 2], 8
    rows = bench_training(models, steps, procs)
    results["training"] = rows
    print(f"\n3. training, bare forward/backward/AdamW step on synthetic batches (median of {steps} steps)\n")
    print(table(["model", "params", "px", "batch x procs", "images/s", "step ms", "peak RSS MB"], rows))

    if args.quick:
        overhead = [("tiny-segformer", 64, 4, 10)]
    else:
        overhead = [("tiny-segformer", 128, 8, 60), ("segformer-b0", 160, 8, 25)]
    rows = []
    for model, o_size, o_batch, o_steps in overhead:
        rows += bench_trainer_overhead(data_dir, model, o_size, o_batch, o_steps, -1, 1 if args.quick else 3)
    results["trainer_overhead"] = rows
    print("\n4. trainer overhead: images/s of trainer.py vs a bare loop on the same model (medians of 3 runs)\n")
    print(table(["model", "px", "batch", "loop", "images/s", "ratio"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
