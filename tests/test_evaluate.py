"""Validation is independent of the world size: every example counted once, no rank left waiting.

Starts 2 ranks (gloo) with expert parallelism (EP=2), so every forward holds
all-to-alls that both ranks must join, on validation sets that split unevenly
across ranks (including a rank with no example at all), and compares with one
process evaluating every example.
"""

from __future__ import annotations

import datasets
import pytest
import torch

from hmoe_ds.data.loader import EvalBatchIterator
from hmoe_ds.modeling import HMoEForCausalLM, debug_config
from hmoe_ds.training.evaluate import evaluate

from .distributed import run_distributed

MICRO = 2


def _examples(count: int) -> datasets.Dataset:
    ids = torch.randint(0, 512, (count, 16), generator=torch.Generator().manual_seed(7))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def _model(ep_size: int) -> HMoEForCausalLM:
    torch.manual_seed(0)  # per-logical-expert initialisation: the same model for any EP size
    return HMoEForCausalLM(debug_config(moe={"ep_size": ep_size, "placement": "balanced"}))


def _dense_weights(model: HMoEForCausalLM) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if getattr(p, "allreduce", True)}


def _evaluate_on_ranks(rank: int, world_size: int, counts: list[int]) -> dict:
    model = _model(ep_size=world_size)
    results = []
    for count in counts:
        batches = EvalBatchIterator(_examples(count), MICRO, rank=rank, world_size=world_size)
        result = evaluate(model, batches, num_batches=1000)
        results.append({"loss": result.loss, "tokens": result.tokens, "batches": result.batches,
                        "fractions": result.loads[0].token_fraction})
    return {"results": results, "dense": _dense_weights(model)}


@pytest.mark.slow
@pytest.mark.distributed
def test_uneven_validation_split_counts_every_example_once_with_expert_parallelism() -> None:
    """2 ranks, EP=2: 5 examples (rank 0: 2 batches, rank 1: 1) and 1 example (rank 1: none)."""
    counts = [5, 1]
    per_rank = run_distributed(_evaluate_on_ranks, world_size=2, timeout=300, counts=counts)
    reference = _model(ep_size=1)
    for rank, got in enumerate(per_rank):  # building fewer experts per rank leaves the dense init alone
        for name, value in _dense_weights(reference).items():
            torch.testing.assert_close(got["dense"][name], value, rtol=0, atol=0, msg=f"rank {rank}: {name}")
    per_rank = [got["results"] for got in per_rank]
    for i, count in enumerate(counts):
        expected = evaluate(reference, EvalBatchIterator(_examples(count), MICRO), num_batches=1000)
        assert expected.tokens == count * 15
        for rank, results in enumerate(per_rank):
            got = results[i]
            assert got["tokens"] == expected.tokens, (count, rank)
            assert got["loss"] == pytest.approx(expected.loss, rel=1e-5), (count, rank)
            assert got["fractions"] == pytest.approx(expected.loads[0].token_fraction, abs=1e-6), (count, rank)
        own_batches = [r[i]["batches"] for r in per_rank]
        assert own_batches == ([2, 1] if count == 5 else [1, 0])


def test_num_batches_limits_each_rank_alone() -> None:
    model = _model(ep_size=1)
    result = evaluate(model, EvalBatchIterator(_examples(5), MICRO), num_batches=2)
    assert result.batches == 2 and result.tokens == 4 * 15


def test_evaluation_releases_what_zero3_gathered() -> None:
    """After the forwards, ``engine.empty_partition_cache()`` (ZeRO-3 keeps the gathered model otherwise)."""

    class Engine(torch.nn.Module):  # the two things evaluate uses of a DeepSpeed engine, plus the release
        def __init__(self) -> None:
            super().__init__()
            self.module = _model(ep_size=1)
            self.released = 0

        def forward(self, **batch: torch.Tensor):
            assert self.released == 0  # released after the last forward, not before
            return self.module(**batch)

        def empty_partition_cache(self) -> None:
            self.released += 1

    engine = Engine()
    batches = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 512, (3, 2, 16))]
    evaluate(engine, batches, num_batches=3)
    assert engine.released == 1
