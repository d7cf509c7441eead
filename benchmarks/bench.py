"""Measure, side by side, what the toolkit's speed work buys.

    python benchmarks/bench.py                 # the full run (about 5 minutes on 2 CPU cores)
    python benchmarks/bench.py --quick         # smaller, for a smoke test

1. run-length decoding: rle.decode_rle vs the per-run loop decoder of public notebooks (written below);
2. data pipeline (images/s to a ready batch): the straightforward per-sample pipeline (read PNG, loop-decode the
   codes, normalise, resize, augment) vs ours for a first epoch (building the decode-once cache) and a cached epoch;
3. training (images/s, median step time, peak memory): a bare forward/backward/step loop for the tiny models
   and a SegFormer-b0-sized config, in 1 process and in 2 processes (DDP over gloo);
4. trainer.py vs that bare loop on the same model, to show the trainer's overhead;
5. on a GPU (when CUDA is available, or with --gpu yes): SegFormer-b0/b2, UperNet-ConvNeXt-small, DPT-base and
   BEiT-base-sized models at 288 px, fp32 vs bf16 autocast: images/s, step time, peak GPU memory, GPU utilisation;
6. on a GPU: trainer.py (bf16, decode-once cache, default workers) vs the bare loop.
Figures are medians over repeats; ratios are to the baseline of each section.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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

        from giseg.data.gi import GI_CLASSES

        r = self.index.iloc[int(self.rows[i])]
        img = cv2.imread(r.path, cv2.IMREAD_UNCHANGED).astype(np.float32)
        lo, hi = np.percentile(img, [0.5, 99.5])
        img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
        img = cv2.resize(img, (self.size, self.size))
        mask = np.stack([loop_decode_rle(r[f"rle_{c}"], (r.height, r.width)) if r[f"rle_{c}"] else
                         np.zeros((r.height, r.width), np.uint8) for c in GI_CLASSES], -1)
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
def bench_rle(data_dir: Path, repeats: int) -> tuple[list[list], str]:
    """Both decoders on every non-empty code, each returning a fresh mask (dropped before the next); ours into a
    reused buffer (as the cache build does); and the two floors that bound a numpy decoder: parsing the digits (one
    np.fromstring over all codes at once) and allocating the zeroed masks."""
    from giseg.data.gi import GI_CLASSES, build_index
    from giseg.data.rle import decode_rle

    index = build_index(data_dir)
    items = [(getattr(r, f"rle_{c}"), (r.height, r.width)) for r in index.itertuples() for c in GI_CLASSES
             if getattr(r, f"rle_{c}")]
    for code, shape in items:
        assert np.array_equal(decode_rle(code, shape), loop_decode_rle(code, shape)), "decoders disagree"
    runs = statistics.mean(len(c.split()) // 2 for c, _ in items)
    buffers = {s: np.zeros(s[0] * s[1], np.uint8) for _, s in items}

    def into_buffer():
        for code, shape in items:
            buf = buffers[shape]
            buf[:] = 0
            decode_rle(code, shape, out=buf)

    everything = " ".join(c for c, _ in items)

    def fresh(decode):  # each mask dropped before the next, as a streaming consumer does (steady allocator state)
        def run():
            for code, shape in items:
                decode(code, shape)
        return run

    def allocate():
        for _, shape in items:
            np.zeros(shape[0] * shape[1], np.uint8)

    variants = {"base": fresh(loop_decode_rle), "ours": fresh(decode_rle), "reused": into_buffer,
                "parse": lambda: np.fromstring(everything, dtype=np.int64, sep=" "), "alloc": allocate}
    times = {k: [] for k in variants}
    for _ in range(repeats):  # interleaved, so drift of the machine hits every variant alike
        for k, fn in variants.items():
            times[k].append(median_time(fn, 1))
    base, ours, reused, parse, alloc = (statistics.median(times[k]) for k in variants)
    per = lambda t: f"{t / len(items) * 1e6:.1f}"  # noqa: E731
    n = len(items)
    rows = [["per-run loop decoder (baseline)", n, f"{runs:.0f}", per(base), "1.00x"],
            ["rle.decode_rle (ours, validating)", n, f"{runs:.0f}", per(ours), f"{base / ours:.2f}x"],
            ["ours into a reused buffer (out=)", n, f"{runs:.0f}", per(reused), f"{base / reused:.2f}x"],
            ["floor: parse digits only (fromstring)", n, f"{runs:.0f}", per(parse), f"{base / parse:.2f}x"],
            ["floor: allocate zeroed masks only", n, "-", per(alloc), f"{base / alloc:.2f}x"]]
    bound = (f"Bounds for any decoder that parses the text with np.fromstring (numpy's C parser): baseline / parse "
             f"floor = {base / parse:.1f}x into a reused buffer, and baseline / (parse floor + allocation floor) = "
             f"{base / (parse + alloc):.1f}x returning fresh masks.")
    return rows, bound


# ---------------------------------------------------------------- 2. data pipeline
def bench_pipeline(data_dir: Path, image_size: int, repeats: int, workers: int) -> list[list]:
    from giseg.data.augment import train_transform
    from giseg.data.registry import DATASETS
    from giseg.data.cache import build_cache
    from giseg.data.gi import build_index
    from giseg.data.volumes import neighbour_table
    from giseg.data.dataset import SliceDataset

    index = build_index(data_dir)
    rows = np.arange(len(index))
    tf = train_transform(image_size)
    naive = median_time(lambda: iterate(NaiveDataset(index, rows, image_size, tf), 8, workers), repeats)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))

    def first_epoch():
        shutil.rmtree(tmp, ignore_errors=True)
        cache = build_cache(DATASETS["gi"], index, image_size, tmp, num_threads=max(1, workers))
        iterate(SliceDataset(cache, rows, neighbour_table(index, 1), tf), 8, workers)

    first = median_time(first_epoch, repeats)
    cache = build_cache(DATASETS["gi"], index, image_size, tmp)
    ds = SliceDataset(cache, rows, neighbour_table(index, 1), tf)
    cached = median_time(lambda: iterate(ds, 8, workers), repeats)
    shutil.rmtree(tmp, ignore_errors=True)
    n = len(index)
    return [["straightforward per-sample (baseline)", n, f"{n / naive:.0f}", "1.00x"],
            ["ours, first epoch (builds the cache)", n, f"{n / first:.0f}", f"{naive / first:.2f}x"],
            ["ours, cached epoch", n, f"{n / cached:.0f}", f"{naive / cached:.2f}x"]]


# ---------------------------------------------------------------- 3. training
def _sized_configs() -> dict:
    """Configs the size of the hub checkpoints users fine-tune (random weights: only the shapes matter here)."""
    from transformers import BeitConfig, ConvNextConfig, DPTConfig, SegformerConfig, UperNetConfig

    return {
        "segformer-b0": lambda: SegformerConfig(),  # the defaults are the b0 architecture
        "segformer-b2": lambda: SegformerConfig(depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 320, 512],
                                                decoder_hidden_size=768),
        "upernet-convnext-small": lambda: UperNetConfig(
            backbone_config=ConvNextConfig(depths=[3, 3, 27, 3], hidden_sizes=[96, 192, 384, 768],
                                           out_features=["stage1", "stage2", "stage3", "stage4"]),
            hidden_size=512, auxiliary_in_channels=384, use_auxiliary_head=True),
        "dpt-base": lambda: DPTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                      intermediate_size=3072, image_size=384, backbone_out_indices=[2, 5, 8, 11],
                                      neck_hidden_sizes=[96, 192, 384, 768], fusion_hidden_size=256),
        "beit-base": lambda: BeitConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                        intermediate_size=3072, image_size=640, use_relative_position_bias=True,
                                        out_indices=[3, 5, 7, 11], use_auxiliary_head=True),
    }


GPU_MODELS = ["segformer-b0", "segformer-b2", "upernet-convnext-small", "dpt-base", "beit-base"]


def _model_config(name: str):
    from giseg.models.registry import FAMILIES
    from giseg.models.tiny import ADE_LIKE_LABELS

    sized = _sized_configs()
    if name in sized:
        cfg = sized[name]()
    else:
        cfg = FAMILIES[name.removeprefix("tiny-")].tiny_config(ADE_LIKE_LABELS)
    cfg.id2label = dict(ADE_LIKE_LABELS)
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    return cfg


class GPUUtilisation:
    """Mean GPU utilisation (%) sampled by ``nvidia-smi`` while the block runs; None where it cannot be read."""

    def __init__(self, device_index: int):
        self.device_index, self.samples, self.proc = device_index, [], None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-i", str(self.device_index), "-lms", "100"], stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            import signal

            os.killpg(self.proc.pid, signal.SIGTERM)  # the whole group: nothing left holding the pipe open
            out, _ = self.proc.communicate(timeout=10)
            self.samples = [float(x) for x in out.split() if x.replace(".", "", 1).isdigit()]

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


def train_worker(args) -> None:
    """Bare forward/backward/step loop on synthetic batches resident on the device; prints one JSON line (rank 0).

    Steps are timed in windows of ``--window`` steps with a device sync only at window ends (on a GPU a sync per
    step would hide the overlap of Python and kernels); the figure is the median window's time per step."""
    import contextlib
    import resource

    import torch
    from transformers import AutoModelForSemanticSegmentation

    from giseg.data.gi import GI_CLASSES
    from giseg.training.losses import make_loss
    from giseg.inference.segmenter import upsample_like
    from giseg.models.wrapper import SegmentationModel, freeze_unused_parameters

    from giseg.models.baselines import BASELINES, build_baseline

    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.model in BASELINES:  # unet, unext, ...: the CNN baselines as trainer.py builds them
        hf = build_baseline(args.model, dict(enumerate(GI_CLASSES)))
    else:
        cfg = _model_config(args.model)
        cfg.id2label = dict(enumerate(GI_CLASSES))
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
        hf = AutoModelForSemanticSegmentation.from_config(cfg)
    model = SegmentationModel(hf).to(device)
    freeze_unused_parameters(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=device.type == "cuda")
    world, rank = 1, 0
    if args.ddp:
        from accelerate import Accelerator

        acc = Accelerator()
        model, opt = acc.prepare(model, opt)
        world, rank = acc.num_processes, acc.process_index
    loss_fn = make_loss("bce_dice", "multilabel", GI_CLASSES)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 8, (args.batch, args.size, args.size), dtype=torch.uint8, device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        with autocast:
            logits, aux = model(x)
            loss = loss_fn(upsample_like(logits, y.shape[-2:]), y)
            if aux is not None:
                loss = loss + 0.4 * loss_fn(upsample_like(aux, y.shape[-2:]), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with GPUUtilisation(device.index or 0) if device.type == "cuda" else contextlib.nullcontext() as util:
        for _ in range(args.steps):
            t = time.perf_counter()
            for _ in range(args.window):
                step()
            sync()
            times.append((time.perf_counter() - t) / args.window)
    step_time = statistics.median(times)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if rank == 0:
        print(json.dumps({"model": args.model, "processes": world, "size": args.size, "batch": args.batch,
                          "device": device.type, "precision": args.precision, "img_s": world * args.batch / step_time,
                          "step_s": step_time, "peak_mb": peak_mb,
                          "gpu_util": util.mean if device.type == "cuda" else None,
                          "params_m": sum(p.numel() for p in model.parameters()) / 1e6}), flush=True)


def run_worker(model: str, size: int, batch: int, steps: int, processes: int, device: str = "cpu",
               precision: str = "fp32", window: int = 1, channels_last: bool = False) -> dict:
    args = ["train-worker", "--model", model, "--size", str(size), "--batch", str(batch), "--steps", str(steps),
            "--device", device, "--precision", precision, "--window", str(window)]
    if channels_last:
        args.append("--channels_last")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if processes == 1:  # the worker imports giseg from this checkout, installed or not (a bare GPU machine)
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
                         f"{r['step_s'] * 1000:.0f}", f"{r['peak_mb']:.0f}"])
    return rows


def bench_gpu_training(models: list[str], size: int, batch: int, steps: int, window: int,
                       device: str = "cuda") -> list[list]:
    """Each model in fp32 and in bf16 autocast (and bf16 + channels_last for the convolutional UperNet) on
    batches resident on the GPU, so the data pipeline cannot be the bottleneck."""
    rows = []
    for model in models:
        variants = [("fp32", False), ("bf16", False)] + ([("bf16", True)] if "upernet" in model else [])
        base = None
        for precision, channels_last in variants:
            r = run_worker(model, size, batch, steps, 1, device, precision, window, channels_last)
            base = base or r["img_s"]
            util = "n/a" if r["gpu_util"] is None else f"{r['gpu_util']:.0f}"
            rows.append([model, f"{r['params_m']:.1f}M", precision + (" + channels_last" if channels_last else ""),
                         f"{r['img_s']:.1f}", f"{r['img_s'] / base:.2f}x", f"{r['step_s'] * 1000:.1f}",
                         f"{r['peak_mb']:.0f}", util])
    return rows


def logged_rates(log: str) -> list[float]:
    """The images/s of each of a train.log's progress lines ("... | 24.6 img/s"), in order."""
    return [float(m) for m in re.findall(r"\| ([\d.]+) img/s", log)]


def bench_trainer_overhead(data_dir: Path, model: str, size: int, batch: int, steps: int, workers: int,
                           repeats: int, device: str = "cpu", precision: str = "fp32") -> list[list]:
    """trainer.py vs the bare loop on the same model, size and batch: median images/s of the trainer's logged
    intervals (the first of each run left out: start-up), median over ``repeats`` runs of each."""
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
                   str(batch), "--max_train_steps", str(steps), "--epochs", "1000", "--log_every", "5",
                   "--num_workers", str(workers), "--cache_dir", str(tmp / "cache"), "--n_folds", "2",
                   "--mixed_precision", "bf16" if precision == "bf16" else "no"]
            env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})}
            subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
            trainer_rates.append(statistics.median(logged_rates((out / "train.log").read_text())[1:]))
        window = 1 if device == "cpu" else 5
        bare = statistics.median(run_worker(model, size, batch, 20, 1, device, precision, window)["img_s"]
                                 for _ in range(repeats))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer = statistics.median(trainer_rates)
    tag = "" if (device, precision) == ("cpu", "fp32") else f", {device} {precision}"
    return [[model, size, batch, f"bare loop (synthetic batches{tag})", f"{bare:.1f}", "1.00"],
            [model, size, batch, f"trainer.py (demo data, default workers{tag})", f"{trainer:.1f}",
             f"{trainer / bare:.2f}"]]


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
    w.add_argument("--device", default="cpu")
    w.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    w.add_argument("--window", type=int, default=1, help="steps per timed window")
    w.add_argument("--channels_last", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small sizes and one repeat (smoke test)")
    ap.add_argument("--data_dir", default=None, help="Kaggle-layout folder (default: a fresh demo dataset)")
    ap.add_argument("--repeats", type=int, default=5, help="repeats for the medians (default 5)")
    ap.add_argument("--json", default=None, help="also write all tables here")
    ap.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto",
                    help="sections 5 and 6, training on the GPU: auto = when CUDA is available")
    ap.add_argument("--gpu_batch", type=int, default=16, help="batch size of section 5 (default 16)")
    args = ap.parse_args()
    if args.cmd == "train-worker":
        train_worker(args)
        return
    import torch

    if args.gpu == "yes" and not torch.cuda.is_available():  # before the CPU sections, not after them
        raise SystemExit("--gpu yes: CUDA is not available to torch here")
    from giseg.utils.log import quiet_third_party

    quiet_third_party()
    repeats = 1 if args.quick else args.repeats
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    if args.data_dir:
        data_dir = Path(args.data_dir)
    else:
        from giseg.data.demo import make_demo_data

        data_dir = make_demo_data(tmp / "data", slices_per_day=6 if args.quick else 24, anatomy="large")
    cpu = platform.processor() or platform.machine()
    print(f"machine: {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), numpy {np.__version__}, python {platform.python_version()}")
    print(f"command: python benchmarks/bench.py {' '.join(sys.argv[1:])}".rstrip())
    results = {}

    rows, bound = bench_rle(data_dir, repeats * 4)
    results["rle"] = rows
    print("\n1. run-length decoding, every non-empty code of the data (median of repeats)\n")
    print(table(["decoder", "codes", "runs/code", "us/code", "speed-up"], rows))
    print(f"\n{bound}")

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

    if args.gpu == "yes" or (args.gpu == "auto" and torch.cuda.is_available()):
        gpu = torch.cuda.get_device_name(0)
        models = GPU_MODELS[:1] if args.quick else GPU_MODELS
        g_steps, g_window = (3, 2) if args.quick else (7, 10)
        rows = bench_gpu_training(models, 288, args.gpu_batch, g_steps, g_window)
        results["gpu_training"] = rows
        print(f"\n5. GPU training ({gpu}, torch {torch.version.cuda and 'CUDA ' + torch.version.cuda}), "
              f"synthetic batches of {args.gpu_batch} at 288 px on the GPU, median of {g_steps} windows of "
              f"{g_window} steps; GPU utilisation sampled by nvidia-smi\n")
        print(table(["model", "params", "precision", "images/s", "vs fp32", "step ms", "peak GPU MB", "GPU util %"],
                    rows))
        rows = bench_trainer_overhead(data_dir, "segformer-b0", 288, args.gpu_batch, 10 if args.quick else 60, -1,
                                      1 if args.quick else 3, "cuda", "bf16")
        results["gpu_trainer_overhead"] = rows
        print("\n6. trainer overhead on the GPU: trainer.py (decode-once cache, default workers) vs the bare loop\n")
        print(table(["model", "px", "batch", "loop", "images/s", "ratio"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
