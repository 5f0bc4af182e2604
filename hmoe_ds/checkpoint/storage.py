"""Where checkpoint files live: one shared directory, or one per node (DeepSpeed's ``checkpoint.use_node_local_storage``).

*Shared* (the default): every rank writes its files into the same
``<output_dir>/checkpoints/step_<n>/``; rank 0 writes the files every
checkpoint has once (probe, experiment, tokenizer, completion marker,
``latest``) and decides what a resume loads.

*Node-local*: ``<output_dir>`` is on each node's own disk, seen by no other node.
Each rank still writes only its own files (DeepSpeed's ZeRO-3 files, its state
file and logical shard), but into its node's directory, and *each node's local
rank 0* does for its node what rank 0 does for a shared directory: it locks and
vets its output directory, moves stale checkpoints aside, writes the common
files and its node's completion marker (listing and checksumming the files of
that node only, and recording which ranks' files the node holds) and its
``latest``. A checkpoint is complete only when it is complete on every node.
Nodes cannot commit atomically together, so a node lost during a save can
leave the tag marked on some nodes and not on others; :func:`agree_on_checkpoint`
therefore resumes from the newest tag that is complete and verified on *every*
node, agreed by a collective, never one that a node lacks.

What node-local checkpoints cannot do is read one node's files on another:
elastic resume (another world size or layout) and export need every rank's
shard in one directory, and are refused with the fix (copy every node's
``step_<n>/`` into one shared directory; the file names do not collide) until
they have it (:func:`hmoe_ds.checkpoint.marker.check_node_local_fit`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from .. import collectives
from ..collectives import NodeLayout
from .layout import NODE_LOCAL, SHARED, CheckpointError  # the marker's storage modes
from .marker import node_local_fix, verify_checkpoint
from .rundir import checkpoint_dir_names, checkpoint_info, marked_checkpoints

__all__ = ["CheckpointStorage", "agree_on_checkpoint", "check_storage_is_node_local", "checkpoint_storage",
           "common_complete_tags"]

T = TypeVar("T")


@dataclass(frozen=True)
class CheckpointStorage:
    """The storage mode of this run's checkpoints and which rank writes each directory's common files."""

    node_local: bool
    layout: NodeLayout

    @property
    def writer(self) -> bool:
        """Whether this rank writes its directory's common files: rank 0 (shared), each node's local rank 0 (node-local)."""
        return self.layout.is_leader if self.node_local else self.layout.rank == 0

    def on_writers(self, fn: Callable[[], T]) -> list[T]:
        """Run ``fn`` where :attr:`writer` is true; every rank gets the results, one per directory. Collective."""
        if self.node_local:
            return collectives.on_node_leaders(fn, self.layout)
        return [collectives.on_rank0(fn)]

    def describe(self) -> dict[str, Any]:
        """What the completion marker records (``storage``): the mode and, node-local, this node and its ranks."""
        if not self.node_local:
            return {"mode": SHARED}
        return {"mode": NODE_LOCAL, "node": self.layout.node, "nodes": self.layout.nodes,
                "ranks": list(self.layout.node_ranks[self.layout.node])}


def checkpoint_storage(node_local: bool) -> CheckpointStorage:
    """This run's storage; node-local asks every rank where it runs (one all-gather). Collective when node-local."""
    if node_local:
        return CheckpointStorage(True, collectives.node_layout())
    rank = collectives.rank()
    return CheckpointStorage(False, NodeLayout((tuple(range(collectives.world_size())),), rank))


def check_storage_is_node_local(storage: CheckpointStorage, output_dir: Path) -> None:
    """Node-local storage: refuse an ``output_dir`` that two nodes share (each would overwrite the other's marker).

    Each node's local rank 0 writes a probe file named by this launch and its
    node, then looks for the other nodes' probes; a node that sees one is on a
    shared file system. Collective; a no-op for shared storage or one node.
    """
    if not storage.node_local or storage.layout.nodes == 1:
        return
    output_dir = Path(output_dir)
    launch = collectives.on_rank0(lambda: uuid.uuid4().hex)
    prefix = f".hmoe_node_probe.{launch}."

    def write() -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / f"{prefix}{storage.layout.node}").touch()

    def look() -> list[int]:
        return sorted(int(p.name[len(prefix):]) for p in output_dir.glob(f"{prefix}*")
                      if p.name[len(prefix):] != str(storage.layout.node))

    def remove() -> None:
        (output_dir / f"{prefix}{storage.layout.node}").unlink(missing_ok=True)

    storage.on_writers(write)  # every node has written before any looks (the section ends in an all-gather)
    seen = storage.on_writers(look)
    storage.on_writers(remove)
    shared = [(node, others) for node, others in enumerate(seen) if others]
    if shared:
        node, others = shared[0]
        raise CheckpointError(
            f"checkpoint.use_node_local_storage is true, but run.output_dir={output_dir} is shared: node {node} sees "
            f"the files of node(s) {', '.join(map(str, others))}. With node-local storage every node's local rank 0 "
            "writes its own completion marker and latest into its output directory, which must be on that node's "
            "own disk. Set use_node_local_storage to false (one shared directory, rank 0 writes those files) or "
            "point run.output_dir at a node-local path")


def common_complete_tags(per_node: Sequence[Sequence[tuple[str, int]]]) -> list[str]:
    """The tags marked complete on every node with the same step, newest first (pure: unit-tested)."""
    if not per_node:
        return []
    common = set(per_node[0])
    for node in per_node[1:]:
        common &= set(node)
    return [tag for tag, _ in sorted(common, key=lambda item: (item[1], item[0]), reverse=True)]


def _describe_tags(tags: Sequence[tuple[str, int]]) -> str:
    return ", ".join(tag for tag, _ in sorted(tags, key=lambda item: item[1])) or "none"


def agree_on_checkpoint(storage: CheckpointStorage, checkpoint_dir: Path,
                        resume: str | None) -> tuple[str | None, list[str]]:
    """Node-local storage: the checkpoint to resume from, complete and verified on every node; (tag, notes).

    ``resume``: ``"auto"`` takes the newest tag marked complete on every node
    (with the same step) whose files verify on every node; a tag that some
    node lacks (its save was interrupted there) is never taken. A tag name must
    verify on every node, or the error names the node. Nothing found anywhere
    is a fresh start (``None``); complete checkpoints on one node while another
    has no checkpoint directory at all is an error (a wrong or lost
    directory, not an interrupted save). Collective; call it on every rank.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not resume:
        return None, []
    if resume != "auto":
        storage.on_writers(lambda: checkpoint_info(checkpoint_dir, resume).tag)
        return resume, []

    def survey() -> tuple[list[tuple[str, int]], int]:
        marked = [(info.tag, info.step) for info in marked_checkpoints(checkpoint_dir)]
        return marked, len(checkpoint_dir_names(checkpoint_dir))

    surveyed = storage.on_writers(survey)
    marked = [tags for tags, _ in surveyed]
    notes: list[str] = []
    empty = [node for node, (_, dirs) in enumerate(surveyed) if dirs == 0]
    holding = [node for node, tags in enumerate(marked) if tags]
    if empty and holding:
        raise CheckpointError(
            f"{checkpoint_dir}: node(s) {', '.join(map(str, empty))} hold no checkpoint, while node "
            f"{holding[0]} holds {_describe_tags(marked[holding[0]])}: node-local checkpoints resume only on the "
            "nodes that saved them, in the same order (the node index given by the launcher), each with its own "
            "run.output_dir. Launch on those nodes, or " + node_local_fix())
    candidates = common_complete_tags(marked)
    newest_common = candidates[0] if candidates else None
    for node, tags in enumerate(marked):
        partial = sorted(tag for tag, step in tags if tag not in candidates and
                         (newest_common is None or step > dict(tags)[newest_common]))
        if partial:
            notes.append(f"{', '.join(partial)} complete on node {node} but not on every node (a save interrupted "
                         "on another node); not resumable")
    for tag in candidates:
        def verify(tag: str = tag) -> str | None:
            try:
                verify_checkpoint(checkpoint_dir / tag)
            except CheckpointError as exc:
                return str(exc)
            return None

        problems = [(node, problem) for node, problem in enumerate(storage.on_writers(verify)) if problem]
        if not problems:
            return tag, notes
        notes += [f"refusing {tag} (node {node}: {problem})" for node, problem in problems]
    if any(marked):
        notes.append("no checkpoint is complete on every node; starting from scratch")
    return None, notes
