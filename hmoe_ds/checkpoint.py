"""Crash-safe, self-describing training checkpoints around DeepSpeed's ``save_checkpoint``.

A checkpoint is ``<run>/checkpoints/step_<n>/``. DeepSpeed writes its own files
there (model/optimizer shards, one file per expert under ZeRO 0-2) with
``save_latest=False``; then every rank adds what DeepSpeed does not keep:

``hmoe_rank_<r>.pt``           this rank's data-loader position and RNG states (python, numpy, torch).
                               DeepSpeed's ``client_state`` is written by rank 0 only, so per-rank
                               state needs per-rank files.
``hmoe_shard_<r>.safetensors`` this rank's *logical* shard (:mod:`hmoe_ds.shards`): the fp32 master
                               weights and optimizer states of the parameter slices this rank owns,
                               under the parameter names of ``HMoEForCausalLM`` with ``ep_size=1``
                               and ``frontend="moe"`` whatever ZeRO stage, EP size, placement or
                               front-end trained it. Nothing is gathered: export, evaluation,
                               re-sharding and elastic resume stream them back
                               (``ShardReader``). DeepSpeed's ``zero_to_fp32``/``save_16bit_model``
                               cannot read these MoE checkpoints. (Format 1 checkpoints held one
                               consolidated ``hmoe_model.safetensors`` instead; they still load.)
``hmoe_probe.safetensors``     a short validation sequence and the logits the training engine
                               computed for it: export checks its result against these.
``hmoe_experiment.yaml``, ``tokenizer/``   the resolved experiment and the tokenizer, so a
                               checkpoint directory is self-contained.
``hmoe_complete.json``         the completion marker, written last by rank 0 after a barrier: step,
                               world size, ZeRO stage, the expert placement of every MoE layer, the
                               training and logical model configs and every file with its size and
                               content checksum (XXH3-128, :mod:`hmoe_ds.integrity`).

Only after the marker is durable is ``checkpoints/latest`` replaced (temp file +
``os.replace``), so a process killed at any moment leaves either the previous
complete checkpoint as newest, or the new one complete. ``--resume`` picks the
newest directory *with* a marker whose files all match their recorded sizes and
checksums, and says which ones it skipped and why (naming the damaged file);
skipped directories are moved to ``checkpoints_set_aside/``, never deleted or
overwritten.

The test-only hooks ``HMOE_DS_TEST_KILL_DURING_SAVE=<step>`` and
``HMOE_DS_TEST_KILL_DURING_STEP=<step>`` make one rank (``HMOE_DS_TEST_KILL_RANK``,
default 1) SIGKILL itself in the middle of that step's save (after DeepSpeed wrote
its first file on that rank) or in the middle of that optimizer step (after
the first backward). They exist to test crash safety and do nothing unless set.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from .shards import write_rank_shard
from .naming import (
    MOE_STRUCTURE_FIELDS,
    STRUCTURE_FIELDS,
    expected_moe_layer_records,
    expert_weight_names,
    logical_config,
    logical_dense_key,
    logical_expert_key,
    logical_parameter_shapes,
    mixin_host,
    moe_layer_records,
    moe_layers,
)
from .training.experiment import ExperimentError

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "MARKER",
    "MODEL_FILE",
    "PROBE_FILE",
    "checkpoint_info",
    "find_resume_checkpoint",
    "logical_config",
    "logical_expert_key",
    "logical_parameter_shapes",
    "moe_layer_records",
    "read_latest",
    "read_marker",
    "set_aside",
    "set_aside_newer_checkpoints",
    "set_aside_unusable_checkpoints",
    "tag_for",
    "verify_checkpoint",
    "write_latest",
]

FORMAT = "hmoe-ds-checkpoint"
# 2: per-rank logical shards replace the consolidated hmoe_model.safetensors, and ``files`` maps each file to
# ``{"size", "digest"}`` (1: to its size). Version 1 markers still verify, by size, and their checkpoints still
# export and resume at their own layout; an hmoe-ds that only knows 1 says "upgrade" for a version 2 marker.
FORMAT_VERSION = 2
MARKER = "hmoe_complete.json"
MODEL_FILE = "hmoe_model.safetensors"
PROBE_FILE = "hmoe_probe.safetensors"
EXPERIMENT_FILE = "hmoe_experiment.yaml"
TOKENIZER_DIR = "tokenizer"
LATEST = "latest"
SET_ASIDE = "checkpoints_set_aside"
TAG_PREFIX = "step_"
PROBE_TOKENS = 32

KILL_DURING_SAVE_ENV = "HMOE_DS_TEST_KILL_DURING_SAVE"
KILL_DURING_STEP_ENV = "HMOE_DS_TEST_KILL_DURING_STEP"
KILL_RANK_ENV = "HMOE_DS_TEST_KILL_RANK"

class CheckpointError(ExperimentError):
    """A checkpoint that cannot be used as asked; the message names the file or the mismatch and the fix."""


# --------------------------------------------------------------------------- names and small files


def tag_for(step: int) -> str:
    """The tag (directory name) of the checkpoint taken after optimizer step ``step``."""
    return f"{TAG_PREFIX}{step}"


def rank_file(rank: int) -> str:
    return f"hmoe_rank_{rank:05d}.pt"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` so that readers see the old content or the new one, never a partial file."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_latest(checkpoint_dir: Path) -> str | None:
    """The tag named by ``<checkpoint_dir>/latest``, if the file exists."""
    latest = Path(checkpoint_dir) / LATEST
    return latest.read_text(encoding="utf-8").strip() or None if latest.is_file() else None


def write_latest(checkpoint_dir: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` atomically (DeepSpeed's own ``latest`` write is not atomic)."""
    atomic_write_text(Path(checkpoint_dir) / LATEST, tag)


# --------------------------------------------------------------------------- per-rank state


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (router noise uses torch's global generator)."""
    from deepspeed.accelerator import get_accelerator

    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        state["accelerator"] = accelerator.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def save_rank_state(tag_dir: Path, rank: int, state: dict[str, Any]) -> None:
    _atomic_torch_save(state, Path(tag_dir) / rank_file(rank))


def load_rank_state(tag_dir: Path, rank: int) -> dict[str, Any]:
    path = Path(tag_dir) / rank_file(rank)
    try:
        # Our own file (python/numpy RNG states are not plain tensors), inside a checkpoint the
        # user already trusts with DeepSpeed's pickles.
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{tag_dir}: {rank_file(rank)} is missing (the per-rank data position and RNG "
                              f"state of rank {rank}); the checkpoint is incomplete") from None


def restore_cpu_adam_step_state(engine: Any) -> int | None:
    """Make DeepSpeedCPUAdam (ZeRO-Offload's optimizer) resume bit-exactly; returns the replayed step count.

    Its C++ half keeps ``beta^t`` for bias correction as a running product
    (``beta_t *= beta`` each step) but, in a fresh process at step ``n``, computes
    it once with ``pow(beta, n)``: the two differ in the last bits, so every step
    after a resume would differ from the uninterrupted run by ~1e-7 relative.
    Replaying steps 1..n on empty tensors rebuilds the running product exactly
    (one call per step, no arithmetic on weights). Any other optimizer: no-op.
    """
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    candidates = [getattr(engine, "optimizer", None), getattr(getattr(engine, "optimizer", None), "optimizer", None),
                  getattr(engine, "basic_optimizer", None)]
    optimizer = next((o for o in candidates if isinstance(o, DeepSpeedCPUAdam)), None)
    if optimizer is None:
        return None
    steps = {int(state["step"]) for state in optimizer.state.values() if "step" in state}
    if len(steps) != 1:
        return None  # nothing restored, or parameters at different steps: leave DeepSpeed's behaviour alone
    step = steps.pop()
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    empty = torch.empty(0, dtype=torch.float32)
    for t in range(1, step + 1):
        optimizer.ds_opt_adam.adam_update(optimizer.opt_id, t, group["lr"], beta1, beta2, group["eps"],
                                          group["weight_decay"], group["bias_correction"], empty, empty, empty, empty)
    return step


# --------------------------------------------------------------------------- probe


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def probe_logits(engine: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [1, T, V] (fp32, CPU) of the engine in eval mode; collective (every rank runs the forward)."""
    module = engine.module
    was_training = module.training
    engine.eval()
    try:
        out = engine(input_ids=input_ids.to(engine.device))
    finally:
        if was_training:
            engine.train()
    return out.logits.detach().float().cpu()


# --------------------------------------------------------------------------- marker and validation


def _file_names(tag_dir: Path) -> list[str]:
    """Every file of the checkpoint (listed now, so whatever files a save writes are covered), marker excluded."""
    return [path.relative_to(tag_dir).as_posix() for path in sorted(tag_dir.rglob("*"))
            if path.is_file() and path.name != MARKER and not path.name.startswith(".")]


def write_marker(tag_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Rank 0, after every rank finished writing: make the files durable, checksum them, then commit the marker.

    ``files`` maps every file to its size and content digest (:mod:`hmoe_ds.integrity`),
    so resume detects bytes changed in place, not only lost or truncated files.
    """
    from .integrity import describe_files

    tag_dir = Path(tag_dir)
    names = _file_names(tag_dir)
    # SIGKILL loses nothing the kernel has; fsync is for a node that loses power right after "complete".
    for name in names:
        _fsync_file(tag_dir / name)
    _fsync_dir(tag_dir)
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
    from .integrity import verify_files

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


@dataclass
class CheckpointInfo:
    """A complete checkpoint found on disk."""

    tag: str
    path: Path
    step: int
    marker: dict[str, Any] = field(repr=False)


def _tag_dirs(checkpoint_dir: Path) -> Iterator[Path]:
    if checkpoint_dir.is_dir():
        yield from (p for p in checkpoint_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _step_of(path: Path) -> int | None:
    rest = path.name[len(TAG_PREFIX):] if path.name.startswith(TAG_PREFIX) else ""
    return int(rest) if rest.isdigit() else None


def _saved_step(path: Path) -> int:
    """The step a checkpoint directory holds: its marker's, else its ``step_<n>`` name's, else 0."""
    try:
        return int(read_marker(path)["step"])
    except (CheckpointError, KeyError, ValueError):
        return _step_of(path) or 0


def find_resume_checkpoint(checkpoint_dir: Path) -> tuple[CheckpointInfo | None, list[str]]:
    """The newest *verified* checkpoint under ``checkpoint_dir`` and notes on every directory skipped.

    Directories without a readable marker (an interrupted save, a damaged
    marker, or not ours) are skipped with a note. Marked checkpoints are verified
    newest first (every file's size and content checksum); one that fails is
    skipped with a note naming the damaged file, and the next older one is tried,
    so a resume never loads bytes that differ from what was saved. Older
    checkpoints than the one chosen are not read, so pruning files from them (to
    free disk) never blocks a resume. The skipped newer directories are not
    touched here: the trainer sets them aside (never deletes them) when it starts.
    ``latest`` is only a hint: a crash between marker and pointer leaves it one
    checkpoint behind, and the newest marker wins.
    """
    checkpoint_dir = Path(checkpoint_dir)
    found: list[CheckpointInfo] = []
    notes: list[str] = []
    for path in _tag_dirs(checkpoint_dir):
        try:
            marker = read_marker(path)
        except CheckpointError as exc:
            notes.append(f"ignoring {exc}")
            continue
        found.append(CheckpointInfo(path.name, path, int(marker["step"]), marker))
    notes.sort()
    best: CheckpointInfo | None = None
    refused: list[str] = []
    for info in sorted(found, key=lambda info: (info.step, info.tag), reverse=True):
        try:
            verify_checkpoint(info.path, notes)
        except CheckpointError as exc:
            notes.append(f"refusing {exc}")
            refused.append(info.tag)
            continue
        best = info
        break
    if best is None:
        return None, notes
    if refused:
        notes.append(f"using {best.tag!r}, the newest checkpoint whose files match their checksums (skipped "
                     f"{', '.join(map(repr, refused))}; they will be moved to checkpoints_set_aside/)")
    latest = read_latest(checkpoint_dir)
    if latest is not None and latest != best.tag and latest not in refused:
        notes.append(f"{checkpoint_dir / LATEST} names {latest!r}, but the newest complete checkpoint is "
                     f"{best.tag!r}; using {best.tag!r}")
    return best, notes


def checkpoint_info(checkpoint_dir: Path, tag: str) -> CheckpointInfo:
    """The complete checkpoint ``tag`` under ``checkpoint_dir``; a :class:`CheckpointError` names what is wrong."""
    path = Path(checkpoint_dir) / tag
    if not path.is_dir():
        have = has_checkpoint_dirs(checkpoint_dir)
        raise CheckpointError(f"{checkpoint_dir}: no checkpoint {tag!r}; available: {', '.join(have) or 'none'}")
    try:
        marker = verify_checkpoint(path)
    except CheckpointError as exc:
        older = [info for info in _marked(checkpoint_dir) if info.tag != tag]
        offer = ""
        for info in sorted(older, key=lambda info: (info.step, info.tag), reverse=True):
            try:
                verify_checkpoint(info.path)
            except CheckpointError:
                continue
            offer = f"; the newest checkpoint that verifies is {info.tag!r}: pass --resume {info.tag}"
            break
        raise CheckpointError(f"{exc}{offer}") from None
    return CheckpointInfo(tag, path, int(marker["step"]), marker)


def _marked(checkpoint_dir: Path) -> list[CheckpointInfo]:
    out = []
    for path in _tag_dirs(Path(checkpoint_dir)):
        try:
            marker = read_marker(path)
        except CheckpointError:
            continue
        out.append(CheckpointInfo(path.name, path, int(marker["step"]), marker))
    return out


def _set_aside_root(checkpoint_dir: Path) -> Path:
    """A fresh ``<run>/checkpoints_set_aside/<time>[-n]/`` directory (never one already holding files)."""
    base = Path(checkpoint_dir).parent / SET_ASIDE / time.strftime("%Y%m%d-%H%M%S")
    target, n = base, 1
    while target.exists() and any(target.iterdir()):
        target, n = base.with_name(f"{base.name}-{n}"), n + 1
    target.mkdir(parents=True, exist_ok=True)
    return target


def set_aside(checkpoint_dir: Path, paths: list[Path], why: str,
              with_files: tuple[Path, ...] = ()) -> list[str]:
    """Move checkpoint directories to ``<run>/checkpoints_set_aside/<time>/`` (nothing is ever deleted).

    ``latest`` is removed if it names one of them (it would name a directory that
    is gone); ``with_files`` that exist move along. Returns a note per thing moved
    (saying ``why``).
    """
    if not paths:
        return []
    checkpoint_dir = Path(checkpoint_dir)
    target = _set_aside_root(checkpoint_dir)
    for extra in map(Path, with_files):
        if extra.is_file():
            os.replace(extra, target / extra.name)
    notes = []
    for path in paths:
        os.replace(path, target / path.name)
        notes.append(f"moved {path.name} ({why}) to {target / path.name}")
    notes += [f"moved {Path(extra).name} along to {target}" for extra in with_files if (target / Path(extra).name).is_file()]
    latest = read_latest(checkpoint_dir)
    if latest is not None and latest in {path.name for path in paths}:
        (checkpoint_dir / LATEST).unlink()
    _fsync_dir(checkpoint_dir)
    return notes


def set_aside_newer_checkpoints(checkpoint_dir: Path, step: int) -> list[str]:
    """Rank 0, resuming from ``step``: move every later checkpoint directory out of ``checkpoint_dir``.

    Resuming from an older checkpoint starts a new branch of the run; the old
    branch's later checkpoints left in place would make a later ``--resume``
    (newest complete checkpoint) jump back onto that branch. They go to
    ``<run>/checkpoints_set_aside/<time>/`` (nothing is deleted), and ``latest``
    names ``step``'s checkpoint. Checkpoints skipped because they failed
    verification are among them (their marker's step is later). Returns a note
    per directory moved.
    """
    checkpoint_dir = Path(checkpoint_dir)
    newer = sorted((saved, path.name, path) for path in _tag_dirs(checkpoint_dir) if (saved := _saved_step(path)) > step)
    if not newer:
        return []
    notes = set_aside(checkpoint_dir, [path for _, _, path in newer], f"after the resumed step {step}")
    write_latest(checkpoint_dir, tag_for(step))
    return notes


def set_aside_unusable_checkpoints(checkpoint_dir: Path, with_files: tuple[Path, ...] = ()) -> list[str]:
    """Rank 0, a resumed run that starts from scratch: move every checkpoint directory aside.

    Such directories (an interrupted save, an unreadable marker, damaged files)
    hold someone's work: a new save of the same tag must never overwrite them.
    ``with_files`` (e.g. the old ``metrics.jsonl``) move along with them, so the
    new run's log starts empty without the old one being lost.
    """
    checkpoint_dir = Path(checkpoint_dir)
    paths = sorted(_tag_dirs(checkpoint_dir))
    return set_aside(checkpoint_dir, paths, "no verified checkpoint; this run starts from scratch", with_files)


def has_checkpoint_dirs(checkpoint_dir: Path) -> list[str]:
    """Names of every checkpoint-looking directory, complete or not."""
    return sorted(p.name for p in _tag_dirs(Path(checkpoint_dir)))


def check_compatible(marker: Mapping[str, Any], where: Path, *, world_size: int, model_config: Any,
                     zero_stage: int | None = None) -> list[str]:
    """Refuse a checkpoint that cannot be loaded into this run; name every mismatch. Returns layout changes.

    Checked before the engine is built, so a wrong checkpoint costs seconds and
    one message instead of a load that fails halfway on every rank (or, worse,
    loads part of the weights). A different model *structure* (sizes, layers,
    vocabulary, expert sizes) is always refused. A different *layout* (world
    size, ZeRO stage, EP size, placement, front-end) is returned as a list of
    changes: the run then resumes elastically from the logical shards
    (:func:`hmoe_ds.shards.load_sharded_state`, optimizer state included); a
    format-1 checkpoint, which has no shards, is refused instead.
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
        for key in ("ep_size", "frontend", "placement"):
            if saved_layers and saved_layers[0].get(key) != now_layers[0][key]:
                changes.append(f"MoE {key} {saved_layers[0].get(key)!r} -> {now_layers[0][key]!r}")
    if changes and not marker.get("shards"):
        problems += [f"{c} (this checkpoint predates elastic resume; launch it as it was saved)" for c in changes]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(
            f"{where}: this checkpoint does not fit the run: {shown}. Resume with the settings it was saved with, "
            "or start a new run.output_dir with run.init_from pointing at it (re-shards the weights)")
    return changes


def prepare_tag_dir(tag_dir: Path) -> str | None:
    """Rank 0, before a save: move a leftover directory of the same tag aside (never delete it).

    Stale files would otherwise survive into the new checkpoint's file list, and
    the directory may be the only copy of someone's work (a checkpoint whose
    marker became unreadable is still a checkpoint). Returns a note when
    something was moved.
    """
    tag_dir = Path(tag_dir)
    if not tag_dir.exists():
        return None
    complete = (tag_dir / MARKER).is_file()
    (note,) = set_aside(tag_dir.parent, [tag_dir], f"an existing {'complete' if complete else 'incomplete'} "
                        "checkpoint of the same step, replaced by this save")
    return note


def truncate_metrics(path: Path, step: int) -> int:
    """Drop ``metrics.jsonl`` records after ``step`` (written by a run that then died); returns how many.

    After a crash the log holds steps that the resumed run will compute again;
    keeping both would show every such step twice.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record_step = int(json.loads(line).get("step", -1))
        except (ValueError, AttributeError):
            kept.append(line)  # not ours to judge
            continue
        if record_step > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


# --------------------------------------------------------------------------- test-only kill hooks


def _kill_rank() -> int:
    return int(os.environ.get(KILL_RANK_ENV, "1"))


def _kill_requested(env: str, step: int, rank: int) -> bool:
    value = os.environ.get(env)
    return bool(value) and int(value) == step and rank == _kill_rank()


def _die(reason: str) -> None:
    print(f"[hmoe_ds test hook] rank {os.environ.get('RANK')}: SIGKILL {reason}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill_during_step(step: int, rank: int) -> None:
    """Test hook: SIGKILL this rank while it computes optimizer step ``step`` (1-based)."""
    if _kill_requested(KILL_DURING_STEP_ENV, step, rank):
        _die(f"during step {step}")


def arm_kill_during_save(engine: Any, step: int, rank: int) -> None:
    """Test hook: make this rank SIGKILL itself right after DeepSpeed wrote its first file of this save."""
    if not _kill_requested(KILL_DURING_SAVE_ENV, step, rank):
        return
    ckpt_engine = engine.checkpoint_engine
    original = ckpt_engine.save

    def save_then_die(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        _die(f"during the save of step {step}, after DeepSpeed wrote one file")
        return result

    ckpt_engine.save = save_then_die


def maybe_kill_before_marker(step: int, rank: int) -> None:
    """Test hook fallback: a rank that wrote no DeepSpeed file dies before the marker instead."""
    if _kill_requested(KILL_DURING_SAVE_ENV, step, rank):
        _die(f"during the save of step {step}, before the completion marker")


# --------------------------------------------------------------------------- the save itself (collective)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _versions() -> dict[str, str]:
    from importlib import metadata

    import deepspeed

    try:  # the distribution's version: works even when hmoe_ds/__init__.py was not what got imported
        ours = metadata.version("hmoe-ds")
    except metadata.PackageNotFoundError:
        ours = "unknown"
    return {"hmoe_ds": ours, "deepspeed": deepspeed.__version__, "torch": torch.__version__}


def save_training_checkpoint(engine: Any, checkpoint_dir: Path, step: int, *, rank_state: dict[str, Any],
                             experiment: dict[str, Any], tokenizer: Any | None = None,
                             probe_ids: torch.Tensor | None = None) -> tuple[Path, list[str]]:
    """Write ``checkpoint_dir/step_<step>`` crash-safely; every rank calls it. Returns (directory, notes).

    Order (each stage starts only when every rank finished the previous one):
    remove a stale same-tag directory -> DeepSpeed's files (``save_latest=False``)
    + this rank's state file + this rank's logical shard -> probe, experiment, tokenizer (rank 0)
    -> barrier -> marker -> ``latest``. A kill anywhere before the marker leaves
    a directory that resume skips; ``latest`` never names it. A failure in one of
    rank 0's sections raises on every rank (:func:`hmoe_ds.collectives.on_rank0`).
    """
    import yaml

    from .collectives import on_rank0

    checkpoint_dir = Path(checkpoint_dir)
    rank, world = _dist()
    tag = tag_for(step)
    tag_dir = checkpoint_dir / tag

    def prepare() -> list[str]:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        note = prepare_tag_dir(tag_dir)
        return [note] if note else []

    notes = on_rank0(prepare)
    arm_kill_during_save(engine, step, rank)
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"step": step, "experiment": experiment},
                           save_latest=False)
    save_rank_state(tag_dir, rank, {**rank_state, "step": step, "rank": rank, "world_size": world})
    # This rank's logical shard: the weights and optimizer state it owns, nothing gathered.
    write_rank_shard(engine, tag_dir, rank)
    logits = probe_logits(engine, probe_ids) if probe_ids is not None else None

    def write_files() -> None:
        if logits is not None and probe_ids is not None:
            _atomic_safetensors({"input_ids": probe_ids.cpu(), "logits": logits}, tag_dir / PROBE_FILE,
                                {"format": "pt"})
        (tag_dir / EXPERIMENT_FILE).write_text(yaml.safe_dump(experiment, sort_keys=False), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tag_dir / TOKENIZER_DIR))

    def commit() -> None:
        cfg = engine.module.config
        meta = {
            "tag": tag,
            "step": step,
            "world_size": world,
            "zero_stage": int(engine.zero_optimization_stage()),
            "dtype": "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32",
            "model_config": json.loads(cfg.to_json_string(use_diff=False)),
            "logical_config": json.loads(logical_config(cfg).to_json_string(use_diff=False)),
            "moe_layers": moe_layer_records(engine.module),
            "shards": world,
            "versions": _versions(),
        }
        write_marker(tag_dir, meta)
        write_latest(checkpoint_dir, tag)

    maybe_kill_before_marker(step, rank)
    # A failure in a rank-0 section (a full disk) stops every rank at once, without a marker, instead of
    # leaving the others waiting in a barrier.
    on_rank0(write_files)
    _barrier()  # every rank's own files are complete before the marker says so
    on_rank0(commit)
    return tag_dir, notes
