"""Several machines through Accelerate, proven on one host: two "machines" of one process each, started by
run_train.sh (NNODES=2, NODE_RANK, MASTER_ADDR, MASTER_PORT), against one machine of two processes."""
import json
import re
import subprocess
import sys

import pytest

from conftest import DDP_ARGS, ROOT, distributed_env, free_port

pytestmark = pytest.mark.slow  # (bash run_tests.sh -m "not slow": the quick part)


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _rows(trace):
    """{rank: {epoch: [rows...]}} from the --trace_rows files."""
    out = {}
    for f in sorted(trace.glob("rows_rank*.txt")):
        per_epoch = {}
        for line in f.read_text().splitlines():
            epoch, *rows = map(int, line.split())
            per_epoch.setdefault(epoch, []).extend(rows)
        out[int(f.stem.removeprefix("rows_rank"))] = per_epoch
    return out


def _two_machines(demo_dir, model, tmp_path, caches, strace_node1: bool = False):
    """Start node 0 and node 1 with run_train.sh, one process each; return (results, output dir, traces)."""
    out, trace = tmp_path / "run", tmp_path / "trace"
    trace.mkdir()
    port = str(free_port())
    procs = []
    for rank, cache in enumerate(caches):
        env = distributed_env(
            PYTHON=sys.executable, NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
            OUTPUT_DIR=str(out), LOG_FILE=str(tmp_path / f"node{rank}.log"), FOREGROUND="1",
            BASE_MODEL=str(model), DATA_DIR=str(demo_dir),
            EXTRA_ARGS=" ".join([*DDP_ARGS, "--cache_dir", str(cache), "--trace_rows", str(trace)]))
        cmd = ["bash", str(ROOT / "run_train.sh")]
        if rank == 1 and strace_node1:
            # (--seccomp-bpf: the process stops only at the traced calls, not at each of its imports' stats)
            cmd = ["strace", "-f", "--seccomp-bpf", "-qq", "-o", str(tmp_path / "node1.strace"),
                   "-e", "trace=openat,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat", *cmd]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    results = [(p.wait(timeout=400), p.stdout.read()) for p in procs]
    for rc, text in results:
        assert rc == 0, text[-3000:]
    return out, trace


def _written_by(strace_file, under) -> list[str]:
    """Paths under ``under`` that the traced processes created, opened for writing, renamed or deleted."""
    written = []
    for line in strace_file.read_text().splitlines():
        m = re.search(r'(openat|creat|mkdir|mkdirat|rename|renameat2?|unlink|unlinkat)\((.*)\)\s+=\s+(-?\d+)', line)
        if not m or int(m.group(3)) < 0:
            continue
        call, args = m.group(1), m.group(2)
        if call == "openat" and not re.search(r"O_WRONLY|O_RDWR|O_CREAT", args):
            continue
        written += [p for p in re.findall(r'"([^"]+)"', args) if p.startswith(str(under))]
    return written


def test_two_machines_of_one_process_train_like_one_machine_of_two(demo_dir, tiny_models, two_process_run, tmp_path):
    import shutil

    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (CI installs it: .ci/run)")
    reference = two_process_run
    assert reference.result.returncode == 0, reference.result.stdout[-2000:] + reference.result.stderr[-2000:]
    out, trace = _two_machines(demo_dir, tiny_models["upernet"], tmp_path,
                               [tmp_path / "cache0", tmp_path / "cache1"], strace_node1=True)
    # the same figures as one machine of two processes with the same seed
    got, want = _records(out), _records(reference.out)
    assert [r["step"] for r in got] == [r["step"] for r in want] and len(got) == 2
    for g, w in zip(got, want):
        for key in ("train_loss", "val_loss", "dice_mean"):
            assert g[key] == pytest.approx(w[key], abs=1e-6), key
    # each rank trained on its own half of every epoch, the same halves as on one machine
    rows, ref_rows = _rows(trace), _rows(reference.trace)
    assert set(rows) == {0, 1} and rows == ref_rows
    from giseg.data.gi import build_index
    from giseg.data.folds import split_by_case

    train_rows, _ = split_by_case(build_index(demo_dir), 0, 3)
    for epoch in (0, 1):
        a, b = set(rows[0][epoch]), set(rows[1][epoch])
        assert not a & b and (a | b) <= set(train_rows.tolist()) and len(a | b) == len(a) + len(b) >= 40
    # only rank 0 wrote outputs; rank 1 wrote nothing into the run folder but its own RNG state in checkpoints
    written = _written_by(tmp_path / "node1.strace", out)
    assert written and all(p.endswith("/random_states_1.pkl") for p in written), sorted(set(written))[:10]
    # each machine built its own cache, once
    for cache in ("cache0", "cache1"):
        assert len(list((tmp_path / cache).glob("96px-*"))) == 1
    assert "world size 2" in (out / "train.log").read_text()


def test_two_machines_sharing_one_cache_dir_build_it_once_and_train_the_same(demo_dir, tiny_models, two_process_run,
                                                                              tmp_path):
    from giseg.data.cache import check_cache

    shared = tmp_path / "shared-cache"
    out, _ = _two_machines(demo_dir, tiny_models["upernet"], tmp_path, [shared, shared])
    folders = list(shared.glob("96px-*"))
    assert len(folders) == 1 and check_cache(folders[0], verify=True) is None
    assert not [p for p in shared.iterdir() if p.name.endswith((".tmp", ".old"))]
    for g, w in zip(_records(out), _records(two_process_run.out)):
        assert g["dice_mean"] == pytest.approx(w["dice_mean"], abs=1e-6)


def test_fsdp_on_two_cpu_processes_trains_like_ddp_saves_whole_models_and_resumes(demo_dir, tiny_models,
                                                                                   two_process_run, tmp_path):
    """`accelerate launch --use_fsdp` (FSDP2, full shard) on gloo: the figures of the DDP run with the same seed,
    best/ saved whole (it loads with the Auto class), and a resume from its sharded checkpoint trains on."""
    from transformers import AutoModelForSemanticSegmentation

    out = tmp_path / "fsdp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port",
              str(free_port()), "--use_fsdp", "--fsdp_version", "2", "--fsdp_cpu_ram_efficient_loading", "false",
              "--fsdp_auto_wrap_policy", "NO_WRAP", "--fsdp_state_dict_type", "FULL_STATE_DICT",
              "--mixed_precision", "no", str(ROOT / "trainer.py"), "--base_model", str(tiny_models["upernet"]),
              "--data_dir", str(demo_dir), "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), *DDP_ARGS]
    res = subprocess.run(launch, capture_output=True, text=True, timeout=400, cwd=ROOT, env=distributed_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for g, w in zip(_records(out), _records(two_process_run.out), strict=True):
        for key in ("train_loss", "val_loss", "dice_mean"):
            assert g[key] == pytest.approx(w[key], abs=1e-5), key
    model = AutoModelForSemanticSegmentation.from_pretrained(out / "best")
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in AutoModelForSemanticSegmentation.from_pretrained(two_process_run.out / "best").parameters())
    launch[launch.index("--epochs") + 1] = "3"  # one more epoch, from the sharded state of step 12
    res = subprocess.run([*launch, "--resume_from_checkpoint", "latest"], capture_output=True, text=True,
                         timeout=400, cwd=ROOT, env=distributed_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "resumed from " + str(out / "checkpoints" / "step_00000012") in log
    assert [r["epoch"] for r in _records(out)] == [1, 2, 3]
