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

With node-local checkpoint storage each *node* has rank-0 duties for its own
directory: :func:`node_layout` tells which ranks share a node, and
:func:`on_node_leaders` runs a section on every node's local rank 0 and gives
every rank the per-node results (or every rank the failure).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from .errors import ExperimentError

__all__ = [
    "NodeLayout",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "is_distributed",
    "launch_local_rank",
    "launch_rank",
    "launch_world_size",
    "node_layout",
    "on_node_leaders",
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


def launch_local_rank() -> int:
    """This process's rank on its node, as the launcher set it (DeepSpeed's, OpenMPI's or Intel MPI's variable)."""
    return _env_int(("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"), 0)


def _node_key() -> str:
    """What tells this process's node from the others: the host name, plus the launcher's node index when set.

    The node index (``CROSS_RANK`` from DeepSpeed's per-node launcher, ``SLURM_NODEID``) makes two launchers on one
    host two nodes, as they are to DeepSpeed, whose node-local writers are the processes with local rank 0.
    """
    index = next((os.environ[n] for n in ("CROSS_RANK", "SLURM_NODEID") if os.environ.get(n)), "")
    return f"{socket.gethostname()}#{index}"


@dataclass(frozen=True)
class NodeLayout:
    """Which global ranks share a node: ``node_ranks[n]`` are node ``n``'s ranks, its local rank 0 first.

    Nodes are numbered by their lowest global rank, so node 0 holds rank 0.
    """

    node_ranks: tuple[tuple[int, ...], ...]
    rank: int

    @property
    def nodes(self) -> int:
        return len(self.node_ranks)

    @property
    def node(self) -> int:
        """The node this rank runs on."""
        return next(n for n, ranks in enumerate(self.node_ranks) if self.rank in ranks)

    @property
    def is_leader(self) -> bool:
        """Whether this rank is its node's local rank 0."""
        return self.node_ranks[self.node][0] == self.rank

    @classmethod
    def from_ranks(cls, ranks: list[tuple[str, int]], rank: int) -> "NodeLayout":
        """The layout from every global rank's ``(node key, local rank)``; a :class:`ValueError` if inconsistent.

        Every node's local ranks must be 0..k-1, each once: a node without a local
        rank 0 would have no writer for its directory.
        """
        by_node: dict[str, list[tuple[int, int]]] = {}
        for global_rank, (key, local) in enumerate(ranks):
            by_node.setdefault(key, []).append((local, global_rank))
        groups = []
        for key, members in by_node.items():
            locals_ = sorted(local for local, _ in members)
            if locals_ != list(range(len(members))):
                raise ValueError(f"node {key!r}: its processes have local ranks {locals_}, expected "
                                 f"0..{len(members) - 1}; the launcher's LOCAL_RANK values do not describe the nodes")
            groups.append(tuple(global_rank for _, global_rank in sorted(members)))
        return cls(tuple(sorted(groups, key=min)), rank)


def node_layout() -> NodeLayout:
    """Which ranks share a node (one all-gather; one node without a process group). Collective."""
    import torch.distributed as dist

    if not is_distributed():
        return NodeLayout(((0,),), 0)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (_node_key(), launch_local_rank()))
    try:
        return NodeLayout.from_ranks(gathered, dist.get_rank())
    except ValueError as exc:
        raise ExperimentError(str(exc)) from None


def on_node_leaders(fn: Callable[[], T], layout: NodeLayout) -> list[T]:
    """Run ``fn`` on every node's local rank 0; every rank gets the results, by node (``[fn()]`` without a group).

    Failures travel as in :func:`on_rank0`: an :class:`~hmoe_ds.errors.ExperimentError`
    on any node is raised on every rank with its message (prefixed with the
    node when there are several); any other exception is re-raised on the rank
    that met it with its traceback, and the other ranks stop with a
    ``RuntimeError`` naming it. Collective: every rank must call it.
    """
    import torch.distributed as dist

    if not is_distributed():
        return [fn()]
    outcome: tuple[str, Any] | None = None
    failure: BaseException | None = None
    if layout.is_leader:
        try:
            outcome = ("ok", fn())
        except ExperimentError as exc:
            failure, outcome = exc, ("error", str(exc))
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks are told
            failure, outcome = exc, ("crash", f"{type(exc).__name__}: {exc}")
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, outcome)
    if failure is not None:
        raise failure
    results = []
    for node, ranks in enumerate(layout.node_ranks):
        status, value = gathered[ranks[0]]
        where = f"node {node}: " if layout.nodes > 1 else ""
        if status == "error":
            raise ExperimentError(f"{where}{value}")
        if status == "crash":
            raise RuntimeError(f"rank {ranks[0]} ({where}local rank 0) failed ({value}); see its traceback")
        results.append(value)
    return results


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
