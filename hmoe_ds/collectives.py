"""The process group as the rest of the package sees it: is one up, my rank, the world size, and rank-0 sections.

Every "is ``torch.distributed`` initialised / what is my rank" question is asked
here, so the answer when no process group exists (a single process, a unit
test, ``run/eval.py`` without the launcher) is the same everywhere: rank 0 of a
world of 1, collectives are no-ops.

Before the group exists (planning a run: batch sizes, ``ep_size``) the rank and
world size come from the launcher's environment: :func:`launch_rank` and
:func:`launch_world_size`.

Training and checkpointing have steps that only rank 0 performs (checking the
output directory, writing the probe, tokenizer and the completion marker)
while the other ranks wait. If rank 0 fails there and the others wait in a
plain barrier, they hang until the collective timeout. :func:`on_rank0`
broadcasts the outcome instead, so every rank stops at once with an error;
:func:`rank0_first` builds on it for work that rank 0 must do first (a data
cache the others then reuse).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from .errors import ExperimentError

__all__ = [
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "is_distributed",
    "launch_rank",
    "launch_world_size",
    "on_rank0",
    "rank",
    "rank0_first",
    "release_gathered_parameters",
    "world_size",
]

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a default process group is up (``torch.distributed`` available and initialised)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group; 0 without one."""
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Processes in the default group; 1 without one."""
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for every rank of the default group; a no-op without one."""
    import torch.distributed as dist

    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over every rank of the default group, in place; returns it (unchanged without a group)."""
    import torch.distributed as dist

    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``values`` over every rank, in place; returns it (unchanged without a group)."""
    import torch.distributed as dist

    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


# Under mpirun (``deepspeed --launcher openmpi``, or plain ``mpirun``) RANK/WORLD_SIZE exist only after
# deepspeed.init_distributed's MPI discovery, but a run is planned (batch sizes, ep_size) before it:
# fall back to the MPI launcher's own variables (OpenMPI, then MPICH/Intel MPI's PMI).
def _env_int(names: tuple[str, ...], default: int) -> int:
    return next((int(os.environ[n]) for n in names if os.environ.get(n)), default)


def launch_rank() -> int:
    """The rank the launcher gave this process (environment); usable before any process group exists."""
    return _env_int(("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"), 0)


def launch_world_size() -> int:
    """The number of processes the launcher started (environment); usable before any process group exists."""
    return _env_int(("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"), 1)


def on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and give every rank its result (a plain call when not distributed).

    An :class:`~hmoe_ds.errors.ExperimentError` (a user mistake, e.g. a bad
    checkpoint) is raised on every rank with its message. Any other exception
    (a bug, a full disk) is re-raised on rank 0 with its traceback, and the
    other ranks stop with a ``RuntimeError`` naming it. Collective: every rank
    must call it.
    """
    import torch.distributed as dist

    if not is_distributed():
        return fn()
    payload: list[Any] = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            payload = [("ok", fn())]
        except ExperimentError as exc:
            failure, payload = exc, [("error", str(exc))]
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks are told
            failure, payload = exc, [("crash", f"{type(exc).__name__}: {exc}")]
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if failure is not None:
        raise failure
    if status == "error":
        raise ExperimentError(value)
    if status == "crash":
        raise RuntimeError(f"rank 0 failed ({value}); see its traceback")
    return value


def rank0_first(fn: Callable[[], T]) -> T:
    """Rank 0 runs ``fn`` first (e.g. builds a data cache), then the other ranks run it (reusing what it built).

    Every rank gets its own result (nothing is broadcast: a dataset is not worth
    sending). A failure on rank 0 stops every rank with its message
    (:func:`on_rank0`), not rank 1 with a dropped connection. Collective: every
    rank must call it; a plain call when not distributed.
    """
    if not is_distributed():
        return fn()
    if rank() == 0:
        held: dict[str, T] = {}

        def first() -> None:  # the result stays here, the failure travels
            held["result"] = fn()

        on_rank0(first)
        return held["result"]
    on_rank0(lambda: None)
    return fn()


def release_gathered_parameters(engine: Any) -> None:
    """Under ZeRO-3, free the full parameters that forwards outside training left gathered on this rank.

    Measured with ``bench_memory`` (214M parameters, 2 ranks): after an
    evaluation every rank kept the whole fp32 model resident (~850 MiB, the
    same at any rank count) until the next checkpoint save, whose DeepSpeed
    code releases them. ``engine.empty_partition_cache()`` is DeepSpeed's call
    for that; it is a no-op for ZeRO 0-2 and for a plain module.
    """
    release = getattr(engine, "empty_partition_cache", None)
    if not callable(release):
        return
    release()
    # That partitions every parameter, the persistent ones too (those below
    # stage3_param_persistence_threshold, which ZeRO-3 keeps gathered on every rank). DeepSpeed
    # gathers them again after its own checkpoint save and after every optimizer step, but not
    # here; a training step that then starts with them partitioned breaks ZeRO-3's prefetch trace
    # ("tracing error ... expected the next 1 parameters in the parameter fetch queue", seen in
    # the first step after a save in a resumed run). So gather them again, as DeepSpeed does.
    persistent = getattr(getattr(engine, "optimizer", None), "persistent_parameters", None)
    if persistent:
        persistent[0].all_gather(persistent)
