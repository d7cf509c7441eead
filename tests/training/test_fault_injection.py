"""SIGKILL at the trainer's commit points, then a plain `--resume_from_checkpoint latest`: the run must end as an
uninterrupted one. Three chosen points run here (a half-deleted checkpoint is tested without strace in
test_reliability.py::test_latest_skips_an_incomplete_checkpoint_and_the_epoch_is_evaluated_once); every point (about 80, ~25 min) with
FAULT_INJECTION=all python -m pytest tests/training/test_fault_injection.py   (or python tests/training/fault_injection.py)."""
import os
import re
import shutil

import pytest


import fault_injection as fi  # noqa: E402

# (syscall call as strace prints it, which occurrence): the states the issue found unrecoverable
CHOSEN = {
    "the cache build, before its folder lands": (r'rename\(".*cache/\.[^/]*\.tmp", ', 1),
    "epoch 1's end: the step save of the same number is being replaced (--save_total_limit 1)":
        (r'rename\(".*/checkpoints/step_00000006", ".*/\.step_00000006\.old"\)', 1),
    "epoch 2: best/ has been moved aside, its successor not yet in place": (r'rename\(".*/\.best\.[^/]*\.tmp", ".*/best"\)', 2),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    if shutil.which("strace") is None:
        pytest.fail("strace is needed (apt-get install strace; .ci/run installs it)")
    work = tmp_path_factory.mktemp("faults")
    data, model = fi.prepare(work)
    points, want = fi.list_points(work, data, model)
    return work, data, model, points, want


def _pick(points, pattern, occurrence):
    found = [p for p in points if re.search(pattern, p.what)]
    assert len(found) >= occurrence, f"no point matches {pattern}: the run's saves changed; update CHOSEN"
    return found[occurrence - 1]


@pytest.mark.parametrize("what", list(CHOSEN))
def test_a_kill_at_a_commit_point_resumes_to_the_uninterrupted_result(reference, what):
    work, data, model, points, want = reference
    point = _pick(points, *CHOSEN[what])
    outcome = fi.try_point(point, work, data, model, want)
    assert outcome.killed, f"{point} was not reached"
    assert outcome.ok, f"{what}: {outcome.detail}"


@pytest.mark.skipif(os.environ.get("FAULT_INJECTION") != "all", reason="every point: FAULT_INJECTION=all (~25 min)")
def test_every_commit_point(reference):
    work, data, model, points, want = reference
    failed = [o for o in (fi.try_point(p, work, data, model, want) for p in points) if not (o.ok and o.killed)]
    assert not failed, failed
