"""Expert parallelism (uneven all-to-all) against the single-process layer. Starts 2 ranks."""

from __future__ import annotations

import pytest
import torch

from .distributed import run_distributed

D = 16
SIZES = [16, 24, 32, 40, 48, 56, 64, 72]


def _inputs(rank: int, tokens: int = 13) -> torch.Tensor:
    return torch.randn(tokens, D, generator=torch.Generator().manual_seed(100 + rank))


def _ep_vs_reference(rank: int, world_size: int, options: dict) -> dict:
    from hmoe_ds import HMoE, collect_routing_stats

    torch.manual_seed(0)
    full = HMoE(D, SIZES, **options)  # ep_size=1: every expert, same weights on every rank
    ep = HMoE(D, SIZES, ep_size=world_size, placement="balanced", **options)
    block = ep.deepspeed_moe
    block.gate.load_state_dict(full.deepspeed_moe.gate.state_dict())
    for slot, logical in enumerate(block.local_expert_ids):
        block.experts.deepspeed_experts[slot].load_state_dict(
            full.deepspeed_moe.experts.deepspeed_experts[logical].state_dict())

    x = _inputs(rank).requires_grad_(True)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(200 + rank))
    with collect_routing_stats() as stats:
        out, _, counts = ep(x)
    (out * upstream).sum().backward()

    # Reference: the full layer on every rank's tokens, one rank at a time.
    ref_out, ref_counts, ref_x_grad = None, None, None
    for r in range(world_size):
        xr = _inputs(r).requires_grad_(True)
        o, _, c = full(xr)
        (o * torch.randn(xr.shape, generator=torch.Generator().manual_seed(200 + r))).sum().backward()
        if r == rank:
            ref_out, ref_counts, ref_x_grad = o.detach(), c, xr.grad
    torch.testing.assert_close(out.detach(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_x_grad, rtol=1e-5, atol=1e-6)
    assert counts.tolist() == ref_counts.tolist()
    # Expert gradients: local experts received every rank's tokens through the all-to-all backward.
    for slot, logical in enumerate(block.local_expert_ids):
        mine = dict(block.experts.deepspeed_experts[slot].named_parameters())
        for name, p in full.deepspeed_moe.experts.deepspeed_experts[logical].named_parameters():
            torch.testing.assert_close(mine[name].grad, p.grad, rtol=1e-5, atol=1e-6)
    return {"local_experts": list(block.local_expert_ids), "dropped": stats[-1].dropped_assignments}


OPTION_SETS = {
    "top2-dropless": dict(routing="top_k", top_k=2),
    "top_p-dropless": dict(routing="top_p", top_p=0.6),
    "top2-capacity": dict(routing="top_k", top_k=2, capacity_factor=0.5, min_capacity=1),
}


def _all_cases(rank: int, world_size: int) -> dict:
    # One set of processes for every case: spawning ranks costs more than the cases.
    return {name: _ep_vs_reference(rank, world_size, options) for name, options in OPTION_SETS.items()}


@pytest.mark.slow
@pytest.mark.distributed
def test_expert_parallel_layer_matches_single_process():
    """2 ranks, EP=2, balanced placement: Top-2 and Top-P dropless, Top-2 with capacity."""
    results = run_distributed(_all_cases, world_size=2)
    for name in OPTION_SETS:
        per_rank = [r[name] for r in results]
        held = sorted(e for r in per_rank for e in r["local_experts"])
        assert held == list(range(len(SIZES))), name
        # balanced placement pairs large with small experts: equal total size per rank
        sizes_per_rank = [sum(SIZES[e] for e in r["local_experts"]) for r in per_rank]
        assert sizes_per_rank[0] == sizes_per_rank[1], name
    assert sum(r["top2-capacity"]["dropped"] for r in results) > 0
