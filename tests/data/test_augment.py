"""The augmentation's albumentations import: without its update check (a call home on import), and with no
lasting change to the environment of the process that imports it."""
import os
import subprocess
import sys

SPY = """
import builtins, os, sys
seen = []
real_import = builtins.__import__
def spy(name, *args, **kwargs):
    if name == "albumentations" and "albumentations" not in sys.modules:
        seen.append(os.environ.get("NO_ALBUMENTATIONS_UPDATE"))
    return real_import(name, *args, **kwargs)
builtins.__import__ = spy
import giseg.data.augment as augment
assert "albumentations" not in sys.modules, "imported at module import"
augment.train_transform(64, seed=0)
print("SEEN", seen, "AFTER", os.environ.get("NO_ALBUMENTATIONS_UPDATE"))
"""


def test_albumentations_is_imported_with_its_update_check_off_and_the_environment_is_restored():
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    res = subprocess.run([sys.executable, "-c", SPY], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "SEEN ['1'] AFTER None" in res.stdout  # albumentations skips its check when this is "1"
