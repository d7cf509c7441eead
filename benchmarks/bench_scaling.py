"""How the data path, training, prediction and scoring scale from the demo to the competition's size.

    python benchmarks/bench_scaling.py --root /data/scaling                     # demo, 10x and full (38,496 slices)
    python benchmarks/bench_scaling.py --root /tmp/s --sizes demo,10x --train_steps 50   # quicker

For each size (demo_data.py --size: demo 216 slices, 10x 2,256, full 38,496), in a fresh process each stage:
  index     data.build_index with every run-length code validated (s)
  cache     cache.build_cache at 288 px, all cores (s, slices/s, bytes on disk); peak memory of index + cache build
  train     one epoch of the tiny SegFormer at 288 px on the cached pipeline with data-loader workers, as the
            trainer feeds it (index, cache open, model, loaders, AdamW): time to the first step, images/s, peak
            memory; --train_steps N stops after N steps (a CPU cannot do a full epoch of 38,496 slices in
            minutes, a GPU can)
  predict   predict.py over every slice (slices/s)
  score     score.py on that full submission (s), with the time spent in the 3D Hausdorff distance (summed over
            score.py's threads, so it can exceed the wall time); the model is
            the tiny one untrained, whose noise fills whole volumes: the worst case for the distance transforms
  score_truth  score.py on the ground truth written as a submission: organ-sized masks, as a trained model's
Every stage has a fixed start-up cost (imports, model load); "marginal ms/slice" divides the difference to the
smallest size by the difference in slices, the cost that grows with the data.
Peak memory is read from /proc (sampled every 20 ms, main process and workers summed): "anon" is the memory the
processes own (heap, tensors; a forked worker's count includes the pages it still shares with its parent), "PSS"
the proportional anon memory, read once after the last training step (shared pages split between the processes
sharing them, so "all PSS" is what must fit in RAM), "file" the pages of memory-mapped files they touched (the
cache: shared page cache that the kernel can drop), as separate columns. Generating the data is timed too but is
not part of any figure. A table per stage, per-slice figures and the ratio of the largest size to the smallest.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

IMAGE_SIZE = 288


# ---------------------------------------------------------------- memory
def _status_kb(pid: int) -> tuple[int, int]:
    """(RssAnon + RssShmem, RssFile) of a process in kB; (0, 0) when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    f = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines() if line.startswith("Rss")}
    return f.get("RssAnon", 0) + f.get("RssShmem", 0), f.get("RssFile", 0)


def _pss_anon_kb(pid: int) -> int:
    """Proportional anon memory of a process in kB (pages shared with a forked parent count once overall)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    f = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss_")}
    return f.get("Pss_Anon", 0) + f.get("Pss_Shmem", 0)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class PeakMemory:
    """Samples this process and its children every 20 ms; ``anon_mb`` and ``file_mb`` are the peaks of the sums,
    ``main_mb`` and ``worker_mb`` the peak anon memory of this process and of its largest child. ``sample_pss()``
    reads the proportional anon memory once (``pss_*``: a page a forked worker shares with its parent counts once,
    split between them; ``pss_all_mb`` is what the processes together hold). Reading it walks every mapping and
    stalls the workers (sampled every second it halved the CPU training rate), so it is read once, at the end."""

    def __init__(self):
        self.anon_mb = self.file_mb = self.main_mb = self.worker_mb = 0.0
        self.pss_main_mb = self.pss_worker_mb = self.pss_all_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = os.getpid()
        while not self._stop.wait(0.02):
            sizes = [_status_kb(p) for p in [me, *_children(me)]]
            self.anon_mb = max(self.anon_mb, sum(a for a, _ in sizes) / 1024)
            self.main_mb = max(self.main_mb, sizes[0][0] / 1024)
            self.worker_mb = max([self.worker_mb, *(a / 1024 for a, _ in sizes[1:])])
            self.file_mb = max(self.file_mb, sum(f for _, f in sizes) / 1024)

    def sample_pss(self) -> None:
        me = os.getpid()
        pss = [_pss_anon_kb(p) / 1024 for p in [me, *_children(me)]]
        self.pss_main_mb, self.pss_worker_mb, self.pss_all_mb = pss[0], max(pss[1:], default=0.0), sum(pss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- stages (each in its own process)
def stage_cache(data_dir: str, cache_dir: str) -> dict:
    from giseg.data.registry import get_adapter
    from giseg.data.cache import build_cache

    adapter = get_adapter("gi")
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        index = adapter.build_index(data_dir)
        t1 = time.perf_counter()
        cache = build_cache(adapter, index, IMAGE_SIZE, cache_dir, num_threads=os.cpu_count() or 1)
        t2 = time.perf_counter()
    size = sum(f.stat().st_size for f in cache.path.iterdir())
    return {"slices": len(index), "index_s": t1 - t0, "cache_s": t2 - t1, "cache_bytes": size,
            "anon_mb": mem.anon_mb, "file_mb": mem.file_mb}


def stage_train(data_dir: str, cache_dir: str, model_dir: str, steps: int, workers: int, device: str) -> dict:
    """The trainer's own pieces (load_data, build_model, make_loaders, SegmentationLoss, AdamW) for one epoch."""
    t_start = time.perf_counter()
    import torch

    from giseg.data.registry import get_adapter
    from giseg.training.losses import make_loss
    from giseg.inference.segmenter import upsample_like
    from giseg.training.config import TrainConfig
    from giseg.training.build import build_model, load_data, make_loaders
    from giseg.training.optim import make_optimizer

    class OneProcess:  # what load_data asks of an Accelerator, for one process
        def local_main_process_first(self):
            import contextlib

            return contextlib.nullcontext()

    dev = torch.device(device)
    cfg = TrainConfig(base_model=model_dir, data_dir=data_dir, output_dir="unused", image_size=IMAGE_SIZE,
                      cache_dir=cache_dir, num_workers=workers, train_batch_size=16, lr=1e-3)
    adapter = get_adapter("gi")
    with PeakMemory() as mem:
        data = load_data(cfg, adapter, OneProcess())
        model, spec, _ = build_model(cfg, adapter, 1)
        model.to(dev).train()
        train_dl, _ = make_loaders(cfg, data, spec, dev, 1)
        optimizer = make_optimizer(cfg, model, dev)
        loss_fn = make_loss(cfg.loss, cfg.task, adapter.classes, adapter.priority)
        first = None
        images, n = 0, 0
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast(
            "cpu", enabled=False)
        for batch in train_dl:
            pixels, masks = batch["pixel_values"].to(dev, non_blocking=True), batch["mask"].to(dev, non_blocking=True)
            with autocast:
                logits, _ = model(pixels)
            loss = loss_fn(upsample_like(logits, masks.shape[-2:]), masks)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n += 1
            if first is None:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                first = time.perf_counter()
            else:
                images += pixels.shape[0]
            if steps and n >= steps:
                break
        if dev.type == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        mem.sample_pss()  # the workers are still alive (persistent)
    return {"train_slices": len(data.train_rows), "steps": n, "first_step_s": first - t_start,
            "images_per_s": images / max(end - first, 1e-9), "anon_mb": mem.anon_mb, "file_mb": mem.file_mb,
            "main_mb": mem.main_mb, "worker_mb": mem.worker_mb, "pss_main_mb": mem.pss_main_mb,
            "pss_worker_mb": mem.pss_worker_mb, "pss_all_mb": mem.pss_all_mb,
            "workers": train_dl.num_workers, "full_epoch": not steps or n < steps}


def stage_model(model_dir: str) -> dict:
    """A tiny SegFormer at 288 px saved as predict.py reads it (its head replaced for our classes)."""
    from giseg.data.gi import GI_CLASSES
    from giseg.inference.spec import InferenceSpec
    from giseg.models.load import load_model, save_model
    from giseg.models.tiny import make_tiny

    tiny = make_tiny("segformer", Path(model_dir) / "tiny")
    loaded = load_model(str(tiny), "multilabel", GI_CLASSES)
    spec = InferenceSpec(dataset="gi", task="multilabel", classes=GI_CLASSES, image_size=IMAGE_SIZE, context_slices=1,
                         context_stride=2, mean=loaded.mean, std=loaded.std, thresholds=(0.5,) * 3)
    save_model(loaded.model, Path(model_dir) / "best", spec)
    return {}


def stage_score(data_dir: str, submission: str) -> dict:
    from giseg.commands import score as score_command
    from giseg.evaluation import score

    spent = [0.0]
    inner = score.hausdorff_3d

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    score.hausdorff_3d = timed
    t0 = time.perf_counter()
    assert score_command.main(["--pred", submission, "--data_dir", data_dir, "--json", submission + ".json"]) == 0
    return {"score_s": time.perf_counter() - t0, "hausdorff_s": spent[0]}


# ---------------------------------------------------------------- driver
def in_process(stage: str, **kw) -> dict:
    """Run one stage in a fresh interpreter (its own peak memory) and return its figures."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r});"
            f"import bench_scaling as b; print('RESULT' + json.dumps(b.stage_{stage}(**{kw!r})))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return json.loads(next(line for line in res.stdout.splitlines() if line.startswith("RESULT"))[6:])


def table(header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="folder for the generated data, caches and outputs (reused)")
    ap.add_argument("--sizes", default="demo,10x,full", help="demo_data.py --size values (default: all three)")
    ap.add_argument("--train_steps", type=int, default=0, help="stop each training stage after N steps (0: epoch)")
    ap.add_argument("--workers", type=int, default=2, help="data-loader workers of the training stage (default 2)")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu", help="training device (default: cuda if any)")
    ap.add_argument("--stages", default="cache,train,predict,score,score_truth", help="which stages (default: all)")
    args = ap.parse_args(argv)
    root = Path(args.root)
    stages = args.stages.split(",")
    from giseg.data.demo import make_demo_data

    command = " ".join(["python", "benchmarks/bench_scaling.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"# {command}\n# {platform.node()}: {os.cpu_count()} cores, {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, training on {args.device}", flush=True)
    if not (root / "model" / "best").is_dir():
        in_process("model", model_dir=str(root / "model"))
    results = {}
    for size in args.sizes.split(","):
        data = root / f"data-{size}"
        t = time.perf_counter()
        make_demo_data(data, size=size, workers=os.cpu_count() or 1, slices_per_day=24,  # the demo before #12
                       anatomy="large")
        r = {"generate_s": time.perf_counter() - t}
        cache_dir = str(root / "cache")
        if "cache" in stages:
            # a fresh cache each time: build it, not find it
            for old in Path(cache_dir).glob(f"{IMAGE_SIZE}px-*"):
                shutil.rmtree(old)
            r.update(in_process("cache", data_dir=str(data), cache_dir=cache_dir))
        if "train" in stages:
            r["train"] = in_process("train", data_dir=str(data), cache_dir=cache_dir, model_dir=str(root / "model" / "best"),
                                    steps=args.train_steps, workers=args.workers, device=args.device)
        if "predict" in stages:
            sub = root / f"submission-{size}.csv"
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "giseg", "predict", "--model", str(root / "model" / "best"), "--data_dir",
                                  str(data), "--out", str(sub), "--cache_dir", cache_dir, "--num_workers",
                                  str(args.workers), "--batch_size", "32"], capture_output=True, text=True, cwd=ROOT)
            if res.returncode:
                raise SystemExit(res.stdout[-2000:] + res.stderr[-2000:])
            r["predict_s"] = time.perf_counter() - t
            if "score" in stages:
                r.update(in_process("score", data_dir=str(data), submission=str(sub)))
        if "score_truth" in stages:
            import pandas as pd

            truth = root / f"truth-{size}.csv"
            pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False).rename(
                columns={"segmentation": "predicted"}).to_csv(truth, index=False)
            r["truth"] = in_process("score", data_dir=str(data), submission=str(truth))
        results[size] = r
        print(f"# {size}: {json.dumps(r)}", flush=True)
    report(results)


def _marginal(results: dict, size: str, seconds) -> str:
    """ms per slice of the difference to the smallest size, or '' for the smallest."""
    first = next(iter(results))
    n0, n = results[first].get("slices"), results[size].get("slices")
    s0, s1 = seconds(results[first]), seconds(results[size])
    if size == first or not n0 or not n or s0 is None or s1 is None:
        return ""
    return f"{1e3 * (s1 - s0) / (n - n0):.2f}"


def report(results: dict) -> None:
    rows_data, rows_train, rows_infer = [], [], []
    for size, r in results.items():
        n = r.get("slices") or 0
        if "index_s" in r:
            rows_data.append([size, n, f"{r['generate_s']:.1f}", f"{r['index_s']:.2f}",
                              f"{1e3 * r['index_s'] / n:.3f}", f"{r['cache_s']:.1f}", f"{n / r['cache_s']:.0f}",
                              f"{r['cache_bytes'] / 1e9:.2f}", f"{r['anon_mb']:.0f}", f"{r['file_mb']:.0f}"])
        if "train" in r:
            t = r["train"]
            rows_train.append([size, t["train_slices"], t["steps"], "yes" if t["full_epoch"] else "no", t["workers"],
                               f"{t['first_step_s']:.1f}", f"{t['images_per_s']:.1f}", f"{t.get('main_mb', 0):.0f}",
                               f"{t.get('worker_mb', 0):.0f}", f"{t['anon_mb']:.0f}", f"{t['file_mb']:.0f}",
                               f"{t.get('pss_main_mb', 0):.0f}", f"{t.get('pss_worker_mb', 0):.0f}",
                               f"{t.get('pss_all_mb', 0):.0f}"])
        if n and ("predict_s" in r or "truth" in r):
            f = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
            rows_infer.append([
                size, n, f(r.get("predict_s")), f(n / r["predict_s"]) if "predict_s" in r else "",
                _marginal(results, size, lambda x: x.get("predict_s")), f(r.get("score_s")), f(r.get("hausdorff_s")),
                f(r.get("truth", {}).get("score_s")), f(r.get("truth", {}).get("hausdorff_s")),
                _marginal(results, size, lambda x: x.get("truth", {}).get("score_s"))])
    if rows_data:
        print("\n## index and decode-once cache (288 px)\n" + table(
            ["size", "slices", "generate s", "index s", "index ms/slice", "cache s", "cache slices/s", "cache GB",
             "peak anon MB", "peak file MB"], rows_data))
    if rows_train:
        print("\n## training, tiny SegFormer at 288 px, batch 16\n" + table(
            ["size", "train slices", "steps", "whole epoch", "workers", "first step s", "images/s",
             "main anon MB", "largest worker anon MB", "all anon MB", "all file MB", "main PSS MB",
             "largest worker PSS MB", "all PSS MB"], rows_train))
    if rows_infer:
        print("\n## predict.py over every slice; score.py on its submission and on the ground truth\n" + table(
            ["size", "slices", "predict s", "predict slices/s", "predict marginal ms/slice", "score s (untrained)",
             "Hausdorff thread-s", "score s (truth)", "Hausdorff thread-s", "score (truth) marginal ms/slice"],
            rows_infer))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
