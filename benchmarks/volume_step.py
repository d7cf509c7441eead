"""A 3D model's training step on this machine: seconds per step and patches per second, in PyTorch's default
memory format and in channels_last_3d (what the trainer uses for 3D models), and peak GPU memory on a GPU.

    python benchmarks/volume_step.py                                   # tiny SegResNet, 2 x 16x64x64 (a CPU's size)
    python benchmarks/volume_step.py --family segresnet3d --full --patch 128,160,160 --batch 2   # on a GPU
    python benchmarks/volume_step.py --smoke                          # one step each: checks that it runs

Each variant: --warmup steps, then the median of --steps timed steps (forward, loss on the patch's slices as the
trainer computes it, backward, AdamW step), on random inputs. Prints a table and the command that reproduces it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def time_steps(model, x, masks, loss_fn, steps: int, warmup: int, device) -> list[float]:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        logits = model(x).logits
        loss = loss_fn(logits.transpose(1, 2).flatten(0, 1), masks.flatten(0, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="segresnet3d", help="a 3D family of the registry (default segresnet3d)")
    ap.add_argument("--full", action="store_true", help="the --base_model <family> size, not the tiny config")
    ap.add_argument("--patch", default="16,64,64", help="D,H,W (default 16,64,64)")
    ap.add_argument("--batch", type=int, default=2, help="patches per step (default 2)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    ap.add_argument("--smoke", action="store_true", help="one timed step, no warm-up")
    args = ap.parse_args(argv)
    import torch

    from giseg.models.registry import FAMILIES
    from giseg.models.volume import GIVolumeForSemanticSegmentation, build_volume
    from giseg.training.losses import make_loss

    steps, warmup = (1, 0) if args.smoke else (args.steps, args.warmup)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classes = ("large_bowel", "small_bowel", "stomach")
    id2label = dict(enumerate(classes))
    d, h, w = (int(v) for v in args.patch.split(","))
    rows = []
    for layout in ("contiguous", "channels_last_3d"):
        torch.manual_seed(0)
        if args.full:
            model = build_volume(args.family, id2label)
        else:
            model = GIVolumeForSemanticSegmentation(FAMILIES[args.family].tiny_config(id2label))
        model = model.to(device).train()
        x = torch.randn(args.batch, 1, d, h, w, device=device)
        masks = torch.randint(0, 8, (args.batch, d, h, w), dtype=torch.uint8, device=device)
        if layout == "channels_last_3d":
            model = model.to(memory_format=torch.channels_last_3d)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = time_steps(model, x, masks, make_loss("bce_dice", "multilabel", classes), steps, warmup, device)
        sec = statistics.median(times)
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device.type == "cuda" else "-"
        rows.append(f"| {layout} | {sec:.3f} | {args.batch / sec:.2f} | {peak} |")
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\n3D training step: {args.family} ({'full' if args.full else 'tiny'}, {n_params:.2f}M parameters), batch "
          f"{args.batch} x patch {d}x{h}x{w}, median of {steps} steps after {warmup} warm-up, on {device}\n")
    print("| memory format | s / step | patches / s | peak GPU MB |\n| --- | --- | --- | --- |")
    print("\n".join(rows))
    command = "python benchmarks/volume_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\ncommand: {command.strip()}\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
