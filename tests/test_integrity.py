"""Checkpoint files verified by content (issue 11, defects 1 and 2), on hand-made checkpoint directories.

Fast and single-process: a "checkpoint" here is a directory of random files
committed with the real :func:`hmoe_ds.checkpoint.write_marker`. The
end-to-end versions, through the deepspeed launcher, are in
``tests/test_robustness.py``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from hmoe_ds.checkpoint import (
    MARKER,
    CheckpointError,
    checkpoint_info,
    find_resume_checkpoint,
    prepare_tag_dir,
    read_latest,
    set_aside_newer_checkpoints,
    verify_checkpoint,
    write_latest,
    write_marker,
)
from hmoe_ds.integrity import describe_files, file_digest, verify_files

OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def make_checkpoint(checkpoints: Path, step: int, size: int = 64 << 10) -> Path:
    tag_dir = checkpoints / f"step_{step}"
    (tag_dir / "tokenizer").mkdir(parents=True)
    for name in (OPTIM, "mp_rank_00_model_states.pt", "tokenizer/tokenizer.json"):
        (tag_dir / name).write_bytes(os.urandom(size))
    write_marker(tag_dir, {"tag": tag_dir.name, "step": step, "world_size": 2})
    write_latest(checkpoints, tag_dir.name)
    return tag_dir


def overwrite_middle(path: Path, count: int = 4096) -> None:
    """As ``dd if=/dev/urandom of=path bs=1 seek=<middle> count=4096 conv=notrunc``: same size, other bytes."""
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        handle.write(os.urandom(count))


def digests(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): file_digest(p) for p in sorted(path.rglob("*")) if p.is_file()}


def test_digest_sees_bytes_changed_in_place(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    before = file_digest(path)
    assert before.startswith("xxh3_128:") and before == file_digest(path)
    overwrite_middle(path, 1)
    assert file_digest(path) != before and path.stat().st_size == 1 << 20
    assert file_digest(path, "sha256").startswith("sha256:")


def test_digest_maps_the_file_one_window_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of mmap's granularity over a file that is not a multiple of it: the digest of the whole bytes."""
    import mmap

    import xxhash

    from hmoe_ds import integrity

    assert integrity.DIGEST_WINDOW % mmap.ALLOCATIONGRANULARITY == 0  # mmap offsets must be multiples of it
    monkeypatch.setattr(integrity, "DIGEST_WINDOW", mmap.ALLOCATIONGRANULARITY)
    path = tmp_path / "f.bin"
    data = os.urandom(3 * mmap.ALLOCATIONGRANULARITY + 123)
    path.write_bytes(data)
    assert file_digest(path) == "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()
    path.write_bytes(b"")
    assert file_digest(path) == "xxh3_128:" + xxhash.xxh3_128(b"").hexdigest()


def test_marker_records_size_and_checksum_of_every_file(tmp_path: Path) -> None:
    tag_dir = make_checkpoint(tmp_path / "checkpoints", 5)
    files = json.loads((tag_dir / MARKER).read_text())["files"]
    assert sorted(files) == sorted([OPTIM, "mp_rank_00_model_states.pt", "tokenizer/tokenizer.json"])
    assert all(set(entry) == {"size", "digest"} for entry in files.values())
    assert files == describe_files(tag_dir, sorted(files))


@pytest.mark.parametrize("victim", [OPTIM, "mp_rank_00_model_states.pt"])
def test_defect1_same_size_corruption_is_refused_naming_the_file_and_resume_takes_the_previous(
        tmp_path: Path, victim: str) -> None:
    """Defect 1 (and 9's corrupted model states, which ended in a traceback naming no file): 4 KiB overwritten in
    the middle of a file of the newest checkpoint."""
    checkpoints = tmp_path / "checkpoints"
    make_checkpoint(checkpoints, 5)
    newest = make_checkpoint(checkpoints, 10)
    overwrite_middle(newest / victim)
    with pytest.raises(CheckpointError, match=rf"marked complete but damaged: corrupted {victim} \(same size"):
        verify_checkpoint(newest)
    info, notes = find_resume_checkpoint(checkpoints)
    assert info is not None and info.tag == "step_5"
    assert any("refusing" in note and f"corrupted {victim}" in note for note in notes), notes
    assert any("using 'step_5'" in note for note in notes), notes
    with pytest.raises(CheckpointError, match=r"corrupted .*pass --resume step_5"):
        checkpoint_info(checkpoints, "step_10")  # --resume step_10 names the file and offers step_5
    # The damaged checkpoint is set aside when the resumed run starts, never deleted.
    before = digests(newest)
    notes = set_aside_newer_checkpoints(checkpoints, 5)
    (moved,) = list((tmp_path / "checkpoints_set_aside").iterdir())
    assert digests(moved / "step_10") == before and notes and read_latest(checkpoints) == "step_5"


def test_markers_with_sizes_only_still_verify_by_size_with_a_note(tmp_path: Path) -> None:
    tag_dir = make_checkpoint(tmp_path / "checkpoints", 5)
    marker = json.loads((tag_dir / MARKER).read_text())
    marker["files"] = {name: entry["size"] for name, entry in marker["files"].items()}  # the version-1 layout
    marker["version"] = 1
    (tag_dir / MARKER).write_text(json.dumps(marker))
    notes: list[str] = []
    verify_checkpoint(tag_dir, notes)
    assert notes and "by size only" in notes[0]
    (tag_dir / OPTIM).write_bytes(b"short")
    problems, _ = verify_files(tag_dir, marker["files"])
    assert problems == [f"truncated or changed {OPTIM} (5 bytes, saved {64 << 10})"]


def test_defect2_a_same_tag_directory_is_set_aside_not_deleted(tmp_path: Path) -> None:
    """Defect 2 (unit): a save over an existing directory of its tag (here with an unreadable marker)."""
    checkpoints = tmp_path / "checkpoints"
    tag_dir = make_checkpoint(checkpoints, 5)
    (tag_dir / MARKER).write_text('{"format": "hmoe-ds-check')  # truncated marker
    before = digests(tag_dir)
    note = prepare_tag_dir(tag_dir)
    assert note is not None and "checkpoints_set_aside" in note and not tag_dir.exists()
    (moved,) = list((tmp_path / "checkpoints_set_aside").iterdir())
    assert digests(moved / "step_5") == before
    # a second set-aside in the same second gets its own directory instead of mixing with the first
    make_checkpoint(checkpoints, 5)
    prepare_tag_dir(checkpoints / "step_5")
    assert len(list((tmp_path / "checkpoints_set_aside").iterdir())) == 2


def test_checksum_speed_is_far_above_disk_speed(tmp_path: Path) -> None:
    """The README's figure: XXH3-128 over a 64 MiB file. Loose bound: checksumming must not rival the save."""
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(64 << 20))
    start = time.perf_counter()
    file_digest(path)
    rate = 64 / (time.perf_counter() - start)
    assert rate > 200, f"{rate:.0f} MiB/s"
