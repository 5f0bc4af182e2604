"""The cluster-cost simulation (benchmarks/simulate_cluster.py) against hand counts and against the real dispatch.

The distributed test runs the real HMoE layer on 2 and 4 CPU ranks (gloo,
expert parallelism over all of them) and records the per-destination send
counts :class:`hmoe_ds.dispatch.AllToAllExchange` computes: the simulation fed
each rank's measured per-expert counts must reproduce them exactly, and fed
only the global shares (what a run logs) must predict every rank's
cross-rank and cross-"node" volume within a few percent.
"""

from __future__ import annotations

import pytest

from benchmarks.simulate_cluster import (
    Cluster,
    LayerRouting,
    layer_cost,
    layouts_for,
    main,
    node_aware_layout,
    redundant_layout,
    send_rows,
    step_cost,
)
from hmoe_ds.placement import balanced_placement

from .distributed import run_distributed

QUICKSTART = [144, 176, 208, 240, 272, 304, 336, 368]
SKEWED = (0.20, 0.17, 0.15, 0.13, 0.11, 0.10, 0.08, 0.06)


def test_layer_cost_by_hand() -> None:
    # 2 EP ranks on 2 nodes of 1 GPU; rank 0 holds expert 0, rank 1 expert 1.
    cost = layer_cost([[3, 5], [2, 4]], ((0,), (1,)), [10, 20], hidden_size=1, gpus_per_node=1)
    assert send_rows([[3, 5], [2, 4]], ((0,), (1,))) == [[3, 5], [2, 4]]
    assert cost.sent_inter == (5, 2) and cost.recv_inter == (2, 5) and cost.sent_intra == (0, 0)
    assert cost.flops == (2 * 3 * 10 * 5, 2 * 3 * 20 * 9)  # 2 * (3 d h) * assignments received
    assert cost.leave_node == pytest.approx(7 / 14)
    # The same ranks on one node: the traffic is intra-node.
    local = layer_cost([[3, 5], [2, 4]], ((0,), (1,)), [10, 20], hidden_size=1, gpus_per_node=2)
    assert local.sent_intra == (5, 2) and local.sent_inter == (0, 0) and local.leave_node == 0
    # A redundant copy splits its expert's assignments evenly: expert 0 on both ranks (2 + 2), expert 1 on rank 0.
    assert send_rows([[4, 6]], ((0, 1), (0,))) == [[2 + 6, 2]]


@pytest.mark.parametrize("ep, gpus", [(4, 2), (8, 2), (8, 4), (8, 1)])
def test_share_leaving_the_node_does_not_depend_on_placement(ep: int, gpus: int) -> None:
    """Tokens are spread over ranks independently of routing, so 1 - GPUs/EP of the assignments leave the node."""
    layers = [LayerRouting(SKEWED, 1.7)]
    for name in ("contiguous", "balanced", "measured", "node-aware"):
        layouts = layouts_for(name, QUICKSTART, ep, gpus, layers)
        cost = step_cost(layers, layouts, QUICKSTART, 128, Cluster(64, gpus), tokens_per_rank=1000)
        assert cost.leave_node == pytest.approx(1 - gpus / ep), name


def test_node_aware_gives_every_node_the_same_token_share() -> None:
    layout = node_aware_layout(QUICKSTART, 8, 2, SKEWED)
    node_share = [sum(SKEWED[e] for rank in layout[n * 2:(n + 1) * 2] for e in rank) for n in range(4)]
    assert max(node_share) - min(node_share) <= 0.02 + 1e-9  # 0.24 .. 0.26 (shares are 0.01 multiples)
    assert sorted(e for rank in layout for e in rank) == list(range(8))


def test_redundant_copies_even_out_ep_equals_experts_at_a_memory_cost() -> None:
    layers = [LayerRouting(SKEWED, 1.7)]
    cluster = Cluster(8, 8)
    plain = step_cost(layers, [redundant_layout(QUICKSTART, 8, SKEWED, 0)], QUICKSTART, 128, cluster, 1000)
    copies = step_cost(layers, [redundant_layout(QUICKSTART, 8, SKEWED, 8)], QUICKSTART, 128, cluster, 1000)
    assert copies.flops_imbalance < plain.flops_imbalance
    assert copies.params_max > plain.params_max
    layout = redundant_layout(QUICKSTART, 8, SKEWED, 8)
    assert all(len(rank) == 2 and len(set(rank)) == 2 for rank in layout)
    assert sorted(redundant_layout(QUICKSTART, 8, SKEWED, 0)) == [(e,) for e in range(8)]  # one expert each


def test_cli_prints_both_tables(capsys: pytest.CaptureFixture) -> None:
    code = main(["--sizes", *map(str, QUICKSTART), "--hidden-size", "128", "--shares", *map(str, SKEWED),
                 "--cluster", "4x2", "--ep", "2", "8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Expert placement at cluster scale" in out and "Redundant copies" in out and "node-aware" in out


# --------------------------------------------------------------------------- against the real dispatch

D = 16
SIZES = [16, 24, 32, 40, 48, 56, 64, 72]
TOKENS = 4096


def _dispatch_counts(rank: int, world_size: int) -> dict:
    """One forward of an EP=world HMoE layer on skewed routing; the send splits the exchange computed."""
    import torch

    from hmoe_ds import HMoE, collect_routing_stats
    from hmoe_ds.dispatch import AllToAllExchange

    recorded: list[list[int]] = []
    original = AllToAllExchange.to_experts

    def recording(self, x_AD, counts):
        rows, local_counts, context = original(self, x_AD, counts)
        recorded.append(list(context.send_splits))
        return rows, local_counts, context

    AllToAllExchange.to_experts = recording
    torch.manual_seed(0)
    layer = HMoE(D, SIZES, routing="top_k", top_k=2, ep_size=world_size, placement="balanced")
    with torch.no_grad():  # a router whose logits carry a per-expert bias: skewed, like a trained one
        layer.deepspeed_moe.gate.wg.weight.copy_(torch.randn(len(SIZES), D, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(10 + rank)) + 0.5
    with torch.no_grad(), collect_routing_stats() as stats:
        layer(x)
    return {"send": recorded[0], "counts": stats[0].assignments_per_expert.tolist(),
            "layout": [list(r) for r in layer.placement.rank_experts]}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_simulation_matches_the_dispatch_send_counts(world: int) -> None:
    results = run_distributed(_dispatch_counts, world_size=world)
    layout = tuple(tuple(r) for r in results[0]["layout"])
    assert layout == balanced_placement(SIZES, world).rank_experts
    counts = [r["counts"] for r in results]
    # Exact: fed each rank's measured counts, the model's per-destination rows are the dispatch's send splits.
    assert send_rows(counts, layout) == [[float(v) for v in r["send"]] for r in results]

    # Model: fed only what a run logs (global shares, experts per token), every rank's volume within 3 %.
    total = [sum(c[e] for c in counts) for e in range(len(SIZES))]
    routing = LayerRouting(tuple(t / sum(total) for t in total), sum(total) / (TOKENS * world))
    assert routing.experts_per_token == pytest.approx(2.0)
    assert max(routing.shares) > 2 * min(routing.shares), routing.shares  # the routing is really skewed
    gpus = 2 if world == 4 else 1  # 4 ranks as 2 nodes x 2 GPUs; 2 ranks as 2 nodes x 1 GPU
    measured = layer_cost(counts, layout, SIZES, D, gpus)
    model = layer_cost([[TOKENS * routing.experts_per_token * s for s in routing.shares]] * world, layout, SIZES,
                       D, gpus)
    for name in ("sent_intra", "sent_inter", "recv_intra", "recv_inter", "flops"):
        got, want = getattr(model, name), getattr(measured, name)
        for rank in range(world):
            assert got[rank] == pytest.approx(want[rank], rel=0.03, abs=1e-9), (name, rank, got, want)
    assert model.leave_node == pytest.approx(measured.leave_node, abs=0.01)


def test_routing_is_read_from_a_runs_metrics(tmp_path, capsys: pytest.CaptureFixture) -> None:
    import json

    from benchmarks.simulate_cluster import routing_from_run

    (tmp_path / "model_config.json").write_text(json.dumps({"hidden_size": 128, "moe": {"expert_sizes": QUICKSTART}}))
    records = []
    for step in (10, 20):
        record = {"step": step}
        for layer in range(2):
            record[f"moe/layer_{layer}/experts_per_token"] = 1.5 + layer
            for e, share in enumerate(SKEWED):
                record[f"moe/layer_{layer}/expert_{e}_token_fraction"] = share
        records.append(json.dumps(record))
    (tmp_path / "metrics.jsonl").write_text("\n".join(records) + "\n")
    layers, config = routing_from_run(tmp_path)
    assert [layer.experts_per_token for layer in layers] == [1.5, 2.5]
    assert all(layer.shares == pytest.approx(SKEWED) for layer in layers)
    assert main(["--run", str(tmp_path), "--model", "paper-3b", "--cluster", "64x4", "--ep", "8"]) == 0
    assert "3B" in capsys.readouterr().out
