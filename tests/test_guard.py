"""The non-finite guard, the run-directory lock and the stop watch, in one process (issue 11, defects 4-6).

The end-to-end versions, through the deepspeed launcher, are in ``tests/test_robustness.py``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hmoe_ds.training.experiment import ExperimentError
from hmoe_ds.training.guard import NonFiniteError, StepGuard, nonfinite_parameters
from hmoe_ds.training.rundir_lock import HOLDER_FILE, RunDirLock, RunDirLocked, holder_of
from hmoe_ds.training.signals import StopWatch


def test_stop_mode_names_the_step_and_the_last_good_checkpoint() -> None:
    guard = StepGuard("stop", "cpu", lambda: "/run/checkpoints/step_5")
    guard.observe_loss(torch.tensor(2.0))
    assert guard.end_step(6, 1.0, stop_requested=False) == (False, False)
    guard.observe_loss(torch.tensor(float("nan")))
    guard.observe_loss(torch.tensor(2.0))
    with pytest.raises(NonFiniteError, match=r"step 7: non-finite training loss\. .*without saving; the last good "
                                             r"checkpoint is /run/checkpoints/step_5"):
        guard.end_step(7, 1.0, stop_requested=False)
    guard.observe_loss(torch.tensor(2.0))
    with pytest.raises(NonFiniteError, match=r"step 8: non-finite gradient norm \(inf\)"):
        guard.end_step(8, math.inf, stop_requested=False)


def test_skip_mode_counts_and_checks_the_weights() -> None:
    guard = StepGuard("skip", "cpu", lambda: None)
    guard.observe_loss(torch.tensor(float("inf")))
    assert guard.end_step(3, None, stop_requested=True) == (True, True)
    assert guard.scalars() == {"train/skipped_nonfinite_steps": 1.0}
    model = torch.nn.Linear(3, 3)
    guard.check_parameters(model, 3, "why")
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert nonfinite_parameters(model) == ["weight"]
    with pytest.raises(NonFiniteError, match=r"step 3: the weights hold NaN/Inf \(on this rank: weight\); why\. "
                                             r"Nothing was saved; no checkpoint of this run exists yet"):
        guard.check_parameters(model, 3, "why")


def test_defect5_lock_is_exclusive_names_the_holder_and_is_released(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = RunDirLock(out)
    assert first.acquire("train A") is None
    assert json.loads((out / HOLDER_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(RunDirLocked, match=rf"in use by another run: pid {os.getpid()} on host .*train A"):
        RunDirLock(out).acquire("train B")
    assert holder_of(out)["command"] == "train A"
    first.release()
    assert holder_of(out) is None and not out.exists()  # created by the lock, never written: removed again


def test_a_killed_runs_lock_is_taken_over_with_a_note(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    script = (f"from hmoe_ds.training.rundir_lock import RunDirLock; RunDirLock({str(out)!r}).acquire('victim'); "
              "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == -signal.SIGKILL and (out / HOLDER_FILE).exists()  # it never released
    lock = RunDirLock(out)
    note = lock.acquire("successor")
    assert note is not None and "ended without releasing it" in note and "victim" in note
    lock.release()
    assert out.is_dir()  # not created by this lock: kept


def test_sigterm_becomes_a_stop_request() -> None:
    watch = StopWatch().start()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert watch.requested and watch.reason == "SIGTERM"
    finally:
        watch.close()
    assert signal.getsignal(signal.SIGTERM) is not watch._on_sigterm


def test_non_finite_error_is_an_experiment_error() -> None:
    assert issubclass(NonFiniteError, ExperimentError)  # printed once by rank 0, exit status 2, no traceback
