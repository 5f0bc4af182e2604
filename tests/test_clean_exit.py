"""Launched runs end cleanly and leave /dev/shm as they found it, through ``deepspeed ... run/train.py`` on 2 ranks.

DeepSpeed's CPU all-reduce gives each rank a /dev/shm segment named after the
run's MASTER_PORT (``hmoe_ds.distributed_env``); the entry points unlink the
names once every rank has mapped them. Here: while a run trains, its ranks map
the segments and the names are already gone; a rank SIGKILLed mid-run leaves
nothing; a finished ZeRO-3 run exits 0 on every rank without an abort at exit.
Both runs are the session's (``tests/conftest.py``), shared with the checkpoint
tests. ``tests/conftest.py`` checks /dev/shm after every multi-rank test as well.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hmoe_ds.distributed_env import SHM_DIR, SHM_PREFIX

from .checkpoint_runs import Run
from .conftest import MappedSegments, shm_names_of_ports
from .launcher import DS_CONFIG, EXPERIMENT, output

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _requires_shm() -> None:
    if not SHM_DIR.is_dir() or not Path("/proc/self/maps").is_file():
        pytest.skip("needs Linux /dev/shm and /proc")


def test_sigkilled_rank_leaves_no_shared_memory(zero2_sigkilled_run: tuple[Run, MappedSegments]) -> None:
    """Rank 1 SIGKILLs itself in step 5: the run fails, yet no segment of its port is left in /dev/shm.

    The run is the session's (``tests/conftest.py``), which ``tests/test_checkpoint.py`` resumes.
    """
    _requires_shm()
    run, watch = zero2_sigkilled_run
    proc, port = run.proc, str(run.port)
    assert proc.returncode != 0, output(proc)
    assert "SIGKILL during step 5" in proc.stdout + proc.stderr, output(proc)
    # The segments existed and were mapped by the live ranks (so the check below is not vacuous) ...
    assert sorted(watch.mapped) == sorted(f"{SHM_PREFIX}_{os.getuid()}_127.0.0.1_{port}_{r}" for r in (0, 1)), \
        watch.mapped
    # ... their names were unlinked while the run was still going ...
    assert all(watch.mapped.values()), f"segments mapped but never seen unlinked while running: {watch.mapped}"
    # ... and nothing of this run remains after the kill.
    assert shm_names_of_ports({port}) == []


def test_finished_zero3_run_exits_zero_on_every_rank(zero3_ep2_run: Run) -> None:
    """A finished 2-rank ZeRO-3 run: launcher exit 0 (every rank 0), no abort at exit, nothing in /dev/shm.

    The run is the session's ZeRO-3 EP 2 reference (``tests/checkpoint_runs.py``).
    """
    _requires_shm()
    proc = zero3_ep2_run.proc
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, output(proc)
    assert "done: " in proc.stdout, output(proc)  # rank 0's summary: the run really finished
    # DeepSpeed's launcher names any rank that exits non-zero; a teardown abort prints "terminate called".
    for sign in ("terminate called", "exits with return code", "Fatal Python error", "final barrier failed"):
        assert sign not in text, output(proc)
    assert shm_names_of_ports({str(zero3_ep2_run.port)}) == []


def test_a_lone_process_starts_no_mpi_and_leaves_no_openmpi_segment(tmp_path: Path) -> None:
    """No launcher at all (as ``python run/eval.py``): a one-rank world without MPI discovery.

    Through DeepSpeed's MPI discovery, OpenMPI left a 16 MiB ``/dev/shm/sm_segment.*``
    behind at every exit of such a process, clean exit included.
    """
    import subprocess
    import sys

    from .conftest import mpi_segment_users
    from .launcher import REPO

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    before = set(mpi_segment_users())
    code = ("import sys, torch.distributed as dist\n"
            "from hmoe_ds.distributed_env import exit_process, init_distributed, shutdown_distributed\n"
            "init_distributed()\n"
            "assert dist.get_world_size() == 1 and 'mpi4py' not in sys.modules, sorted(sys.modules)\n"
            "shutdown_distributed(True)\n"
            "exit_process(0)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(mpi_segment_users()) <= before


def test_exit_process_keeps_what_a_normal_exit_does(tmp_path: Path) -> None:
    """``exit_process`` skips interpreter teardown, not the exit's work: non-daemon threads finish, ``atexit``
    handlers run, buffered stdout is written, and the code is the one given."""
    import subprocess
    import sys

    code = ("import atexit, pathlib, sys, threading, time\n"
            "from hmoe_ds.distributed_env import exit_process\n"
            f"out = pathlib.Path({str(tmp_path)!r})\n"
            "def late():\n"
            "    time.sleep(0.5)\n"
            "    (out / 'thread').write_text('done')\n"
            "threading.Thread(target=late).start()\n"
            "atexit.register(lambda: (out / 'atexit').write_text('ran'))\n"
            "sys.stdout.write('buffered, no newline')\n"
            "exit_process(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout == "buffered, no newline"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank0_reports_a_plan_error_and_the_others_wait_for_it(
        rank: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad batch size is every rank's error; rank 0 prints it at once, the others print nothing and wait
    (``leave_the_report_to_rank0``) so the launcher cannot kill rank 0 before its line is written."""
    import importlib.util
    import time

    from hmoe_ds import distributed_env
    from hmoe_ds.training.trainer import run_training

    from .launcher import REPO, write_configs

    monkeypatch.setattr(distributed_env, "REPORT_GRACE_S", 0.5)
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    exp_file, ds_file = write_configs(tmp_path, EXPERIMENT, {**DS_CONFIG, "train_batch_size": 100})
    spec = importlib.util.spec_from_file_location("train_entry", REPO / "run" / "train.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    args = entry.build_parser().parse_args(["--config", str(exp_file), "--deepspeed_config", str(ds_file),
                                            "--set", f"run.output_dir={tmp_path / 'out'}"])
    start = time.monotonic()
    assert run_training(args) == 2
    took = time.monotonic() - start
    err = capsys.readouterr().err
    if rank == 0:
        assert "train_batch_size=100 != train_micro_batch_size_per_gpu (4)" in err
    else:
        assert err == "" and took >= 0.5


def test_a_leaked_openmpi_segment_is_found_and_one_being_created_is_not() -> None:
    """The /dev/shm checks of ``tests/conftest.py`` with two pytest-xdist workers: a segment nobody maps is a
    leak; one whose creator maps it within the 0.5 s re-check is another worker's run starting, left alone."""
    import mmap
    import threading
    import time
    import uuid

    from .conftest import abandoned_mpi_segments, mpi_segment_users

    before = set(mpi_segment_users())
    leaked = Path(f"/dev/shm/sm_segment.test-{uuid.uuid4().hex}.0.1.0")
    starting = Path(f"/dev/shm/sm_segment.test-{uuid.uuid4().hex}.0.2.0")
    mapped: list[mmap.mmap] = []

    def create_then_map() -> None:
        starting.write_bytes(b"\0" * 4096)
        time.sleep(0.2)  # the creator maps it a moment after the file appears
        with open(starting, "r+b") as f:
            mapped.append(mmap.mmap(f.fileno(), 4096))

    try:
        leaked.write_bytes(b"\0" * 4096)
        creator = threading.Thread(target=create_then_map)
        creator.start()
        time.sleep(0.05)
        found = abandoned_mpi_segments(before)
        creator.join()
        assert leaked.name in found and starting.name not in found, found
    finally:
        for segment in mapped:
            segment.close()
        leaked.unlink(missing_ok=True)
        starting.unlink(missing_ok=True)
