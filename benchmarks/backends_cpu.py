"""Predict on the CPU with the three backends: PyTorch eager, torch.compile (inductor) and ONNX Runtime.

    python benchmarks/backends_cpu.py                 # SegFormer-b0 shapes (random weights), 288 px, batch 8
    python benchmarks/backends_cpu.py --smoke         # the tiny SegFormer at 64 px (tests/test_bench.py)

One run, one model folder (the hub checkpoint's shapes, random weights, the GI demo's three classes), exported once
with giseg export-onnx, the demo data (`giseg demo-data`). For each backend:
- forward: the model's forward pass alone on a batch of 8 prepared slices, median of repeats after warm-up;
- predict: the whole `giseg predict` path (predict_rows: decode-once cache, preparation, forward, upsampling to each
  scan's size, thresholds, run-length encoding) over every slice, once to warm up (torch.compile compiles
  there: its time is reported as "first pass") and once timed;
- agreement: the share of mask pixels that differ from eager's.
Prints the machine, the threads each runtime uses, and the command.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def make_model(folder: Path, name: str, size: int) -> Path:
    """A model folder as the trainer writes it, with ``name``'s shapes (bench.py) and random weights."""
    from transformers import AutoModelForSemanticSegmentation

    import bench
    from giseg.data.gi import GI_CLASSES
    from giseg.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
    from giseg.inference.spec import InferenceSpec
    from giseg.models.load import save_model

    cfg = bench._model_config(name)
    cfg.id2label = dict(enumerate(GI_CLASSES))
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    spec = InferenceSpec(dataset="gi", task="multilabel", classes=GI_CLASSES, image_size=size, context_slices=1,
                         context_stride=2, mean=IMAGENET_MEAN, std=IMAGENET_STD, thresholds=(0.5,) * 3)
    save_model(AutoModelForSemanticSegmentation.from_config(cfg), folder, spec)
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the tiny SegFormer at 64 px: checks the script runs")
    ap.add_argument("--repeats", type=int, default=10, help="timed forward passes per backend (default 10)")
    ap.add_argument("--profile", action="store_true", help="instead: where eager PyTorch and ONNX Runtime spend a "
                    "forward pass (the share of each operator's time)")
    args = ap.parse_args(argv)
    from giseg.utils.log import quiet_third_party

    quiet_third_party()
    with tempfile.TemporaryDirectory(prefix="backends-") as work:
        return run(args, Path(work))


def run(args, work: Path) -> int:
    import numpy as np
    import torch

    from giseg.data.demo import make_demo_data
    from giseg.data.registry import get_adapter
    from giseg.data.rle import decode_rle
    from giseg.inference.ensemble import Ensemble
    from giseg.inference.export import export_onnx
    from giseg.inference.segmenter import BACKENDS, Segmenter
    from giseg.inference.submission import predict_rows

    name, size, batch = ("tiny-segformer", 64, 8) if args.smoke else ("segformer-b0", 288, 8)
    data = make_demo_data(work / "data", **({"slices_per_day": 4} if args.smoke else {}))
    folder = make_model(work / "model", name, size)
    report = export_onnx(folder)
    import onnxruntime

    cmd = "python benchmarks/backends_cpu.py" + (" --smoke" if args.smoke else "") + (" --profile" if args.profile else "")
    print(f"# {cmd}  ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}; torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"onnxruntime {onnxruntime.__version__} with its default threads)")
    print(f"# model: {name} shapes, random weights, {size} px, batch {batch}; export {report['export_s']:.1f} s, "
          f"{report['megabytes']:.1f} MB, parity {report['max_relative_difference']:.1g}")
    if args.profile:
        return profile(folder, batch, size)
    adapter = get_adapter("gi", "benchmark").bind(str(data), {}, ("large_bowel", "small_bowel", "stomach"))
    index = adapter.build_index(str(data), "train", require_labels=False)
    rows = np.arange(len(index))
    sizes = list(zip(index["height"], index["width"]))
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    results, masks = {}, {}
    for backend in BACKENDS:
        t = time.perf_counter()
        model = Ensemble([Segmenter.load(folder, "cpu", backend=backend)])
        inputs = model.inputs(adapter, index, work / "cache")
        load_s = time.perf_counter() - t
        seg = model.members[0]
        t = time.perf_counter()
        first = predict_rows(model, index, rows, inputs, adapter.volume_columns, batch)
        first_s = time.perf_counter() - t
        with torch.no_grad():
            for _ in range(2):
                seg.logits(x)
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                seg.logits(x)
                times.append(time.perf_counter() - t)
        t = time.perf_counter()
        sub = predict_rows(model, index, rows, inputs, adapter.volume_columns, batch)
        predict_s = time.perf_counter() - t
        assert sub.equals(first), f"{backend}: two passes over the same slices differ"
        masks[backend] = [decode_rle(code, sizes[k // 3]) for k, code in enumerate(sub["predicted"])]
        results[backend] = {"forward_ms": statistics.median(times) * 1000, "load_s": load_s, "first_s": first_s,
                            "predict_s": predict_s}
    pixels = sum(m.size for m in masks["eager"])
    print(f"\n{len(rows)} slices of the demo ({data}), every one predicted twice per backend\n")
    print("| backend | forward ms (batch of 8, median) | forward vs eager | first pass s (compile included) | "
          "predict slices/s | predict vs eager | pixels differing from eager |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = results["eager"]
    for backend, r in results.items():
        differ = sum(int((a != b).sum()) for a, b in zip(masks[backend], masks["eager"]))
        print(f"| {backend} | {r['forward_ms']:.1f} | {base['forward_ms'] / r['forward_ms']:.2f}x | "
              f"{r['first_s']:.1f} | {len(rows) / r['predict_s']:.1f} | {base['predict_s'] / r['predict_s']:.2f}x | "
              f"{differ} of {pixels} ({differ / pixels:.1e}) |")
    return 0


def profile(folder: Path, batch: int, size: int, top: int = 6) -> int:
    """The operators' shares of a forward pass: torch.profiler for eager PyTorch, ONNX Runtime's own profiler."""
    import json

    import onnxruntime as ort
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from giseg.inference.segmenter import Segmenter

    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    seg = Segmenter.load(folder)
    with torch.no_grad():
        seg.logits(x)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                seg.logits(x)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows)
    print("\neager PyTorch, 3 forward passes: " + ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f} %"
                                                            for e in rows[:top]))
    options = ort.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(folder / "ort-profile")
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    for _ in range(4):
        session.run(None, {"pixel_values": x.numpy()})
    shares: dict[str, float] = {}
    for e in json.loads(Path(session.end_profiling()).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            shares[e["args"]["op_name"]] = shares.get(e["args"]["op_name"], 0) + e["dur"]
    total = sum(shares.values())
    print("ONNX Runtime, 4 runs: " + ", ".join(f"{op} {100 * d / total:.0f} %" for op, d in
                                               sorted(shares.items(), key=lambda kv: -kv[1])[:top]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
