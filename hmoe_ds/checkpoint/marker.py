"""The completion marker: written last, it makes a checkpoint complete; verifying it and fitting it to a run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..naming import STRUCTURE_FIELDS, expected_moe_layer_records
from ..shards import shard_file
from .atomic_io import atomic_write_text, fsync_dir, fsync_file
from .layout import FORMAT, FORMAT_VERSION, MARKER, NODE_LOCAL, SHARED, CheckpointError, rank_file

def _file_names(tag_dir: Path) -> list[str]:
    """Every file of the checkpoint (listed now, so whatever files a save writes are covered), marker excluded."""
    return [path.relative_to(tag_dir).as_posix() for path in sorted(tag_dir.rglob("*"))
            if path.is_file() and path.name != MARKER and not path.name.startswith(".")]


def write_marker(tag_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Rank 0, after every rank finished writing: make the files durable, checksum them, then commit the marker.

    ``files`` maps every file to its size and content digest (:mod:`hmoe_ds.integrity`),
    so resume detects bytes changed in place, not only lost or truncated files.
    """
    from ..integrity import describe_files

    tag_dir = Path(tag_dir)
    names = _file_names(tag_dir)
    # SIGKILL loses nothing the kernel has; fsync is for a node that loses power right after "complete".
    for name in names:
        fsync_file(tag_dir / name)
    fsync_dir(tag_dir)
    started = time.perf_counter()
    files = describe_files(tag_dir, names)
    marker = {"format": FORMAT, "version": FORMAT_VERSION, **meta, "files": files,
              "checksum_seconds": round(time.perf_counter() - started, 4),  # its cost, next to the save's
              "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(tag_dir / MARKER, json.dumps(marker, indent=1) + "\n")
    return marker


def read_marker(tag_dir: Path) -> dict[str, Any]:
    """The marker of a complete checkpoint, or a :class:`CheckpointError` saying why there is none."""
    tag_dir = Path(tag_dir)
    path = tag_dir / MARKER
    if not path.is_file():
        if any(tag_dir.glob("*_model_states.pt")):
            raise CheckpointError(f"{tag_dir}: no {MARKER}: the save was interrupted before it completed, or "
                                  "the checkpoint was not written by hmoe-ds")
        raise CheckpointError(f"{tag_dir}: not an hmoe-ds checkpoint (no {MARKER})")
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable completion marker ({exc})") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an hmoe-ds completion marker")
    if int(marker.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {marker.get('version')} is newer than this hmoe-ds "
                              f"understands ({FORMAT_VERSION}); upgrade hmoe-ds")
    return marker


def verify_checkpoint(tag_dir: Path, notes: list[str] | None = None) -> dict[str, Any]:
    """Marker present and every file it lists present with its recorded size and content; returns the marker.

    A damaged file is named in the :class:`CheckpointError`. Markers written before
    content checksums existed list sizes only; their files are checked by size and
    a note saying so is appended to ``notes`` (when given).
    """
    from ..integrity import verify_files

    tag_dir = Path(tag_dir)
    marker = read_marker(tag_dir)
    problems, found_notes = verify_files(tag_dir, marker.get("files", {}))
    if notes is not None:
        notes.extend(found_notes)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{tag_dir}: marked complete but damaged: {shown}. Restore the files, or resume "
                              "from an older checkpoint")
    return marker


def node_local_fix(step_dir_name: str = "step_<n>") -> str:
    """The one remedy for everything node-local checkpoints cannot do, worded once."""
    return (f"copy the {step_dir_name}/ directory of every node into one directory on a shared path (the files of "
            "different nodes have different names), then use that directory (for a run: set run.output_dir to a "
            "shared path holding checkpoints/ and checkpoint.use_node_local_storage to false)")


def missing_rank_files(tag_dir: Path, world_size: int) -> list[int]:
    """The ranks (of a checkpoint saved by ``world_size`` ranks) whose state file or logical shard is not in ``tag_dir``."""
    tag_dir = Path(tag_dir)
    return [rank for rank in range(world_size)
            if not (tag_dir / rank_file(rank)).is_file() or not (tag_dir / shard_file(rank)).is_file()]


def check_node_local_fit(marker: Mapping[str, Any], tag_dir: Path, storage: Mapping[str, Any] | None,
                         elastic_changes: Sequence[str]) -> list[str]:
    """Why a checkpoint saved with node-local storage cannot be loaded by this run here (empty: it can).

    A directory holding every rank's files (the nodes' directories copied into
    one) loads like a shared one. Otherwise it is one node's part: it loads only
    into the same ranks of a node-local run with the same layout, so elastic
    resume, a shared-storage run or a changed node layout are refused.
    """
    saved = marker.get("storage") or {"mode": SHARED}
    if saved.get("mode") != NODE_LOCAL:
        return []
    world = int(marker.get("world_size", 0))
    missing = missing_rank_files(tag_dir, world)
    if not missing:
        return []
    held = f"node {saved.get('node')} of {saved.get('nodes')}, the files of ranks {saved.get('ranks')} of {world}"
    if elastic_changes:
        return [f"elastic resume ({'; '.join(elastic_changes)}) reads every rank's logical shard, but this "
                f"checkpoint was saved with checkpoint.use_node_local_storage and this directory holds only {held}: "
                + node_local_fix(Path(tag_dir).name)]
    now = storage or {"mode": SHARED}
    if now.get("mode") != NODE_LOCAL:
        return [f"saved with checkpoint.use_node_local_storage, this directory holds only {held}, and this run "
                "reads one shared directory: set checkpoint.use_node_local_storage to true and launch on the same "
                "nodes, or " + node_local_fix(Path(tag_dir).name)]
    if (now.get("node"), now.get("ranks")) != (saved.get("node"), saved.get("ranks")):
        return [f"this node's directory holds {held}, but this node is now node {now.get('node')} with ranks "
                f"{now.get('ranks')}: node-local checkpoints resume with the same ranks on each node; launch as "
                "they were saved, or " + node_local_fix(Path(tag_dir).name)]
    return []


def check_compatible(marker: Mapping[str, Any], where: Path, *, world_size: int, model_config: Any,
                     zero_stage: int | None = None, storage: Mapping[str, Any] | None = None) -> list[str]:
    """Refuse a checkpoint that cannot be loaded into this run; name every mismatch. Returns layout changes.

    Checked before the engine is built, so a wrong checkpoint costs seconds and
    one message instead of a load that fails halfway on every rank (or, worse,
    loads part of the weights). A different model *structure* (sizes, layers,
    vocabulary, expert sizes) is always refused. A different *layout* (world
    size, ZeRO stage, EP size, placement, front-end) is returned as a list of
    changes: the run then resumes elastically from the logical shards
    (:func:`hmoe_ds.shards.load_sharded_state`, optimizer state included); a
    format-1 checkpoint, which has no shards, is refused instead. A checkpoint
    saved with node-local storage must also fit this run's ``storage`` (the
    :meth:`~hmoe_ds.checkpoint.storage.CheckpointStorage.describe` of it;
    :func:`check_node_local_fit`).
    """
    problems, changes = [], []
    if int(marker.get("world_size", world_size)) != world_size:
        changes.append(f"world size {marker['world_size']} -> {world_size}")
    if zero_stage is not None and marker.get("zero_stage") is not None and int(marker["zero_stage"]) != zero_stage:
        changes.append(f"ZeRO stage {marker['zero_stage']} -> {zero_stage}")
    saved_cfg = marker.get("model_config") or {}
    now_cfg = model_config.to_dict()
    for name in STRUCTURE_FIELDS:
        if name in saved_cfg and saved_cfg[name] != now_cfg.get(name):
            problems.append(f"model.{name}: checkpoint {saved_cfg[name]!r}, this run {now_cfg.get(name)!r}")
    saved_layers = marker.get("moe_layers") or []
    now_layers = expected_moe_layer_records(model_config)
    if [r["layer"] for r in saved_layers] != [r["layer"] for r in now_layers]:
        problems.append(f"MoE layers: checkpoint has layers {[r['layer'] for r in saved_layers]}, this run "
                        f"{[r['layer'] for r in now_layers]}")
    else:
        for saved, now in zip(saved_layers, now_layers):
            for key in ("num_experts", "expert_sizes", "activation"):
                if saved.get(key) != now[key]:
                    problems.append(f"MoE layer {now['layer']} {key}: checkpoint {saved.get(key)!r}, "
                                    f"this run {now[key]!r}")
        for key in ("ep_size", "frontend"):
            if saved_layers and saved_layers[0].get(key) != now_layers[0][key]:
                changes.append(f"MoE {key} {saved_layers[0].get(key)!r} -> {now_layers[0][key]!r}")
        # Placements may differ layer by layer (placement: measured): any moved expert is a layout change.
        for saved, now in zip(saved_layers, now_layers):
            if saved.get("placement") != now["placement"]:
                changes.append(f"MoE layer {now['layer']} placement {saved.get('placement', {}).get('rank_experts')} "
                               f"-> {now['placement']['rank_experts']}")
    if changes and not marker.get("shards"):
        problems += [f"{c} (this checkpoint predates elastic resume; launch it as it was saved)" for c in changes]
    elif not problems:
        problems += check_node_local_fit(marker, Path(where), storage, changes)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(
            f"{where}: this checkpoint does not fit the run: {shown}. Resume with the settings it was saved with, "
            "or start a new run.output_dir with run.init_from pointing at it (re-shards the weights)")
    return changes

