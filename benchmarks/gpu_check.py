"""The GPU check: what a real-size model does on the GPU, through the trainer and against a bare loop, in one call.

    bash benchmarks/gpu_check.sh                 # on a CUDA machine (sized for 8 minutes); output under $OUT or gpu-check/
    bash benchmarks/gpu_check.sh --smoke         # the whole script on the CPU at toy size (tests/test_bench.py)

Sections, each printed as a table as soon as it is measured (so a run stopped at its time limit keeps what it did)
and collected in gpu_check.json, the issue's questions first:
1. trainer.py on competition-shaped data (`giseg demo-data --size 10x`: 2,160 slices at the competition's scan
   sizes) with a SegFormer-b2-sized model, --mixed_precision bf16 and the GPU defaults (data-loader workers, pinned
   memory), images/s from its log and the GPU's busy share sampled by nvidia-smi, against the bare loop on the same
   model; then the same with --torch_compile, with --torch_compile_mode reduce-overhead (CUDA graphs: the H200's
   first figures showed SegFormer waiting on the host's kernel launches) and in fp32 (faster than bf16 there);
   a variant that fails is printed as a finding and the check goes on;
2. fp16 autocast with loss scaling on the same model: whether every logged loss stays finite (the losses are
   computed in float32);
3. giseg predict on the validation fold of that data with the model trained in 1: slices/s;
4. bench.py's GPU section: SegFormer-b0/b2, UperNet-ConvNeXt-small, DPT-base and BEiT-base-sized models (random
   weights, the hub checkpoints' shapes) at 288 px, fp32 vs bf16 autocast, batches resident on the GPU (about 5
   minutes on an H200: a worker process per row).
With --smoke every model is the tiny SegFormer, sizes are toy, the device is the CPU, fp16 is replaced by bf16 and
torch.compile is disabled (TORCH_COMPILE_DISABLE=1): it checks that every line of the script runs, not speed.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402


def train(data: Path, model: Path, out: Path, size: int, batch: int, steps: int, precision: str, device: str,
          cache: Path, extra: list[str] = (), env: dict | None = None) -> dict:
    """One trainer.py run of ``steps`` steps: its logged images/s (median, the first interval left out), the GPU's
    busy share while it ran, its logged losses and wall time."""
    cmd = [sys.executable, str(ROOT / "trainer.py"), "--base_model", str(model), "--data_dir", str(data),
           "--output_dir", str(out), "--image_size", str(size), "--train_batch_size", str(batch), "--max_train_steps",
           str(steps), "--epochs", "1000", "--log_every", "10", "--cache_dir", str(cache), "--n_folds", "5",
           "--mixed_precision", precision, "--overwrite_output_dir", *extra]
    env = {**os.environ, **(env or {}), **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})}
    start = time.perf_counter()
    with bench.GPUUtilisation(0) as util:
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    log = (out / "train.log").read_text() if (out / "train.log").exists() else ""
    if res.returncode:
        raise RuntimeError(f"trainer.py failed ({res.returncode}): {' '.join(cmd)}\n{log[-2000:]}{res.stderr[-2000:]}")
    return {**parse_train_log(log), "gpu_busy": util.mean, "wall_s": wall}


def parse_train_log(log: str) -> dict:
    """A train.log's images/s (median of the logged intervals, the first, which holds the warm-up, left out) and
    its logged losses."""
    rates = bench.logged_rates(log)
    losses = [float(m) for m in re.findall(r"\| train_loss (\S+)", log)]
    return {"img_s": statistics.median(rates[1:] or rates), "losses": losses}


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
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        models, size, batch, g_steps, g_window, model = ["tiny-segformer"], 64, 2, 2, 1, "tiny-segformer"
        steps, bare_steps, fp16 = 4, 4, "bf16"
    else:
        models, size, batch, g_steps, g_window, model = bench.GPU_MODELS, 288, 16, 5, 10, "segformer-b2"
        steps, bare_steps, fp16 = 300, 60, "fp16"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (--smoke)"
    results: dict = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke}

    def save() -> None:
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1))

    print(f"GPU check on {name}, torch {torch.__version__} (CUDA {torch.version.cuda}); command: "
          f"bash benchmarks/gpu_check.sh{' --smoke' if args.smoke else ''}\n", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    t = time.perf_counter()
    data = (make_demo_data(work / "data", slices_per_day=4, anatomy="large") if args.smoke
            else make_demo_data(work / "data", size="10x"))
    from transformers import AutoModelForSemanticSegmentation

    folder = work / model
    AutoModelForSemanticSegmentation.from_config(bench._model_config(model)).save_pretrained(folder)
    print(f"\ndata and model ready in {time.perf_counter() - t:.0f} s: {data}, {model}", flush=True)
    runs = {}
    compile_env = {"TORCH_COMPILE_DISABLE": "1"} if args.smoke else {}
    variants = [("trainer.py, bf16", "bf16", [], {}),
                ("trainer.py, bf16, --torch_compile", "bf16", ["--torch_compile"], compile_env),
                ("trainer.py, bf16, --torch_compile_mode reduce-overhead (CUDA graphs)", "bf16",
                 ["--torch_compile", "--torch_compile_mode", "reduce-overhead"], compile_env),
                ("trainer.py, fp32", "no", [], {})]
    for label, precision, extra, env in (variants[:1] if args.smoke else variants):  # smoke: every line, 1 run
        try:
            runs[label] = train(data, folder, work / "run", size, batch, steps, precision, device, work / "cache",
                                extra, env)
        except RuntimeError as e:  # a variant that fails is a finding: recorded, and the check goes on
            print(f"\n{label}: FAILED\n{str(e)[-1500:]}", flush=True)
            runs[label] = None
    bare = bench.run_worker(model, size, batch, bare_steps, 1, device, "bf16", 1 if args.smoke else 5)
    rows = [[f"bare loop (synthetic batches on the {device})", f"{bare['img_s']:.1f}", "1.00",
             cell(bare["gpu_util"], "{:.0f}"), "n/a"]]
    rows += [[label, "failed", "n/a", "n/a", "n/a"] if r is None else
             [label, f"{r['img_s']:.1f}", f"{r['img_s'] / bare['img_s']:.2f}", cell(r["gpu_busy"], "{:.0f}"),
              f"{r['wall_s']:.0f}"] for label, r in runs.items()]
    results["trainer"] = rows
    save()
    print(f"\n1. {model} at {size} px, batch {batch}: trainer.py ({steps} steps on the data, default workers and "
          f"pinned memory) vs the bare loop\n")
    print(bench.table(["loop", "images/s", "vs bare", "GPU busy %", "wall s"], rows), flush=True)

    half = train(data, folder, work / "run-fp16", size, batch, steps, fp16, device, work / "cache")
    finite = all(math.isfinite(x) for x in half["losses"])
    results["fp16"] = {"precision": fp16, "losses": half["losses"], "finite": finite, "img_s": half["img_s"]}
    save()
    print(f"\n2. {fp16} autocast{' with loss scaling' if fp16 == 'fp16' else ''} on {model}: {len(half['losses'])} "
          f"logged losses, {'all finite' if finite else 'NOT all finite'} (first {cell(half['losses'][0], '{:.4f}')}, "
          f"last {cell(half['losses'][-1], '{:.4f}')}), {half['img_s']:.1f} images/s", flush=True)

    t = time.perf_counter()
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})}
    res = subprocess.run([sys.executable, "-m", "giseg", "predict", "--model", str(work / "run" / "best"),
                          "--data_dir", str(data), "--fold", "0", "--n_folds", "5", "--out", str(work / "pred.csv"),
                          "--cache_dir", str(work / "cache")], capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t
    if res.returncode:
        raise RuntimeError(f"giseg predict failed: {res.stderr[-2000:]}")
    slices = (len((work / "pred.csv").read_text().splitlines()) - 1) // 3  # a row per slice and class
    results["predict"] = {"slices": slices, "wall_s": wall, "slices_s": slices / wall}
    save()
    print(f"\n3. giseg predict, validation fold (start-up included): {slices} slices in {wall:.1f} s = "
          f"{slices / wall:.1f} slices/s", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    t = time.perf_counter()
    rows = bench.bench_gpu_training(models, size, batch, g_steps, g_window, device)
    results["models"] = rows
    save()
    print(f"\n4. bare training loop, synthetic batches of {batch} at {size} px on the device, median of {g_steps} "
          f"windows of {g_window} steps ({time.perf_counter() - t:.0f} s)\n")
    print(bench.table(["model", "params", "precision", "images/s", "vs fp32", "step ms", "peak GPU MB", "GPU busy %"],
                      rows), flush=True)
    print(f"\nwritten: {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
