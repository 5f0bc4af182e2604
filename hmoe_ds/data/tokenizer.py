"""Tokenizers: a cached byte-level BPE trained on the corpus, or a local tokenizer directory.

Nothing is downloaded: a user tokenizer must be a local directory that
``AutoTokenizer.from_pretrained(dir)`` loads (e.g. written by
``save_pretrained``). The default is a byte-level BPE (GPT-2 style: no unknown
tokens, exact round trip) trained with ``tokenizers`` on the corpus in use and
cached under ``<cache>/tokenizers/`` keyed by (corpus fingerprint, vocab size).
A small vocabulary (8192) suits the small models this library trains on CPU:
a 50k vocabulary would dominate their parameter count.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .corpus import TextCorpus, atomic_directory, default_cache_dir, read_manifest, write_manifest

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "MIN_VOCAB_SIZE",
    "load_tokenizer",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|bos|>"
PAD_TOKEN = "<|pad|>"
_SPECIALS = [EOS_TOKEN, BOS_TOKEN, PAD_TOKEN]  # ids 0, 1, 2
#: 256 byte symbols + the special tokens: a byte-level BPE cannot be smaller.
MIN_VOCAB_SIZE = 256 + len(_SPECIALS)
_BPE_VERSION = 1  # bump when the training recipe changes


def train_bpe_tokenizer(corpus: TextCorpus, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of exactly ``vocab_size`` entries (specials included) on ``corpus``.

    Special tokens: ``<|endoftext|>`` (id 0, eos and document separator),
    ``<|bos|>`` (1), ``<|pad|>`` (2). Encoding adds no special tokens, so
    ``decode(encode(text)) == text`` for any string.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least {MIN_VOCAB_SIZE}.")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: the text is tokenised as written, so round trips are exact.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=True,
    )
    tok.train_from_iterator((chunk for chunk, _ in corpus.iter_chunks()), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=int(1e30),  # packing decides lengths; silence "sequence too long" warnings
    )
    if len(fast) != vocab_size:
        # Happens only when the corpus is too small to learn enough merges.
        raise ValueError(
            f"The corpus {corpus.describe()} only supports a BPE vocabulary of {len(fast)} < vocab_size={vocab_size}; "
            "lower vocab_size or use more text (max_chars)."
        )
    return fast


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of everything that determines token ids: the full backend tokenizer state and the eos token.

    Two tokenizers with the same fingerprint produce the same ids, whatever
    directory they were loaded from.
    """
    h = hashlib.sha256(b"hmoe_ds.tokenizer.v1|")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # to_str() holds vocab, merges, normalizer, pre-tokenizer and added tokens.
        h.update(backend.to_str().encode())
    else:  # slow (Python) tokenizer: the vocabulary and class are the best available proxy
        h.update(type(tokenizer).__name__.encode())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(f"|eos={tokenizer.eos_token!r}".encode())
    return h.hexdigest()


def tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """Where a tokenizer came from, for messages and manifests."""
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def check_tokenizer_dir(path: str | os.PathLike[str]) -> Path:
    """Fail fast if ``path`` is not a local directory (hmoe_ds never downloads tokenizers)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"Tokenizer directory {str(p)!r} does not exist. hmoe_ds never downloads from a hub: pass a local "
            "directory written by tokenizer.save_pretrained(dir), or tokenizer=None to train the default BPE."
        )
    return p


def load_tokenizer(
    tokenizer: str | os.PathLike[str] | None = None,
    *,
    corpus: TextCorpus | None = None,
    vocab_size: int = 8192,
    cache_dir: str | os.PathLike[str] | None = None,
) -> PreTrainedTokenizerBase:
    """Return the tokenizer for a run.

    Args:
        tokenizer: a local directory loadable by ``AutoTokenizer.from_pretrained``
            (loaded with ``local_files_only=True``), or ``None`` for the default
            byte-level BPE trained on ``corpus``.
        corpus: text to train the default BPE on; ``None`` = the default Shakespeare corpus.
            Ignored when ``tokenizer`` is a directory.
        vocab_size: size of the default BPE (including its 3 special tokens).
        cache_dir: cache root (default ``$HMOE_DS_CACHE`` or ``~/.cache/hmoe_ds``).

    The trained BPE is saved once to ``<cache>/tokenizers/bpe<recipe>-v<vocab>-<corpus fp>/``
    (atomic write) and reloaded from there on later calls, so every rank and
    every run of the same corpus gets identical ids. The returned tokenizer
    ``save_pretrained(dir)``s to a directory ``AutoTokenizer`` reloads offline.
    """
    if tokenizer is not None:
        d = check_tokenizer_dir(tokenizer)
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        if tok.eos_token_id is None:
            raise ValueError(
                f"Tokenizer {str(d)!r} has no eos_token; packing needs one to separate documents. "
                "Set tokenizer.eos_token (and save_pretrained again) or use another tokenizer."
            )
        return tok

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least {MIN_VOCAB_SIZE}.")
    root = default_cache_dir(cache_dir)
    corpus = corpus if corpus is not None else TextCorpus.default(root)
    corpus_fp = corpus.fingerprint()
    path = root / "tokenizers" / f"bpe{_BPE_VERSION}-v{vocab_size}-{corpus_fp[:16]}"
    manifest = read_manifest(path)
    if path.exists() and (manifest is None or manifest.get("corpus_fingerprint") != corpus_fp):
        # Our writes are atomic, so this is a foreign or hand-edited directory: do not touch it.
        raise ValueError(
            f"Tokenizer cache {str(path)!r} exists but its manifest.json is missing or records another corpus "
            f"(expected corpus fingerprint {corpus_fp}); delete that directory to retrain."
        )
    if manifest is None:
        print(f"[hmoe_ds.data] training byte-level BPE (vocab {vocab_size}) on {corpus.describe()} -> {path}", flush=True)
        t0 = time.time()
        tok = train_bpe_tokenizer(corpus, vocab_size)
        with atomic_directory(path) as tmp:
            tok.save_pretrained(str(tmp))
            write_manifest(tmp, {
                "kind": "hmoe_ds.bpe_tokenizer",
                "bpe_version": _BPE_VERSION,
                "corpus": corpus.describe(),
                "corpus_fingerprint": corpus_fp,
                "vocab_size": vocab_size,
                "train_seconds": round(time.time() - t0, 2),
            })
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
