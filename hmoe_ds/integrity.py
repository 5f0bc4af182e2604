"""Content checksums of checkpoint files: what the completion marker records and what resume verifies.

A size check misses the commonest silent damage (bytes overwritten in place by
a faulty disk, a bad copy, ``dd conv=notrunc``): the file keeps its size, loads,
and poisons the resumed run. So the marker records, for every file of a
checkpoint, its size *and* a digest of its bytes, and resume recomputes both.

The digest is xxHash's XXH3-128 (the ``xxhash`` package, already a dependency
of ``datasets``): a non-cryptographic checksum, because the threat is damage,
not an adversary who can also rewrite the marker. It runs at several GB/s on
one core, so verifying costs far less than the save that wrote the files (the
README states the measured cost). Digests are written ``"<algorithm>:<hex>"``,
so a marker says how to check it and other algorithms (``sha256``) verify too.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

__all__ = ["ALGORITHM", "describe_files", "file_digest", "verify_files"]

ALGORITHM = "xxh3_128"


def _hasher(algorithm: str) -> Any:
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    try:
        return hashlib.new(algorithm)
    except ValueError:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}") from None


#: Bytes of a file mapped at once while hashing it (a multiple of every platform's mmap granularity).
DIGEST_WINDOW = 64 * 1024 * 1024


def file_digest(path: str | Path, algorithm: str = ALGORITHM) -> str:
    """``"<algorithm>:<hex digest>"`` of the file's bytes.

    The file is memory-mapped rather than read: hashing the page cache in place
    is about twice as fast as copying it into a buffer first (measured: 3 GB/s
    against 1.5 GB/s for XXH3-128 on one core). It is mapped one
    :data:`DIGEST_WINDOW` at a time, because every page of a mapping counts in
    the process's resident memory until it is unmapped: hashing a 2.5 GB shard
    through one mapping lifted a save's peak RSS by 2.5 GB (``bench_memory``).
    """
    hasher = _hasher(algorithm)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size  # mmap refuses empty files; their digest is the empty input's
        for offset in range(0, size, DIGEST_WINDOW):
            length = min(DIGEST_WINDOW, size - offset)
            with mmap.mmap(handle.fileno(), length, access=mmap.ACCESS_READ, offset=offset) as view:
                hasher.update(view)
    return f"{algorithm}:{hasher.hexdigest()}"


def describe_files(tag_dir: str | Path, names: Iterable[str],
                   digest: Callable[[Path], str] = file_digest) -> dict[str, dict[str, Any]]:
    """``{name: {"size": bytes, "digest": "<algorithm>:<hex>"}}`` for each relative path under ``tag_dir``."""
    tag_dir = Path(tag_dir)
    table: dict[str, dict[str, Any]] = {}
    for name in names:
        path = tag_dir / name
        table[name] = {"size": path.stat().st_size, "digest": digest(path)}
    return table


def verify_files(tag_dir: str | Path, recorded: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Check every recorded file of ``tag_dir``; return ``(problems, notes)``, both lists of short phrases.

    ``recorded`` maps a relative path to ``{"size", "digest"}`` (markers of this
    version) or to a bare size (older markers: checked by size only, which a
    note says). Each problem starts with ``missing``, ``truncated or changed`` or ``corrupted``
    and names the file.
    """
    tag_dir = Path(tag_dir)
    problems: list[str] = []
    size_only = 0
    for name, entry in recorded.items():
        path = tag_dir / name
        if not path.is_file():
            problems.append(f"missing {name}")
            continue
        size = entry["size"] if isinstance(entry, Mapping) else int(entry)
        actual = path.stat().st_size
        if actual != size:
            problems.append(f"truncated or changed {name} ({actual} bytes, saved {size})")
            continue
        expected = entry.get("digest") if isinstance(entry, Mapping) else None
        if not expected:
            size_only += 1
            continue
        algorithm = str(expected).split(":", 1)[0]
        try:
            got = file_digest(path, algorithm)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if got != expected:
            problems.append(f"corrupted {name} (same size, other bytes: checksum {got}, saved {expected})")
    notes = []
    if size_only:
        notes.append(f"{tag_dir}: {size_only} file(s) checked by size only (the marker predates content "
                     "checksums)")
    return problems, notes
