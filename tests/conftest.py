"""Shared test set-up: CPU DeepSpeed accelerator, offline hubs, deterministic seeds."""

from __future__ import annotations

import os

# Must be set before deepspeed is imported anywhere in the test session.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- pytest-xdist: one worker per shared run

#: Session fixtures that launch training runs: every test using one of them runs on one pytest-xdist worker.
SESSION_RUNS = frozenset({"zero2_ep2_run", "zero3_ep2_run", "zero2_export", "zero2_sigkilled_run"})


def xdist_group(item: pytest.Item) -> str | None:
    """The group of tests that must share ``item``'s pytest-xdist worker, or None if it may run on any.

    A session or module fixture is set up once per worker, so the tests of one launched run must share a
    worker, or the run is launched on each: the users of :data:`SESSION_RUNS` form one group, and the users of
    a test module's own module- or session-scoped fixture (``trained``, ``base_run``, ...) one per module.
    """
    names = set(getattr(item, "fixturenames", ()))
    if names & SESSION_RUNS:
        return "session_runs"
    info = getattr(item, "_fixtureinfo", None)
    for name in sorted(names):
        for fixturedef in (info.name2fixturedefs.get(name, ()) if info is not None else ()):
            if fixturedef.scope in ("module", "session") and fixturedef.func.__module__ == item.module.__name__:
                return item.module.__name__
    return None


def longest_units_first(items: list[pytest.Item], groups: list[str | None]) -> list[pytest.Item]:
    """``items`` reordered so that pytest-xdist hands out the longest work units first.

    A unit is a group (all its tests go to one worker) or a lone test. Its cost is estimated by its number of
    ``slow`` tests, then its number of tests: on 2 workers the long launched runs then overlap each other, and
    the run ends on many short units that keep both workers busy, not on one long run with the other worker
    idle. The order inside a unit, and between units of equal cost, is the collection order.
    """
    units: dict[str, list[pytest.Item]] = {}
    for item, group in zip(items, groups):
        units.setdefault(group if group is not None else item.nodeid, []).append(item)

    def cost(unit: list[pytest.Item]) -> tuple[int, int]:
        return sum(item.get_closest_marker("slow") is not None for item in unit), len(unit)

    return [item for unit in sorted(units.values(), key=cost, reverse=True) for item in unit]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the markers to group the tests
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    groups = [xdist_group(item) for item in items]
    for item, group in zip(items, groups):
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    # Only in pytest-xdist's workers (they collect; the controller schedules in their order, given
    # --no-loadscope-reorder): a plain run keeps pytest's order, which sets up each module fixture once.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items[:] = longest_units_first(items, groups)


# --------------------------------------------------------------------------- trained runs shared by test modules


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory):
    """One data cache (corpus slice, BPE tokenizer, packed dataset) for every launched run of the session."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def zero2_ep2_run(tmp_path_factory: pytest.TempPathFactory, data_cache):
    """Uninterrupted reference: 2 ranks, ZeRO-2 + CPU offload, EP=2 balanced; checkpoints at steps 3 and 6."""
    from .checkpoint_runs import reference_run

    return reference_run(tmp_path_factory.mktemp("zero2_ep2"), "zero2_offload", data_cache)


@pytest.fixture(scope="session")
def zero3_ep2_run(tmp_path_factory: pytest.TempPathFactory, data_cache):
    """Uninterrupted reference: 2 ranks, ZeRO-3 (AutoEP front-end), EP=2 balanced; checkpoints at steps 3 and 6."""
    from .checkpoint_runs import reference_run

    return reference_run(tmp_path_factory.mktemp("zero3_ep2"), "zero3", data_cache)


@pytest.fixture(scope="session")
def zero2_sigkilled_run(zero2_ep2_run, tmp_path_factory: pytest.TempPathFactory):
    """The ZeRO-2 EP 2 reference experiment again, rank 1 SIGKILLed inside step 5 (after the step-3 save).

    Returns ``(run, segments)``: :class:`MappedSegments` saw the run's /dev/shm segments while it ran.
    ``tests/test_checkpoint.py`` resumes the run in place and compares it with the reference;
    ``tests/test_clean_exit.py`` checks that the kill left no segment behind.
    """
    from .checkpoint_runs import launch

    segments = MappedSegments()
    run = launch(tmp_path_factory.mktemp("zero2_sigkilled"), "zero2_offload", zero2_ep2_run.cache,
                 env={"HMOE_DS_TEST_KILL_DURING_STEP": "5", "HMOE_DS_TEST_KILL_RANK": "1"}, watch=segments)
    return run, segments


@pytest.fixture(scope="session")
def zero2_export(zero2_ep2_run, tmp_path_factory: pytest.TempPathFactory):
    """``run/export.py`` of the ZeRO-2 EP 2 reference run's latest checkpoint; read-only for tests (copy to change)."""
    import sys

    from .launcher import environment, output, run

    target = tmp_path_factory.mktemp("export") / "hf"
    proc = run([sys.executable, "run/export.py", str(zero2_ep2_run.out), str(target)],
               environment(zero2_ep2_run.cache))
    assert proc.returncode == 0, output(proc)
    assert "logits match the training engine" in proc.stdout
    return target


# --------------------------------------------------------------------------- /dev/shm hygiene of multi-rank tests


def shm_names_of_ports(ports: set[str]) -> list[str]:
    """Names in /dev/shm of DeepSpeed's CPU all-reduce segments whose job used one of ``ports`` (MASTER_PORT).

    The names end ``_<MASTER_PORT>_<rank>`` (``hmoe_ds.distributed_env.shm_segment_names``); other
    people's concurrent runs use other ports, so only this session's runs are ever matched.
    """
    from hmoe_ds.distributed_env import SHM_DIR, SHM_PREFIX

    if not SHM_DIR.is_dir():
        return []
    return sorted(p.name for p in SHM_DIR.glob(f"{SHM_PREFIX}_*") if p.name.rsplit("_", 2)[-2] in ports)


class MappedSegments:
    """``watch`` for :func:`tests.launcher.train`: the latest run's shm segments that its processes map, each
    with whether a process's mapping already showed it unlinked (``(deleted)`` in ``/proc/<pid>/maps``)."""

    def __init__(self) -> None:
        self.mapped: dict[str, bool] = {}

    def __call__(self, pgid: int) -> None:
        from pathlib import Path

        from hmoe_ds.distributed_env import SHM_PREFIX

        from .distributed import PORTS

        port = str(PORTS[-1])
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.getpgid(int(pid)) != pgid:  # only this run's runner and ranks
                    continue
                maps = Path(f"/proc/{pid}/maps").read_text()
            except OSError:  # the process ended meanwhile (ProcessLookupError is an OSError)
                continue
            for line in maps.splitlines():
                if f"/dev/shm/{SHM_PREFIX}_" not in line:
                    continue
                entry = line.split("/dev/shm/", 1)[1]
                name = entry.removesuffix(" (deleted)")
                if name.rsplit("_", 2)[-2] == port:
                    self.mapped[name] = self.mapped.get(name, False) or entry.endswith(" (deleted)")


#: OpenMPI's shared-memory files (``sm_segment.<host>.<uid>.<job>.<rank>``): a process that initialises MPI
#: without mpirun (DeepSpeed's MPI discovery in a lone process) leaves one behind at exit.
MPI_SEGMENT_GLOB = "sm_segment.*"


def mpi_segment_users() -> dict[str, set[int]]:
    """OpenMPI segment names in /dev/shm -> the pids that have them mapped (Linux ``/proc/<pid>/maps``)."""
    from pathlib import Path

    shm = Path("/dev/shm")
    names = {p.name: set() for p in shm.glob(MPI_SEGMENT_GLOB)} if shm.is_dir() else {}
    if not names:
        return names
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        for name in names:
            if f"/dev/shm/{name}" in text:
                names[name].add(int(maps.parent.name))
    return names


def abandoned_mpi_segments(before: set[str], owners: frozenset[int] = frozenset()) -> list[str]:
    """OpenMPI segments made since ``before`` that no process other than ``owners`` maps, twice 0.5 s apart.

    With two pytest-xdist workers, another worker's MPI run may be creating its segment at this moment: the
    file exists a moment before its creator maps it. A leaked segment stays unmapped; a new one does not.
    """
    import time

    def unmapped() -> set[str]:
        return {name for name, users in mpi_segment_users().items() if name not in before and users <= owners}

    first = unmapped()
    if not first:
        return []
    time.sleep(0.5)
    return sorted(first & unmapped())


@pytest.fixture(scope="session", autouse=True)
def _mpi_segments_of_the_session():
    """Remove the OpenMPI segments this session's processes made and no other process uses, at its end.

    hmoe-ds's own entry points start no MPI in a lone process
    (``hmoe_ds.distributed_env.init_distributed``); tests that call
    ``deepspeed.initialize`` in the pytest process itself still go through
    DeepSpeed's MPI discovery, and that segment stays mapped by pytest until it
    exits. Unlinking it is safe (the mapping stays valid), so the suite leaves
    /dev/shm as it found it.
    """
    before = set(mpi_segment_users())
    yield
    from pathlib import Path

    for name in abandoned_mpi_segments(before, owners=frozenset({os.getpid()})):
        (Path("/dev/shm") / name).unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _no_shm_segments_left(request: pytest.FixtureRequest):
    """Multi-rank tests (marked ``distributed``) must leave /dev/shm as they found it.

    Checked after each such test, for every port this session's launched runs used
    so far (a module-scoped fixture's run is set up before this fixture, so its
    leftovers are caught after the first test using it). Leftovers fail the test
    and are removed, so they are reported once and never pile up.
    """
    mpi_before = set(mpi_segment_users()) if request.node.get_closest_marker("distributed") else set()
    yield
    if request.node.get_closest_marker("distributed") is None:
        return
    from .distributed import PORTS

    left = shm_names_of_ports({str(p) for p in PORTS})
    # OpenMPI segments that appeared during the test and that no process maps any more: a launched process leaked
    mpi_left = abandoned_mpi_segments(mpi_before)
    if not left and not mpi_left:
        return
    from hmoe_ds.distributed_env import SHM_DIR

    for name in left + mpi_left:
        (SHM_DIR / name).unlink(missing_ok=True)
    pytest.fail(f"{len(left) + len(mpi_left)} shared-memory segment(s) of this test's runs left in {SHM_DIR}: "
                f"{left + mpi_left}")
