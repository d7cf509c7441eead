import subprocess
import sys

from conftest import ROOT


def test_benchmark_quick_run_prints_every_table_and_its_command():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "command: python benchmarks/bench.py --quick" in out and "machine:" in out
    for section in ("1. run-length decoding", "2. data pipeline", "3. training", "4. trainer overhead"):
        assert section in out
    assert "per-run loop decoder (baseline)" in out and "ours, cached epoch" in out
