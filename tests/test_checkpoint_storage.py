"""Node-local checkpoint storage without a training run: who writes, which tag the nodes agree on, what is refused.

The pure parts (the tags complete on every node, the node layout, whether one
node's part of a checkpoint fits a run, export and the DeepSpeed JSON checks)
are plain unit tests. One 2-process run (gloo, each process a "node" of its
own through DeepSpeed's ``CROSS_RANK``) checks the collectives: per-node
sections, the shared-directory probe and the resume agreement over
directories a test prepared, including a save that completed on node 0 and
was interrupted on node 1. The training run itself, killed and resumed on two
nodes, is ``tests/test_two_nodes.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hmoe_ds.checkpoint import (
    CheckpointError,
    check_node_local_fit,
    common_complete_tags,
    missing_rank_files,
    rank_file,
    write_marker,
)
from hmoe_ds.collectives import NodeLayout
from hmoe_ds.errors import ExperimentError
from hmoe_ds.shards import shard_file

from .distributed import run_distributed

WORLD = 4


def _node_local(node: int, ranks: list[int], nodes: int = 2) -> dict[str, Any]:
    return {"mode": "node_local", "node": node, "nodes": nodes, "ranks": ranks}


def _node_part(tag_dir: Path, ranks: list[int], step: int, node: int | None = None, **meta: Any) -> Path:
    """A complete checkpoint directory holding the state files and shards of ``ranks`` (node-local when ``node``)."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    for rank in ranks:
        (tag_dir / rank_file(rank)).write_bytes(b"state %d" % rank)
        (tag_dir / shard_file(rank)).write_bytes(b"shard %d" % rank)
    storage = _node_local(node, ranks) if node is not None else {"mode": "shared"}
    write_marker(tag_dir, {"tag": tag_dir.name, "step": step, "world_size": WORLD, "shards": WORLD,
                           "storage": storage, **meta})
    return tag_dir


# --------------------------------------------------------------------------- pure


def test_the_common_tag_is_the_newest_complete_on_every_node() -> None:
    node0 = [("step_2", 2), ("step_4", 4), ("step_6", 6)]
    node1 = [("step_2", 2), ("step_4", 4)]  # step_6 interrupted on node 1
    assert common_complete_tags([node0, node1]) == ["step_4", "step_2"]
    assert common_complete_tags([node0, []]) == []
    assert common_complete_tags([node0]) == ["step_6", "step_4", "step_2"]
    # The same name holding different steps on two nodes is not one checkpoint.
    assert common_complete_tags([[("step_4", 4)], [("step_4", 5)]]) == []


def test_the_node_layout_groups_ranks_by_node_with_local_rank_0_first() -> None:
    # Ranks placed round-robin over two nodes (mpirun --map-by node): 0, 2 on node a; 1, 3 on node b.
    layout = NodeLayout.from_ranks([("a", 0), ("b", 0), ("a", 1), ("b", 1)], rank=3)
    assert layout.node_ranks == ((0, 2), (1, 3))
    assert (layout.nodes, layout.node, layout.is_leader) == (2, 1, False)
    assert NodeLayout.from_ranks([("a", 0), ("b", 0), ("a", 1), ("b", 1)], rank=1).is_leader
    with pytest.raises(ValueError, match=r"local ranks \[1, 2\], expected 0..1"):
        NodeLayout.from_ranks([("a", 1), ("a", 2)], rank=0)


def test_one_nodes_part_fits_only_the_same_ranks_of_a_node_local_run(tmp_path: Path) -> None:
    tag_dir = _node_part(tmp_path / "step_2", [2, 3], step=2, node=1)
    marker = json.loads((tag_dir / "hmoe_complete.json").read_text())
    assert missing_rank_files(tag_dir, WORLD) == [0, 1]

    assert check_node_local_fit(marker, tag_dir, _node_local(1, [2, 3]), []) == []
    (elastic,) = check_node_local_fit(marker, tag_dir, _node_local(1, [2, 3]), ["world size 4 -> 2"])
    assert "elastic resume (world size 4 -> 2)" in elastic and "copy the step_2/ directory of every node" in elastic
    (shared,) = check_node_local_fit(marker, tag_dir, {"mode": "shared"}, [])
    assert "this run reads one shared directory" in shared and "ranks [2, 3] of 4" in shared
    (moved,) = check_node_local_fit(marker, tag_dir, _node_local(0, [0, 1]), [])
    assert "this node is now node 0 with ranks [0, 1]" in moved

    # The nodes' directories copied into one: every rank's files are there, so it loads like a shared checkpoint.
    _node_part(tag_dir, [0, 1], step=2, node=0)
    assert missing_rank_files(tag_dir, WORLD) == []
    assert check_node_local_fit(marker, tag_dir, {"mode": "shared"}, ["world size 4 -> 2"]) == []
    shared_marker = {**marker, "storage": {"mode": "shared"}}
    assert check_node_local_fit(shared_marker, tmp_path / "elsewhere", {"mode": "shared"}, ["x"]) == []


def test_export_refuses_one_nodes_part_and_says_how_to_merge(tmp_path: Path) -> None:
    from hmoe_ds.export import resolve_source

    tag_dir = _node_part(tmp_path / "run" / "checkpoints" / "step_2", [0, 1], step=2, node=0, logical_config={})
    with pytest.raises(CheckpointError) as info:
        resolve_source(tag_dir)
    message = str(info.value)
    assert "use_node_local_storage" in message and "those of ranks [2, 3] are on the other nodes" in message
    assert "copy the step_2/ directory of every node into one directory" in message


def test_node_local_checkpoints_need_zero3_for_moe_models(tmp_path: Path) -> None:
    from hmoe_ds.training.experiment import effective_ds_config, load_experiment, node_local_checkpoints

    from .test_experiment import DS, tiny

    exp = load_experiment(tiny(tmp_path))
    node_local = {**DS, "checkpoint": {"use_node_local_storage": True}}
    with pytest.raises(ExperimentError, match="use_node_local_storage needs ZeRO stage 3 for an MoE model"):
        effective_ds_config({**node_local, "zero_optimization": {"stage": 2}}, "ds.json", exp, world_size=2)
    cfg, _ = effective_ds_config({**node_local, "zero_optimization": {"stage": 3}}, "ds.json", exp, world_size=2)
    assert node_local_checkpoints(cfg) and not node_local_checkpoints(DS)
    with pytest.raises(ExperimentError, match="use_node_local_storage='false': must be true or false"):
        node_local_checkpoints({"checkpoint": {"use_node_local_storage": "false"}}, "ds.json")


# --------------------------------------------------------------------------- collective


def _outcome(fn: Any) -> str:
    try:
        return f"ok {fn()!r}"
    except ExperimentError as exc:
        return f"{type(exc).__name__}: {exc}"


def _two_nodes(rank: int, world_size: int, root: str) -> list[str]:
    """Each process a node of its own (DeepSpeed's per-node launcher sets CROSS_RANK, the node index)."""
    import os

    from hmoe_ds.checkpoint import agree_on_checkpoint, check_storage_is_node_local, checkpoint_storage
    from hmoe_ds.collectives import on_node_leaders

    os.environ.update(CROSS_RANK=str(rank), LOCAL_RANK="0")
    storage = checkpoint_storage(node_local=True)
    mine, base = Path(root) / f"node{rank}", Path(root)

    def fail_on_node1() -> int:
        if rank == 1:
            raise ExperimentError("run.output_dir: no space")
        return rank

    return [
        f"{storage.layout.node_ranks} {storage.layout.node} {storage.writer} {storage.describe()['ranks']}",
        _outcome(lambda: on_node_leaders(lambda: rank * 10, storage.layout)),
        _outcome(lambda: on_node_leaders(fail_on_node1, storage.layout)),
        _outcome(lambda: check_storage_is_node_local(storage, mine / "out")),
        _outcome(lambda: check_storage_is_node_local(storage, base / "shared_out")),
        _outcome(lambda: agree_on_checkpoint(storage, mine / "interrupted", "auto")),
        _outcome(lambda: agree_on_checkpoint(storage, mine / "interrupted", "step_4")),
        _outcome(lambda: agree_on_checkpoint(storage, mine / "first_save_interrupted", "auto")),
        _outcome(lambda: agree_on_checkpoint(storage, mine / "lost_disk", "auto")),
        _outcome(lambda: sorted(p.name for p in (mine / "out").iterdir())),
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_agree_on_the_checkpoint_both_have_complete(tmp_path: Path) -> None:
    """2 processes, each its own node."""
    for node, ranks in ((0, [0, 1]), (1, [2, 3])):
        checkpoints = tmp_path / f"node{node}" / "interrupted"
        _node_part(checkpoints / "step_2", ranks, step=2, node=node)
        if node == 0:  # step_4: node 0 committed its marker, node 1 was lost before its own
            _node_part(checkpoints / "step_4", ranks, step=4, node=node)
        else:
            (checkpoints / "step_4").mkdir()
            (checkpoints / "step_4" / rank_file(2)).write_bytes(b"partial")
        first = tmp_path / f"node{node}" / "first_save_interrupted" / "step_2"
        (_node_part(first, ranks, step=2, node=node) if node == 0 else first.mkdir(parents=True))
        (tmp_path / f"node{node}" / "lost_disk").mkdir()
    _node_part(tmp_path / "node0" / "lost_disk" / "step_2", [0, 1], step=2, node=0)

    node0, node1 = run_distributed(_two_nodes, world_size=2, timeout=240, root=str(tmp_path))
    assert node0[0] == "((0,), (1,)) 0 True [0]" and node1[0] == "((0,), (1,)) 1 True [1]"
    assert node0[1] == node1[1] == "ok [0, 10]"
    assert node0[2] == "ExperimentError: node 1: run.output_dir: no space"
    assert node1[2] == "ExperimentError: run.output_dir: no space"
    assert node0[3] == node1[3] == "ok None"
    for result in (node0[4], node1[4]):
        assert result.startswith("CheckpointError: checkpoint.use_node_local_storage is true, but run.output_dir=")
        assert "is shared: node 0 sees the files of node(s) 1" in result
    # The newest tag complete on every node: step_2, and a note that step_4 is complete on node 0 only.
    tag, notes = eval(node0[5][3:])  # noqa: S307 - our own repr of (str, list[str])
    assert tag == "step_2" and notes == ["step_4 complete on node 0 but not on every node (a save interrupted on "
                                         "another node); not resumable"], node0[5]
    assert node1[5] == node0[5]
    assert node0[6].startswith("ExperimentError: node 1: ") and "step_4" in node0[6] and "hmoe_complete.json" in node0[6]
    assert node0[7] == node1[7] and "None" in node0[7] and "starting from scratch" in node0[7]
    for result in (node0[8], node1[8]):  # each names its own directory
        assert "node(s) 1 hold no checkpoint, while node 0 holds step_2" in result, result
    assert node0[9] == node1[9] == "ok []", "the probe files were not removed"
