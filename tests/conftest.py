"""Shared test set-up: CPU DeepSpeed accelerator, offline hubs, deterministic seeds."""

from __future__ import annotations

import os

# Must be set before deepspeed is imported anywhere in the test session.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- trained runs shared by test modules


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory):
    """One data cache (corpus slice, BPE tokenizer, packed dataset) for every launched run of the session."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def zero2_ep2_run(tmp_path_factory: pytest.TempPathFactory, data_cache):
    """Uninterrupted reference: 2 ranks, ZeRO-2 + CPU offload, EP=2 balanced; checkpoints at steps 3 and 6."""
    from .checkpoint_runs import reference_run

    return reference_run(tmp_path_factory.mktemp("zero2_ep2"), "zero2_offload", data_cache)


@pytest.fixture(scope="session")
def zero3_ep2_run(tmp_path_factory: pytest.TempPathFactory, data_cache):
    """Uninterrupted reference: 2 ranks, ZeRO-3 (AutoEP front-end), EP=2 balanced; checkpoints at steps 3 and 6."""
    from .checkpoint_runs import reference_run

    return reference_run(tmp_path_factory.mktemp("zero3_ep2"), "zero3", data_cache)
