"""Tokenised, packed, train/validation-split language-modelling datasets, cached on disk.

Pipeline (``build_lm_datasets``)::

    TextCorpus --chunks--> datasets.Dataset{text, doc_end}
               --tokenise (batched map, num_proc)--> {input_ids: list[int32]}  (+ eos after each document)
               --pack--> {input_ids: int32[block_size], block_index: int64}
               --seeded split--> train / validation  --save_to_disk--> <cache>/datasets/<key>/

Packing: the documents' token streams (each followed by the eos token) are
concatenated in corpus order and cut into consecutive blocks of exactly
``block_size`` tokens; block ``i`` is ``stream[i*B:(i+1)*B]``. The final
``len(stream) % block_size`` tokens (fewer than one block) are dropped and
recorded as ``num_dropped_tokens`` in the manifest. There is no ``block_size+1``
overlap: ``labels == input_ids`` and the model shifts.

Split: a fraction ``val_fraction`` of the *blocks* (at least one) chosen by a
permutation seeded with ``seed`` goes to validation, the rest to train; both
keep ascending ``block_index`` order (the training loader shuffles).

Cache: the entry is keyed by the corpus content fingerprint, the tokenizer
fingerprint, ``block_size``, ``val_fraction`` and ``seed``, written atomically
with a ``manifest.json`` recording those keys, and reused by later runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from .corpus import TextCorpus, atomic_directory, check_text_files, default_cache_dir, read_manifest, write_manifest
from .tokenizer import MIN_VOCAB_SIZE, check_tokenizer_dir, load_tokenizer, tokenizer_fingerprint, tokenizer_name

__all__ = ["DataConfig", "LMDatasets", "build_lm_datasets"]

_FORMAT_VERSION = 1  # bump when the on-disk layout or packing changes
_KEY_FIELDS = ("format_version", "corpus_fingerprint", "tokenizer_fingerprint", "block_size", "val_fraction", "seed")


@dataclass
class DataConfig:
    """What to train on. ``validate()`` checks every field cheaply (no tokenisation).

    Attributes:
        files: UTF-8 text files (``.txt``/``.text``/``.md``), one document each;
            ``None`` (and no ``dataset_dir``) = the default Shakespeare corpus.
        dataset_dir: a ``Dataset.save_to_disk`` directory with a ``text`` column
            (one document per row). Mutually exclusive with ``files``.
        tokenizer: local directory for ``AutoTokenizer.from_pretrained``; ``None`` =
            train (once, cached) a byte-level BPE of ``vocab_size`` on the corpus.
        vocab_size: size of the default BPE; ignored for a user tokenizer.
        block_size: tokens per training example (>= 2).
        val_fraction: fraction of blocks held out for validation, in (0, 1).
        seed: seeds the train/validation split.
        cache_dir: cache root; default ``$HMOE_DS_CACHE`` or ``~/.cache/hmoe_ds``.
        num_proc: processes for tokenisation.
        max_chars: keep only the first ``max_chars`` characters of the corpus (tests, smoke runs).
        tokenized_cache: explicit directory for the tokenised dataset instead of the keyed
            ``<cache>/datasets/...`` path. If it exists, its manifest must match these inputs.
        rebuild: rebuild the tokenised dataset even if a cache entry exists (replaced atomically).
    """

    files: list[str] | None = None
    dataset_dir: str | None = None
    tokenizer: str | None = None
    vocab_size: int = 8192
    block_size: int = 256
    val_fraction: float = 0.02
    seed: int = 1234
    cache_dir: str | None = None
    num_proc: int = 1
    max_chars: int | None = None
    tokenized_cache: str | None = None
    rebuild: bool = False

    def validate(self) -> None:
        """Raise ``ValueError``/``FileNotFoundError`` naming the bad field, its value and the fix."""
        if self.files is not None and self.dataset_dir is not None:
            raise ValueError("DataConfig.files and DataConfig.dataset_dir are both set; pass only one of them.")
        if isinstance(self.files, (str, os.PathLike)):
            raise ValueError(f"DataConfig.files must be a list of paths, got the single path {str(self.files)!r}; wrap it in a list.")
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise ValueError(f"DataConfig.block_size={self.block_size!r} must be an int >= 2 (a block of input_ids; the model shifts labels).")
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise ValueError(f"DataConfig.val_fraction={self.val_fraction!r} must be strictly between 0 and 1, e.g. 0.02.")
        if self.tokenizer is None and (not isinstance(self.vocab_size, int) or self.vocab_size < MIN_VOCAB_SIZE):
            raise ValueError(f"DataConfig.vocab_size={self.vocab_size!r} must be an int >= {MIN_VOCAB_SIZE} (256 bytes + 3 special tokens).")
        if not isinstance(self.num_proc, int) or self.num_proc < 1:
            raise ValueError(f"DataConfig.num_proc={self.num_proc!r} must be an int >= 1.")
        if self.max_chars is not None and (not isinstance(self.max_chars, int) or self.max_chars < 1):
            raise ValueError(f"DataConfig.max_chars={self.max_chars!r} must be None (whole corpus) or an int >= 1.")
        if not isinstance(self.seed, int):
            raise ValueError(f"DataConfig.seed={self.seed!r} must be an int.")
        if self.files is not None:
            check_text_files(self.files)
        if self.dataset_dir is not None and not Path(self.dataset_dir).expanduser().exists():
            raise FileNotFoundError(f"DataConfig.dataset_dir {self.dataset_dir!r} does not exist; pass a Dataset.save_to_disk directory.")
        if self.tokenizer is not None:
            check_tokenizer_dir(self.tokenizer)

    def corpus(self) -> TextCorpus:
        """Resolve the text source (extracts the default corpus into the cache on first use)."""
        if self.files is not None:
            return TextCorpus.from_files(self.files, self.max_chars)
        if self.dataset_dir is not None:
            return TextCorpus.from_saved_dataset(self.dataset_dir, self.max_chars)
        return TextCorpus.default(default_cache_dir(self.cache_dir), self.max_chars)


@dataclass
class LMDatasets:
    """Result of :func:`build_lm_datasets`.

    ``train``/``validation`` have columns ``input_ids`` (``block_size`` token ids;
    torch format gives ``LongTensor``) and ``block_index`` (position of the
    block in the packed stream, for tracing). ``reused`` says whether the cache
    entry already existed.
    """

    train: datasets.Dataset
    validation: datasets.Dataset
    tokenizer: PreTrainedTokenizerBase
    cache_path: Path
    num_train_tokens: int
    reused: bool
    manifest: dict[str, Any] = field(default_factory=dict)


def _cache_keys(cfg: DataConfig, corpus_fp: str, tok_fp: str) -> dict[str, Any]:
    return {
        "format_version": _FORMAT_VERSION,
        "corpus_fingerprint": corpus_fp,
        "tokenizer_fingerprint": tok_fp,
        "block_size": cfg.block_size,
        "val_fraction": float(cfg.val_fraction),
        "seed": cfg.seed,
    }


def _require_cache_entry(path: Path, manifest: dict[str, Any] | None) -> None:
    """Refuse to touch an existing directory that is not one of our cache entries."""
    if manifest is None or manifest.get("kind") != "hmoe_ds.lm_dataset":
        raise ValueError(
            f"Tokenized cache {str(path)!r} exists but is not an hmoe_ds dataset cache (no valid manifest.json); "
            "refusing to overwrite it. Point DataConfig.tokenized_cache at a new directory, or delete it yourself."
        )


def _check_keys(path: Path, manifest: dict[str, Any], keys: dict[str, Any], tok_label: str) -> None:
    """Refuse to reuse a cache entry whose manifest does not match ``keys``."""
    if manifest.get("tokenizer_fingerprint") != keys["tokenizer_fingerprint"]:
        raise ValueError(
            f"Tokenized cache {str(path)!r} was built with tokenizer {manifest.get('tokenizer')!r} "
            f"(fingerprint {str(manifest.get('tokenizer_fingerprint'))[:16]}), but the tokenizer in use is {tok_label!r} "
            f"(fingerprint {keys['tokenizer_fingerprint'][:16]}). Fix: use the same tokenizer, point "
            "DataConfig.tokenized_cache at another directory (or None for the keyed cache), or set rebuild=True to replace it."
        )
    diff = {k: (manifest.get(k), v) for k, v in keys.items() if manifest.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: cached {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"Tokenized cache {str(path)!r} was built from different inputs ({detail}). Fix: point "
            "DataConfig.tokenized_cache at another directory (or None for the keyed cache), or set rebuild=True to replace it."
        )


def build_lm_datasets(cfg: DataConfig) -> LMDatasets:
    """Build (or reuse from cache) the packed train/validation datasets described by ``cfg``.

    Bad inputs raise before any tokenisation. Prints one line saying whether
    the cache was reused or built, and where. Safe to call from every rank at
    once (the first finished build wins, others discard theirs), but cheaper
    to call on rank 0, barrier, then on the other ranks.
    """
    cfg.validate()
    root = default_cache_dir(cfg.cache_dir)
    corpus = cfg.corpus()
    bound = corpus.max_tokens_bound()
    if 2 * cfg.block_size > bound:
        raise ValueError(
            f"DataConfig.block_size={cfg.block_size} is too large: the corpus {corpus.describe()} has at most {bound} "
            f"tokens, and two blocks (train + validation) are needed. Use block_size <= {bound // 2} or more text."
        )
    tok = load_tokenizer(cfg.tokenizer, corpus=corpus, vocab_size=cfg.vocab_size, cache_dir=root)
    keys = _cache_keys(cfg, corpus.fingerprint(), tokenizer_fingerprint(tok))
    key = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cfg.tokenized_cache).expanduser() if cfg.tokenized_cache else root / "datasets" / f"{corpus.name}-b{cfg.block_size}-{key}"

    reused = path.exists() and not cfg.rebuild
    if path.exists():
        manifest = read_manifest(path)
        _require_cache_entry(path, manifest)  # even rebuild=True must not replace foreign data
        if reused:
            _check_keys(path, manifest, keys, tokenizer_name(tok))
    if not reused:
        with atomic_directory(path, replace=cfg.rebuild) as tmp:
            _build(cfg, corpus, tok, keys, tmp)
    manifest = read_manifest(path) or {}
    train = datasets.load_from_disk(str(path / "train"))
    validation = datasets.load_from_disk(str(path / "validation"))
    train.set_format("torch")
    validation.set_format("torch")
    print(
        f"[hmoe_ds.data] {'reused' if reused else 'built'} tokenized cache at {path} "
        f"(train {train.num_rows} x {cfg.block_size} tokens, validation {validation.num_rows} blocks)",
        flush=True,
    )
    return LMDatasets(
        train=train,
        validation=validation,
        tokenizer=tok,
        cache_path=path,
        num_train_tokens=train.num_rows * cfg.block_size,
        reused=reused,
        manifest=manifest,
    )


# --------------------------------------------------------------------------
# build steps (module-level functions so datasets can pickle them for num_proc)
# --------------------------------------------------------------------------
def _gen_chunks(corpus: TextCorpus):
    for text, doc_end in corpus.iter_chunks():
        yield {"text": text, "doc_end": doc_end}


def _tokenize(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, eos_id: int) -> dict[str, list]:
    ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    return {"input_ids": [x + [eos_id] if end else x for x, end in zip(ids, batch["doc_end"])]}


def _gen_blocks(tokenized: datasets.Dataset, block_size: int):
    """Cut the concatenated token stream into consecutive full blocks, carrying the remainder across rows."""
    carry = np.empty(0, dtype=np.int32)
    index = 0
    for table in tokenized.with_format("arrow").iter(batch_size=256):
        flat = pc.list_flatten(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int32)
        stream = np.concatenate([carry, flat])
        n_full = len(stream) // block_size
        for row in stream[: n_full * block_size].reshape(n_full, block_size):
            yield {"input_ids": row, "block_index": index}
            index += 1
        carry = stream[n_full * block_size :]


def _build(cfg: DataConfig, corpus: TextCorpus, tok: PreTrainedTokenizerBase, keys: dict[str, Any], out: Path) -> None:
    work = out / "work"  # datasets' intermediate Arrow files; deleted before the atomic rename
    key = keys["corpus_fingerprint"][:16] + keys["tokenizer_fingerprint"][:16]
    raw = datasets.Dataset.from_generator(
        _gen_chunks,
        gen_kwargs={"corpus": corpus},
        features=datasets.Features({"text": datasets.Value("string"), "doc_end": datasets.Value("bool")}),
        cache_dir=str(work / "raw"),
        fingerprint=f"raw-{key}",
    )
    tokenized = raw.map(
        _tokenize,
        batched=True,
        batch_size=16,  # rows are ~64K chars: 16 rows ~ 1 MB of text per call
        fn_kwargs={"tokenizer": tok, "eos_id": tok.eos_token_id},
        remove_columns=raw.column_names,
        features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}),
        num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        new_fingerprint=f"tok-{key}",
        desc="Tokenizing",
    )
    num_tokens = int(pc.sum(pc.list_value_length(tokenized.data.column("input_ids"))).as_py() or 0)
    num_blocks = num_tokens // cfg.block_size
    if num_blocks < 2:
        raise ValueError(
            f"DataConfig.block_size={cfg.block_size} is larger than the data allows: the corpus has {num_tokens} tokens "
            f"with this tokenizer, i.e. {num_blocks} block(s), and at least 2 (train + validation) are needed. "
            f"Use block_size <= {num_tokens // 2} or more text."
        )
    num_val = max(1, round(num_blocks * cfg.val_fraction))
    if num_val >= num_blocks:
        raise ValueError(
            f"DataConfig.val_fraction={cfg.val_fraction} leaves no training data: {num_val} of {num_blocks} blocks "
            "would be validation. Lower val_fraction or block_size, or add text."
        )
    blocks = datasets.Dataset.from_generator(
        _gen_blocks,
        gen_kwargs={"tokenized": tokenized, "block_size": cfg.block_size},
        features=datasets.Features({
            "input_ids": datasets.Sequence(datasets.Value("int32"), length=cfg.block_size),
            "block_index": datasets.Value("int64"),
        }),
        cache_dir=str(work / "blocks"),
        fingerprint=f"blocks-{key}-{cfg.block_size}",
    )
    assert blocks.num_rows == num_blocks, (blocks.num_rows, num_blocks)
    perm = np.random.default_rng(cfg.seed).permutation(num_blocks)
    val_idx, train_idx = np.sort(perm[:num_val]), np.sort(perm[num_val:])
    blocks.select(train_idx).save_to_disk(str(out / "train"))
    blocks.select(val_idx).save_to_disk(str(out / "validation"))
    del raw, tokenized, blocks
    shutil.rmtree(work, ignore_errors=True)
    write_manifest(out, {
        "kind": "hmoe_ds.lm_dataset",
        **keys,
        "corpus": corpus.describe(),
        "tokenizer": tokenizer_name(tok),
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "num_tokens": num_tokens,
        "num_dropped_tokens": num_tokens - num_blocks * cfg.block_size,
        "num_blocks": num_blocks,
        "num_train_blocks": int(len(train_idx)),
        "num_val_blocks": int(len(val_idx)),
    })
