"""What seeding each sample's augmentation costs (issue 16: exact resumes, results independent of worker count).

    python benchmarks/bench_seeding.py

SliceDataset items at 288 px with the training augmentation, one process, the demo data (216 slices), 4 epochs
per measurement, 6 measurements alternating: with dataset.seed_pipeline per sample (what training does), with
one running stream (no per-sample seeding, as before issue 16), and with albumentations' own set_random_seed.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


from giseg.data import dataset  # noqa: E402
from giseg.data.registry import DATASETS
from giseg.data.augment import train_transform
from giseg.data.cache import build_cache
from giseg.data.gi import build_index
from giseg.data.volumes import neighbour_table
from giseg.data.demo import make_demo_data


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-seeding-"))
    make_demo_data(work / "data", slices_per_day=24, anatomy="large")  # the data of the figures in the README
    index = build_index(work / "data")
    cache = build_cache(DATASETS["gi"], index, 288, work / "cache")
    ds = dataset.SliceDataset(cache, np.arange(len(index)), neighbour_table(index, 1), train_transform(288, seed=0))
    ours = dataset.seed_pipeline
    variants = {"per-sample seed_pipeline (training)": ours,
                "one running stream (before issue 16)": lambda pipeline, seed: None,
                "albumentations set_random_seed per sample": lambda pipeline, seed: pipeline.set_random_seed(seed)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(6):
        for name, seeder in variants.items():
            dataset.seed_pipeline = seeder
            start = time.perf_counter()
            for epoch in range(4):
                ds.set_epoch(epoch)
                for i in range(len(ds)):
                    ds[i]
            times[name].append((time.perf_counter() - start) / (4 * len(ds)) * 1e6)
    dataset.seed_pipeline = ours
    base = statistics.median(times["one running stream (before issue 16)"])
    print("| item at 288 px, augmented, 1 process | us/item (median of 6) | vs one stream |")
    print("| --- | --- | --- |")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.0f} | {statistics.median(ts) - base:+.0f} us |")
    print("command: python benchmarks/bench_seeding.py")


if __name__ == "__main__":
    main()
