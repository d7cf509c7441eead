import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # (bash run_tests.sh -m "not slow": the quick part)

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_benchmark_quick_run_prints_every_table_and_its_command():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--gpu", "no"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "command: python benchmarks/bench.py --quick --gpu no" in out and "machine:" in out
    for section in ("1. run-length decoding", "2. data pipeline", "3. training", "4. trainer overhead"):
        assert section in out
    assert "per-run loop decoder (baseline)" in out and "ours, cached epoch" in out
    assert "ours into a reused buffer (out=)" in out and "floor: allocate zeroed masks only" in out
    bound = re.search(r"parse floor = ([\d.]+)x into a reused buffer, and baseline / \(parse floor \+ allocation "
                      r"floor\) = ([\d.]+)x returning fresh masks", out)
    assert bound and float(bound.group(1)) > float(bound.group(2)) > 1


def test_gpu_section_refuses_to_run_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal only happens without it")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--gpu", "yes"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode != 0 and "--gpu yes: CUDA is not available" in res.stderr


def test_sized_configs_match_the_hub_checkpoints_parameter_counts():
    """The GPU section's "SegFormer-b2-sized" etc. must really be that size (150 ADE classes, as on the hub)."""
    import torch
    from transformers import AutoModelForSemanticSegmentation

    import bench

    # published sizes: SegFormer model cards (b0 3.75M, b2 27.5M), mmsegmentation's UperNet ConvNeXt-S (82M) and
    # UperNet BEiT-B (163M); DPT-base has no ADE checkpoint: a ViT-B encoder alone is 86M
    expected = {"segformer-b0": 3.75, "segformer-b2": 27.5, "upernet-convnext-small": 82, "beit-base": 163}
    for name in bench.GPU_MODELS:
        with torch.device("meta"):
            model = AutoModelForSemanticSegmentation.from_config(bench._model_config(name))
        millions = sum(p.numel() for p in model.parameters()) / 1e6
        if name in expected:
            assert abs(millions / expected[name] - 1) < 0.03, (name, millions)
        else:
            assert 86 < millions < 150, (name, millions)


def test_training_worker_runs_bf16_autocast_with_channels_last_and_timing_windows():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "train-worker", "--model",
                          "tiny-upernet", "--size", "32", "--batch", "2", "--steps", "2", "--window", "2",
                          "--precision", "bf16", "--channels_last"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["precision"] == "bf16" and r["device"] == "cpu" and r["gpu_util"] is None
    assert r["img_s"] > 0 and r["step_s"] > 0 and r["peak_mb"] > 0
    assert r["img_s"] == pytest.approx(2 / r["step_s"])


def test_gpu_utilisation_is_the_mean_of_nvidia_smi_samples(tmp_path, monkeypatch):
    import bench

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 40\necho 80\necho 90\nsleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    import time

    with bench.GPUUtilisation(0) as util:
        time.sleep(0.5)
    assert util.mean == pytest.approx(70)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with bench.GPUUtilisation(0) as util:
        pass
    assert util.mean is None


def test_learning_efficiency_counts_runs_off_the_floor_and_their_first_step():
    import learning_efficiency as le

    floors = {"a": 0.5, "b": 0.8}
    runs = [{"floors": floors, "curve": [{"step": 10, "dice_a": 0.5, "dice_b": 0.8, "dice_mean": 0.65},
                                         {"step": 20, "dice_a": 0.7, "dice_b": 0.805, "dice_mean": 0.75}]},
            {"floors": floors, "curve": [{"step": 10, "dice_a": 0.6, "dice_b": 0.9, "dice_mean": 0.75},
                                         {"step": 20, "dice_a": 0.505, "dice_b": 0.95, "dice_mean": 0.7275}]}]
    s = le.summarise(runs, ("a", "b"), margin=0.01)
    assert s["a"]["off_floor"] == 1 and s["a"]["first_step"] == 20  # run 2 left the floor, then fell back
    assert s["b"]["off_floor"] == 1 and s["b"]["first_step"] == 10  # run 1 ends within the margin: not off
    assert s["a"]["mean"] == pytest.approx(0.6025) and s["mean"]["mean"] == pytest.approx(0.73875)


def test_learning_efficiency_smoke_run_prints_the_table_and_its_command(tmp_path, capsys):
    import learning_efficiency as le

    assert le.main(["--smoke", "--work", str(tmp_path), "--variants", "default"]) == 0
    out = capsys.readouterr().out
    assert "| default | " in out and "/1 off the floor" in out and "--epochs 1" in out
    assert "Per-class Dice by step" in out and "| default | 21 | " in out  # the curve: 1 epoch of 21 steps
    assert "command: python benchmarks/learning_efficiency.py --smoke --work" in out and "machine:" in out
    assert le.main(["--variants", "nope", "--work", str(tmp_path)]) == 2


def test_pretrained_head_smoke_run_fine_tunes_its_own_pretrained_b0_with_a_new_head(tmp_path, capsys):
    import pretrained_head as ph

    assert ph.main(["--smoke", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| head_prior 0.01 (default) | " in out and "| head_prior 0 | " in out and "(3 steps)" in out
    assert "command: python benchmarks/pretrained_head.py --smoke --work" in out
    config = json.loads((tmp_path / "mit-b0-random" / "config.json").read_text())
    assert config["hidden_sizes"] == [32, 64, 160, 256] and config["depths"] == [2, 2, 2, 2]  # mit-b0's sizes
    log = (tmp_path / "runs" / "head_prior_0.01_epochs_1-seed42-fold0" / "train.log").read_text()
    assert "decode_head.classifier.bias: bias set for a class probability of 0.01" in log  # the 4-label head is new


def test_gpu_check_smoke_runs_every_section_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh is fired on a lent GPU machine with minutes to spare: its --smoke runs every line of
    it here (toy sizes, CPU), so a device call never discovers a typo."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert results["smoke"] and len(results["trainer"]) == 2 and results["skipped"] == []  # the bare loop + 1 variant
    assert results["trainer"][1][0] == "batch auto, reduce-overhead, bf16 (batch 16)"  # (a CPU keeps the batch)
    assert results["loader"][0][1] > 0 and results["predict"]["model_only_slices_s"] > 0
    # section 4 as it runs on a GPU: every variant runs, the ratios refer to fp32, no nvidia-smi reading on the CPU
    rows = results["models"]
    assert [r[2] for r in rows][:2] == ["fp32", "bf16"]  # (+ channels_last for the convolutional families)
    assert rows[0][4] == "1.00x" and all(r[7] == "n/a" for r in rows)
    base = float(rows[0][3])
    for r in rows[1:]:  # the printed ratio agrees with the printed rates, whatever their rounding (1 decimal)
        rate, ratio = float(r[3]), float(r[4].rstrip("x"))
        lowest = (rate - 0.05) / (base + 0.05)
        highest = (rate + 0.05) / (base - 0.05) if base > 0.05 else float("inf")
        assert lowest - 0.005 <= ratio <= highest + 0.005, (rate, base, ratio)
    assert results["fp16"]["finite"] and results["fp16"]["losses"] and results["predict"]["slices"] > 0
    text = (tmp_path / "out" / "gpu_check.txt").read_text()
    assert "2. the training loader alone" in text and "3. giseg predict: the model alone" in text
    assert "4. bare training loop" in text and "torch 2." in (tmp_path / "out" / "env.txt").read_text()
    assert "6. 3D training step: segresnet3d (tiny" in text
    assert any("| channels_last_3d |" in r for r in results["volume"])


def test_the_gpu_checks_variants_put_the_issues_questions_first_and_cover_the_whole_matrix():
    import gpu_check

    assert gpu_check.VARIANTS[:3] == [(16, "eager", "bf16"), (64, "eager", "bf16"), (64, "reduce-overhead", "bf16")]
    matrix = {(b, m, p) for b in (16, 64, "auto") for m in ("eager", "compile", "reduce-overhead")
              for p in ("bf16", "no")}
    assert set(gpu_check.VARIANTS) == matrix and len(gpu_check.VARIANTS) == len(matrix)
    assert gpu_check.variant_flags("auto", "reduce-overhead") == (16, ["--torch_compile", "--torch_compile_mode",
                                                                      "reduce-overhead", "--auto_batch_size"])


def test_backends_benchmark_smoke_runs_the_three_backends_and_compares_their_masks(tmp_path):
    """benchmarks/backends_cpu.py --smoke: the tiny SegFormer through eager, compile (not compiled here:
    TORCH_COMPILE_DISABLE=1, tests/inference/test_segmenter.py compiles) and ONNX Runtime, with the table."""
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1", "TMPDIR": str(tmp_path)}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "backends_cpu.py"), "--smoke", "--repeats", "2"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith(("| eager", "| compile", "| onnxruntime"))]
    assert len(rows) == 3 and "# python benchmarks/backends_cpu.py --smoke" in res.stdout
    differ = [re.search(r"\| (\d+) of (\d+) \(", row).groups() for row in rows]
    assert differ[0][0] == "0" and all(int(n) <= 1e-4 * int(total) for n, total in differ), differ


def test_the_seed_summary_calls_a_difference_within_one_sd_noise():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from demo_figures import seed_summary

    lines = seed_summary({"defaults": [(0.95, 0.96), (0.94, 0.97), (0.95, 0.98)],
                          "--a": [(0.95, 0.965), (0.95, 0.975), (0.95, 0.985)],  # +0.005, sd of the difference 0.008
                          "--b": [(0.90, 0.90), (0.90, 0.91), (0.90, 0.92)]})
    assert lines[2] == "| defaults | 0.9467 ± 0.0058 | 0.9700 ± 0.0100 |  |"
    assert lines[3].endswith("| +0.0050 ± 0.0082 (noise) |")
    assert lines[4].endswith("| -0.0600 ± 0.0082 (beyond one sd) |")


def test_the_docs_figures_block_states_each_figure_with_its_range_and_the_check_reads_it_back():
    """demo_figures.py writes each figure of the default run with its range over the RANGE_RUNS variants, and
    --check accepts a fresh run inside that range widened by the tolerance, and nothing outside it (issue #43: a
    single stated figure failed the suite on another machine)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from demo_figures import KEYS, block, outside, stated

    runs = [{**{k: 0.9 + i / 100 for k in KEYS}, "epochs": 14, "steps": 490, "best_step": 420, "train_s": 60.0,
             "load": (1.0, 1.5)} for i in (2, 0, 4)]
    runs[0]["score_hausdorff"] = 0.0231
    want = stated(block(runs, "abc1234"))
    assert set(want) == set(KEYS)
    assert want["epoch3_dice_mean"] == (0.92, 0.90, 0.94) and want["score_hausdorff"] == (0.0231, 0.0231, 0.94)
    inside = {k: 0.9 for k in KEYS}
    assert outside(want, inside, 0.005) == {}
    assert outside(want, {**inside, "epoch3_dice_mean": 0.9451}, 0.005) == {"epoch3_dice_mean": (0.90, 0.94, 0.9451)}
    assert outside(want, {**inside, "final_dice_mean": 0.8949}, 0.005) == {"final_dice_mean": (0.90, 0.94, 0.8949)}


def test_volume_step_smoke_times_both_memory_formats(capsys):
    """benchmarks/volume_step.py --smoke: one training step of the tiny SegResNet in each layout, with the command."""
    import volume_step

    assert volume_step.main(["--smoke", "--patch", "8,32,32", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "| contiguous |" in out and "| channels_last_3d |" in out
    assert "command: python benchmarks/volume_step.py --smoke --patch 8,32,32 --batch 1" in out
