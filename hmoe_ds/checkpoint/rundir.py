"""The run's ``checkpoints/`` directory: ``latest``, which checkpoint to resume from, and setting checkpoints aside.

Nothing here deletes a directory that holds checkpoint files: checkpoints that
must make way (an abandoned branch, a damaged or unverifiable one) are moved to
``<run>/checkpoints_set_aside/<time>/``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .atomic_io import atomic_write_text, fsync_dir
from .layout import LATEST, MARKER, SET_ASIDE, TAG_PREFIX, CheckpointError, tag_for
from .marker import read_marker, verify_checkpoint

def read_latest(checkpoint_dir: Path) -> str | None:
    """The tag named by ``<checkpoint_dir>/latest``, if the file exists."""
    latest = Path(checkpoint_dir) / LATEST
    return latest.read_text(encoding="utf-8").strip() or None if latest.is_file() else None


def write_latest(checkpoint_dir: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` atomically (DeepSpeed's own ``latest`` write is not atomic)."""
    atomic_write_text(Path(checkpoint_dir) / LATEST, tag)


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
        have = checkpoint_dir_names(checkpoint_dir)
        raise CheckpointError(f"{checkpoint_dir}: no checkpoint {tag!r}; available: {', '.join(have) or 'none'}")
    try:
        marker = verify_checkpoint(path)
    except CheckpointError as exc:
        older = [info for info in marked_checkpoints(checkpoint_dir) if info.tag != tag]
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


def marked_checkpoints(checkpoint_dir: Path) -> list[CheckpointInfo]:
    """Every checkpoint directory with a readable marker (not verified: that reads every file)."""
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
    fsync_dir(checkpoint_dir)
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


def checkpoint_dir_names(checkpoint_dir: Path) -> list[str]:
    """Names of every checkpoint-looking directory, complete or not (sorted)."""
    return sorted(p.name for p in _tag_dirs(Path(checkpoint_dir)))


def has_checkpoint_dirs(checkpoint_dir: Path) -> list[str]:
    """Deprecated alias of :func:`checkpoint_dir_names` (it returns names, not a bool); removed in the next release."""
    warnings.warn("has_checkpoint_dirs is deprecated (it returns names, not a bool); use checkpoint_dir_names",
                  DeprecationWarning, stacklevel=2)
    return checkpoint_dir_names(checkpoint_dir)


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

