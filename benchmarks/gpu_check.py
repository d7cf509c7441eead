"""The GPU check: issue #40's questions first, each run under a time cap, in one call of about 8 minutes.

    bash benchmarks/gpu_check.sh                 # on a CUDA machine; output under $OUT or gpu-check/
    bash benchmarks/gpu_check.sh --smoke         # the whole script on the CPU at toy size (tests/test_bench.py)

Sections, each printed as a table as soon as it is measured (so a run stopped at its time limit keeps what it did)
and collected in gpu_check.json, in the order of what the issue asks:
1. trainer.py on competition-shaped data (`giseg demo-data --size 10x`: 2,160 slices at the competition's scan
   sizes) with a SegFormer-b2-sized model at 288 px, in priority order: batch 16 and 64 and --auto_batch_size, each
   eager, --torch_compile and --torch_compile_mode reduce-overhead (CUDA graphs), in bf16 and fp32 (TF32); images/s
   (the median of the logged intervals, the first left out), the GPU's busy share (nvidia-smi), the peak memory
   and the step time, against the bare loop on synthetic batches resident on the GPU. Each run stops at its cap
   (what it logged by then is its figure); the variants left when the section's time is up are listed as skipped;
2. the data loader alone (the decode-once cache, the training augmentation, pinned memory) with 8 and 16 workers:
   whether it can feed the rate of section 1;
3. giseg predict with the model trained in 1: slices/s of the model alone (batches resident on the GPU) and end
   to end (the command, start-up included);
4. bench.py's bare loop for SegFormer-b0/b2, UperNet-ConvNeXt-small, DPT-base and BEiT-base shapes (random weights,
   the hub checkpoints' shapes), fp32 vs bf16, with what time is left;
5. fp16 autocast with loss scaling on the model of 1: whether every logged loss stays finite;
6. a 3D model's training step (issue #42; benchmarks/volume_step.py): SegResNet at its --base_model size on patches
   of 80 x 160 x 160 (batch 2), patches/s and peak memory, in both memory formats (needs MONAI: carry its wheel).
With --smoke every model is the tiny SegFormer, sizes, caps and variants are toy, the device is the CPU, fp16 is
replaced by bf16 and torch.compile is disabled (TORCH_COMPILE_DISABLE=1): it checks that every line runs, not speed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402


def train(data: Path, model: Path, out: Path, size: int, batch: int, steps: int, precision: str, device: str,
          cache: Path, extra: list[str] = (), env: dict | None = None, cap_s: float | None = None) -> dict:
    """One trainer.py run of ``steps`` steps, stopped at ``cap_s`` seconds (its figures: what it logged by then):
    its logged images/s (median, the first interval left out), peak memory and losses, the GPU's busy share, wall
    time and whether the cap stopped it."""
    cmd = [sys.executable, str(ROOT / "trainer.py"), "--base_model", str(model), "--data_dir", str(data),
           "--output_dir", str(out), "--image_size", str(size), "--train_batch_size", str(batch), "--max_train_steps",
           str(steps), "--epochs", "1000", "--log_every", "10", "--cache_dir", str(cache), "--n_folds", "5",
           "--mixed_precision", precision, "--overwrite_output_dir", *extra]
    env = {**os.environ, **(env or {}), **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})}
    start, capped = time.perf_counter(), False
    with bench.GPUUtilisation(0) as util:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        try:
            _, err = proc.communicate(timeout=cap_s)
        except subprocess.TimeoutExpired:
            proc.terminate()  # (SIGTERM: the trainer saves and stops; its log keeps every interval it measured)
            _, err = proc.communicate()
            capped = True
    wall = time.perf_counter() - start
    log = (out / "train.log").read_text() if (out / "train.log").exists() else ""
    if proc.returncode and not capped:
        raise RuntimeError(f"trainer.py failed ({proc.returncode}): {' '.join(cmd)}\n{log[-2000:]}{err[-2000:]}")
    batches = re.findall(r"batch (\d+) x \d+ processes", log)
    return {**parse_train_log(log), "gpu_busy": util.mean, "wall_s": wall, "capped": capped,
            "batch": int(batches[-1]) if batches else batch}


def parse_train_log(log: str) -> dict:
    """A train.log's images/s (median of the logged intervals, the first, which holds the warm-up, left out) and
    its logged losses."""
    rates = bench.logged_rates(log)
    losses = [float(m) for m in re.findall(r"\| train_loss (\S+)", log)]
    peaks = [int(m) for m in re.findall(r"\| peak GPU (\d+) MB", log)]
    return {"img_s": statistics.median(rates[1:] or rates) if rates else None, "losses": losses,
            "peak_mb": max(peaks) if peaks else None}


def summarise_recording(text: str) -> list[str]:
    """Table rows for the trainer runs recorded by hand in a recording such as benchmarks/gpu_check_h200.txt: each
    "## train.log" section's precision, steps, images/s (parse_train_log), whether every loss is finite and the
    last evaluation's mean Dice, with the GPU's mean busy share from the "nvidia-smi dmon" section after it (the
    samples while a kernel ran at all, i.e. without start-up)."""
    rows = []
    for section in text.split("## train.log")[1:]:
        log, _, rest = section.partition("## nvidia-smi dmon")
        parsed = parse_train_log(log)
        precision = re.search(r"mixed precision (\S+),", log).group(1)
        steps = re.findall(r"step (\d+)/\d+ \|", log)[-1]
        dice = re.findall(r"\| mean ([\d.]+) \|", log)[-1]
        dmon = rest.split("\n# Call", 1)[0].split("\n## ", 1)[0]
        busy = [int(line.split()[1]) for line in dmon.splitlines() if line.strip()[:1].isdigit()]
        busy = [b for b in busy if b > 0]
        rows.append(f"| trainer.py, {precision}, {steps} steps | {parsed['img_s']:.1f} | "
                    f"{statistics.mean(busy):.0f} | {'yes' if all(map(math.isfinite, parsed['losses'])) else 'NO'} | "
                    f"{dice} |")
    return rows


def cell(value: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if value is None else fmt.format(value)



# section 1's variants, in the order the issue's questions need them: (batch: a number or "auto", mode, precision)
PRIORITY = [(16, "eager", "bf16"), (64, "eager", "bf16"), (64, "reduce-overhead", "bf16"),
            ("auto", "reduce-overhead", "bf16"), (64, "compile", "bf16"), (64, "eager", "no"),
            (64, "reduce-overhead", "no"), ("auto", "eager", "bf16")]
VARIANTS = PRIORITY + [(b, m, p) for p in ("bf16", "no") for b in (16, 64, "auto")
                       for m in ("eager", "compile", "reduce-overhead") if (b, m, p) not in PRIORITY]
SMOKE_VARIANTS = [("auto", "reduce-overhead", "bf16")]  # (the flags of every kind; eager's path is the same code)


class Budget:
    """Seconds left of the call, and whether a step of ``need`` seconds still fits."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def variant_flags(batch, mode: str) -> tuple[int, list[str]]:
    """(--train_batch_size, other trainer flags) of a section-1 variant."""
    flags = {"eager": [], "compile": ["--torch_compile"],
             "reduce-overhead": ["--torch_compile", "--torch_compile_mode", "reduce-overhead"]}[mode]
    return (16, [*flags, "--auto_batch_size"]) if batch == "auto" else (batch, flags)


def section_trainer(s: dict, budget: Budget, results: dict, save) -> None:
    """1. trainer.py variants against the bare loop, each under its cap, until the section's share of time is up."""
    bare = bench.run_worker(s["model"], s["size"], s["bare_batch"], s["bare_steps"], 1, s["device"], "bf16",
                            s["window"])
    rows = [[f"bare loop, batch {s['bare_batch']}, bf16 (synthetic batches on the {s['device']})",
             f"{bare['img_s']:.1f}", "1.00", cell(bare["gpu_util"], "{:.0f}"), f"{bare['peak_mb']:.0f}",
             f"{bare['step_s'] * 1000:.1f}", "n/a"]]
    skipped = []
    for k, (batch, mode, precision) in enumerate(s["variants"]):
        label = f"batch {batch}, {mode}, {'fp32 (TF32)' if precision == 'no' else precision}"
        cap = (s["cap_compile"] if mode != "eager" else s["cap_eager"]) + (s["first_extra"] if k == 0 else 0)
        if budget.left() - s["reserve"] < cap:
            skipped.append(label)
            continue
        size_batch, flags = variant_flags(batch, mode)
        env = {"TORCH_COMPILE_DISABLE": "1"} if s["smoke"] and mode != "eager" else {}
        try:
            r = train(s["data"], s["folder"], s["work"] / "run", s["size"], size_batch, s["steps"], precision,
                      s["device"], s["work"] / "cache", flags, env, None if s["smoke"] else cap)
        except RuntimeError as e:  # a variant that fails is a finding: recorded, and the check goes on
            print(f"\n{label}: FAILED\n{str(e)[-1500:]}", flush=True)
            rows.append([label, "failed", "n/a", "n/a", "n/a", "n/a", "n/a"])
            continue
        rate = r["img_s"]
        rows.append([label + (f" (batch {r['batch']})" if batch == "auto" else ""), cell(rate),
                     cell(rate / bare["img_s"] if rate else None, "{:.2f}"), cell(r["gpu_busy"], "{:.0f}"),
                     cell(r["peak_mb"], "{:.0f}"), cell(r["batch"] / rate * 1000 if rate else None),
                     f"{r['wall_s']:.0f}{' (capped)' if r['capped'] else ''}"])
        results["trainer"], results["skipped"] = rows, skipped
        save()
    results["trainer"], results["skipped"] = rows, skipped
    save()
    print(f"\n1. {s['model']} at {s['size']} px: trainer.py ({s['steps']} steps at most, each run capped) vs the bare "
          "loop\n")
    print(bench.table(["run", "images/s", "vs bare", "GPU busy %", "peak MB", "step ms", "wall s"], rows))
    print(f"skipped for time: {', '.join(skipped) if skipped else 'none'}", flush=True)


def section_loader(s: dict, results: dict, save) -> None:
    """2. the training data loader alone: the decode-once cache, augmentation, pinned memory, batches moved to the
    device, for each worker count, over at most ``cap_loader`` seconds."""
    import torch

    from giseg.data.augment import train_transform
    from giseg.data.cache import build_cache
    from giseg.data.dataset import SliceDataset
    from giseg.data.gi import build_index
    from giseg.data.registry import DATASETS
    from giseg.data.volumes import neighbour_table

    index = build_index(s["data"])
    cache = build_cache(DATASETS["gi"], index, s["size"], s["work"] / "loader-cache", num_threads=os.cpu_count() or 1)
    ds = SliceDataset(cache, np.arange(len(index)), neighbour_table(index, 1), train_transform(s["size"]))
    rows = []
    for workers in s["workers"]:
        dl = torch.utils.data.DataLoader(ds, batch_size=s["loader_batch"], shuffle=True, num_workers=workers,
                                         drop_last=True, pin_memory=s["device"] == "cuda")
        start, images = time.perf_counter(), 0
        for batch in dl:
            batch["pixel_values"].to(s["device"], non_blocking=True)
            images += batch["pixel_values"].shape[0]
            if time.perf_counter() - start > s["cap_loader"]:
                break
        rows.append([workers, images, f"{images / (time.perf_counter() - start):.0f}"])
    results["loader"] = rows
    save()
    print(f"\n2. the training loader alone at {s['size']} px (cache, augmentation, pinned memory, batch "
          f"{s['loader_batch']})\n")
    print(bench.table(["workers", "images", "images/s"], rows), flush=True)


def section_predict(s: dict, results: dict, save) -> None:
    """3. giseg predict with section 1's last model: the model alone on resident batches, then the command."""
    import torch

    from giseg.inference.segmenter import Segmenter

    best = s["work"] / "run" / "best"
    seg = Segmenter.load(best, s["device"])
    x = torch.randn(64, seg.spec.input_channels(), s["size"], s["size"], device=s["device"])
    sync = torch.cuda.synchronize if s["device"] == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            seg.logits(x)
        sync()
        start = time.perf_counter()
        for _ in range(s["predict_repeats"]):
            seg.logits(x)
        sync()
    model_only = 64 * s["predict_repeats"] / (time.perf_counter() - start)
    start = time.perf_counter()
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if s["device"] == "cpu" else {})}
    res = subprocess.run([sys.executable, "-m", "giseg", "predict", "--model", str(best), "--data_dir", str(s["data"]),
                          "--fold", "0", "--n_folds", "5", "--out", str(s["work"] / "pred.csv"), "--cache_dir",
                          str(s["work"] / "cache")], capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if res.returncode:
        raise RuntimeError(f"giseg predict failed: {res.stderr[-2000:]}")
    slices = (len((s["work"] / "pred.csv").read_text().splitlines()) - 1) // 3  # a row per slice and class
    results["predict"] = {"model_only_slices_s": model_only, "slices": slices, "wall_s": wall,
                          "slices_s": slices / wall}
    save()
    print(f"\n3. giseg predict: the model alone {model_only:.0f} slices/s (batches of 64 on the {s['device']}); "
          f"the command, start-up included, {slices} slices in {wall:.1f} s = {slices / wall:.1f} slices/s",
          flush=True)


def section_models(s: dict, budget: Budget, results: dict, save) -> None:
    """4. the bare loop of each family's shapes, fp32 vs bf16, while time is left."""
    start, rows = time.perf_counter(), []
    for model in s["models"]:
        if budget.left() - s["reserve_models"] < s["per_model"]:
            rows.append([model, "skipped for time", "", "", "", "", "", ""])
            continue
        rows += bench.bench_gpu_training([model], s["size"], 16, s["g_steps"], s["window"], s["device"])
        results["models"] = rows
        save()
    results["models"] = rows
    save()
    print(f"\n4. bare training loop, synthetic batches of 16 at {s['size']} px on the device, median of "
          f"{s['g_steps']} windows of {s['window']} steps ({time.perf_counter() - start:.0f} s)\n")
    print(bench.table(["model", "params", "precision", "images/s", "vs fp32", "step ms", "peak GPU MB",
                       "GPU busy %"], rows), flush=True)


def section_fp16(s: dict, budget: Budget, results: dict, save) -> None:
    """5. fp16 autocast with loss scaling: every logged loss finite?"""
    if budget.left() < s["cap_eager"]:
        print("\n5. fp16: skipped for time", flush=True)
        return
    half = train(s["data"], s["folder"], s["work"] / "run-fp16", s["size"], 16, s["steps"], s["fp16"], s["device"],
                 s["work"] / "cache", cap_s=None if s["smoke"] else s["cap_eager"])
    finite = all(math.isfinite(x) for x in half["losses"])
    results["fp16"] = {"precision": s["fp16"], "losses": half["losses"], "finite": finite, "img_s": half["img_s"]}
    save()
    losses = half["losses"] or [None]
    print(f"\n5. {s['fp16']} autocast on {s['model']}: {len(half['losses'])} logged losses, "
          f"{'all finite' if finite else 'NOT all finite'} (first {cell(losses[0], '{:.4f}')}, last "
          f"{cell(losses[-1], '{:.4f}')}), {cell(half['img_s'])} images/s", flush=True)


def section_volume(s: dict, budget: Budget, results: dict, save) -> None:
    """6. a 3D model's training step (benchmarks/volume_step.py), with what time is left."""
    import contextlib
    import io

    import volume_step

    from giseg.utils.errors import UserError

    if budget.left() < s["cap_volume"]:
        print("\n6. 3D training step: skipped for time", flush=True)
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            volume_step.main(s["volume_args"])
    except UserError as e:  # (no MONAI on the machine)
        buf.write(f"skipped: {e}")
    results["volume"] = buf.getvalue().strip().splitlines()
    save()
    print("\n6. " + buf.getvalue().strip(), flush=True)


def settings(smoke: bool, work: Path) -> dict:
    """Sizes, caps and time shares: the GPU's, or toy ones on the CPU (--smoke)."""
    if smoke:
        return dict(smoke=True, device="cpu", model="tiny-segformer", size=64, steps=4, bare_batch=4, bare_steps=4,
                    window=1, variants=SMOKE_VARIANTS, cap_eager=0, cap_compile=0, first_extra=0, reserve=-1e9,
                    workers=(0,), cap_loader=2, loader_batch=4, predict_repeats=2, models=["tiny-segformer"], g_steps=2,
                    per_model=0, reserve_models=-1e9, fp16="bf16", work=work, total=1e9, cap_volume=0,
                    volume_args=["--smoke", "--patch", "8,32,32", "--batch", "1"])
    return dict(smoke=False, device="cuda", model="segformer-b2", size=288, steps=2000, bare_batch=64, bare_steps=60,
                window=10, variants=VARIANTS, cap_eager=40, cap_compile=150, first_extra=60, reserve=150,
                workers=(8, 16), cap_loader=20, loader_batch=64, predict_repeats=20, models=bench.GPU_MODELS, g_steps=5,
                per_model=35, reserve_models=45, fp16="fp16", work=work, total=470, cap_volume=25,
                volume_args=["--full", "--patch", "80,160,160", "--batch", "2", "--steps", "5"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-check", help="folder for gpu_check.json (default gpu-check)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the script runs")
    ap.add_argument("--summarise", metavar="FILE", help="print the table of the trainer runs recorded in FILE "
                    "(benchmarks/gpu_check_h200.txt: the rows docs/performance.md quotes) and stop")
    args = ap.parse_args(argv)
    if args.summarise:
        print("| run | images/s (median) | GPU busy % (nvidia-smi dmon, while busy) | losses finite | last mean Dice |")
        print("| --- | --- | --- | --- | --- |")
        print("\n".join(summarise_recording(Path(args.summarise).read_text())))
        return 0
    import torch

    from giseg.data.demo import make_demo_data
    from giseg.utils.log import quiet_third_party

    quiet_third_party()
    if not args.smoke and not torch.cuda.is_available():
        print("error: CUDA is not available to torch here (use --smoke on a CPU)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s = settings(args.smoke, Path(tempfile.mkdtemp(prefix="gpu-check-")))
    budget = Budget(s["total"])
    name = torch.cuda.get_device_name(0) if s["device"] == "cuda" else "CPU (--smoke)"
    results: dict = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke}

    def save() -> None:
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1))

    print(f"GPU check on {name}, torch {torch.__version__} (CUDA {torch.version.cuda}); command: "
          f"bash benchmarks/gpu_check.sh{' --smoke' if args.smoke else ''}\n", flush=True)
    t = time.perf_counter()
    s["data"] = (make_demo_data(s["work"] / "data", slices_per_day=4, anatomy="large") if args.smoke
                 else make_demo_data(s["work"] / "data", size="10x", workers=os.cpu_count() or 1))
    from transformers import AutoModelForSemanticSegmentation

    s["folder"] = s["work"] / s["model"]
    AutoModelForSemanticSegmentation.from_config(bench._model_config(s["model"])).save_pretrained(s["folder"])
    print(f"\ndata and model ready in {time.perf_counter() - t:.0f} s: {s['data']}, {s['model']}", flush=True)
    section_trainer(s, budget, results, save)
    section_loader(s, results, save)
    section_predict(s, results, save)
    section_models(s, budget, results, save)
    section_fp16(s, budget, results, save)
    section_volume(s, budget, results, save)
    shutil.rmtree(s["work"], ignore_errors=True)
    print(f"\nwritten: {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
