"""Metrics: accumulation over micro-batches, routing scalars, metrics.jsonl and TensorBoard events.

Single process. Scalars go through DeepSpeed's own ``TensorBoardMonitor`` (as in
training) and are read back with TensorBoard's ``EventAccumulator``.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hmoe_ds.moe_core import RoutingStats, collect_routing_stats
from hmoe_ds.modeling import HMoEForCausalLM, debug_config, parameter_summary
from hmoe_ds.training.evaluate import evaluate, format_routing_table
from hmoe_ds.training.metrics import (
    MetricsWriter,
    RoutingAccumulator,
    TrainAccumulator,
    custom_scalars_layout,
    read_jsonl,
    routing_scalars,
    spread_scalars,
)


def stats(counts: list[int], num_tokens: int, sizes: tuple[int, ...] = (1, 2, 3), dropped: int = 0) -> RoutingStats:
    """RoutingStats by hand; expert params = size, so activated params are easy to compute."""
    kept = torch.tensor(counts)
    return RoutingStats(
        num_tokens=num_tokens,
        assignments_per_expert=kept,
        selected_per_expert=kept + torch.tensor([dropped] + [0] * (len(counts) - 1)),
        dropped=torch.tensor(dropped),
        loss_values={"p_penalty": torch.tensor(1.0)},
        expert_sizes=sizes,
        expert_params=sizes,
    )


def output(lm: float, aux: float, routing: list[RoutingStats]) -> SimpleNamespace:
    return SimpleNamespace(lm_loss=torch.tensor(lm), aux_loss=torch.tensor(aux),
                           aux_losses={"p_penalty": torch.tensor(aux * 10)}, routing_stats=routing)


def test_routing_is_summed_over_micro_batches_not_last_only() -> None:
    acc = RoutingAccumulator()
    acc.update([stats([4, 0, 0], num_tokens=4)])
    acc.update([stats([0, 2, 6], num_tokens=4, dropped=1)])
    (load,) = acc.reduce()
    assert load.token_fraction == pytest.approx([4 / 12, 2 / 12, 6 / 12])
    assert load.experts_per_token == pytest.approx(13 / 8)  # chosen, drops included
    assert load.dropped_assignments == 1
    assert load.activated_params_per_token == pytest.approx((4 * 1 + 2 * 2 + 6 * 3) / 8)
    assert acc.reduce()[0].num_tokens == 0  # reset after reduce


def test_train_accumulator_means_and_throughput() -> None:
    acc = TrainAccumulator()
    acc.update(output(4.0, 0.1, [stats([1, 1, 2], 2)]), num_tokens=100)
    acc.update(output(2.0, 0.3, [stats([1, 1, 2], 2)]), num_tokens=100)
    scalars, loads = acc.reduce()
    assert scalars["train/lm_loss"] == pytest.approx(3.0)
    assert scalars["train/aux_loss"] == pytest.approx(0.2)
    assert scalars["train/aux/p_penalty"] == pytest.approx(2.0)
    assert scalars["perf/tokens_per_s"] > 0 and len(loads) == 1
    moe = routing_scalars(loads, non_expert_params=1000)
    assert sum(moe[f"moe/layer_0/expert_{e}_token_fraction"] for e in range(3)) == pytest.approx(1.0)
    assert moe["moe/activated_params_per_token"] == pytest.approx(1000 + 2 * (1 * 1 + 1 * 2 + 2 * 3) / 4)
    assert moe["moe/mean_experts_per_token"] == pytest.approx(2.0)


@pytest.fixture
def tb_monitor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """DeepSpeed's real TensorBoard monitor, as engine.monitor builds it on rank 0 (no process group here)."""
    from deepspeed.monitor.config import get_monitor_config
    from deepspeed.monitor.monitor import MonitorMaster

    monkeypatch.setattr("deepspeed.comm.get_rank", lambda *a, **k: 0)
    config = get_monitor_config({"tensorboard": {"enabled": True, "output_path": str(tmp_path / "tb"), "job_name": "run"}})
    return MonitorMaster(config)


def test_writer_writes_jsonl_and_tensorboard(tmp_path: Path, tb_monitor: Any) -> None:
    tb_dir = tmp_path / "tb" / "run"
    writer = MetricsWriter(tmp_path, tb_monitor, tb_dir, is_writer=True)
    acc = RoutingAccumulator()
    acc.update([stats([3, 2, 1], 3), stats([1, 1, 4], 3)])
    loads = acc.reduce()
    writer.write(10, {"train/lm_loss": 3.5, "train/grad_norm": float("nan"), **routing_scalars(loads, 10)})
    writer.write(20, {"train/lm_loss": 3.0, "val/loss": 3.2})
    writer.write_expert_load(20, loads)
    writer.close()

    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20]
    assert records[0]["train/grad_norm"] is None  # NaN has no JSON form
    assert records[1]["val/loss"] == 3.2
    assert (tmp_path / "expert_load.png").stat().st_size > 0

    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/lm_loss", "val/loss", "moe/layer_1/expert_2_token_fraction"} <= set(tags["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("train/lm_loss")] == [(10, 3.5), (20, 3.0)]
    assert "moe/expert_load" in tags["images"]


def test_spread_statistics_of_a_layer() -> None:
    """min / max token fraction, CV of the loads (population std / mean), experts with no assignment."""
    acc = RoutingAccumulator()
    acc.update([stats([0, 10, 30, 60], 50, sizes=(1, 2, 3, 4))])
    (load,) = acc.reduce()
    spread = spread_scalars(load, "moe/layer_0")
    assert spread["moe/layer_0/load_min"] == 0.0 and spread["moe/layer_0/load_max"] == pytest.approx(0.6)
    assert spread["moe/layer_0/load_cv"] == pytest.approx(math.sqrt((25**2 + 15**2 + 5**2 + 35**2) / 4) / 25)
    assert spread["moe/layer_0/dead_experts"] == 1.0
    assert {k: v for k, v in routing_scalars([load], 0).items() if k in spread} == spread
    even = RoutingAccumulator()
    even.update([stats([5, 5, 5, 5], 10, sizes=(1, 2, 3, 4))])
    assert spread_scalars(even.reduce()[0], "x") == {"x/load_min": 0.25, "x/load_max": 0.25, "x/load_cv": 0.0,
                                                     "x/dead_experts": 0.0}


def test_custom_scalars_layout_puts_losses_first_and_one_chart_of_expert_shares_per_layer() -> None:
    import re

    layout = custom_scalars_layout([(32, 64), (32, 64)])
    assert list(layout) == ["losses", "MoE layer 0", "MoE layer 1"]
    acc = RoutingAccumulator()
    acc.update([stats([1, 3], 2, sizes=(32, 64)), stats([2, 2], 2, sizes=(32, 64))])
    tags = set(routing_scalars(acc.reduce(), 0))
    (title, (kind, (regex,))) = next(iter(layout["MoE layer 1"].items()))
    assert kind == "Multiline" and "0: 32, 1: 64" in title
    assert {t for t in tags if re.fullmatch(regex, t)} == {"moe/layer_1/expert_0_token_fraction",
                                                           "moe/layer_1/expert_1_token_fraction"}
    for charts in list(layout.values())[1:]:  # every regex of a layer's charts matches a tag that is written
        for _, regexes in charts.values():
            assert all(any(re.fullmatch(r, t) for t in tags) for r in regexes), regexes


def test_writer_writes_the_layout_and_a_load_histogram_per_layer(tmp_path: Path) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata as cs_metadata

    tb_dir = tmp_path / "tb"
    writer = MetricsWriter(tmp_path, None, tb_dir, is_writer=True)
    acc = RoutingAccumulator()
    acc.update([stats([3, 2, 1], 3), stats([1, 1, 4], 3)])
    loads = acc.reduce()
    writer.write_layout([load.expert_sizes for load in loads])
    writer.write_load_histograms(7, loads)
    writer.close()
    events = EventAccumulator(str(tb_dir), size_guidance={"histograms": 0, "tensors": 0})
    events.Reload()
    assert set(events.Tags()["histograms"]) == {"moe/layer_0/expert_load", "moe/layer_1/expert_load"}
    (hist,) = events.Histograms("moe/layer_1/expert_load")
    assert hist.step == 7 and hist.histogram_value.num == 3
    assert hist.histogram_value.sum == pytest.approx(1.0)  # the three fractions sum to 1
    (config,) = events.Tensors(cs_metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout()
    layout.ParseFromString(config.tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["losses", "MoE layer 0", "MoE layer 1"]


def test_writer_is_silent_off_rank_zero(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "other", None, tmp_path / "tb", is_writer=False)
    writer.write(1, {"train/lm_loss": 1.0})
    writer.write_expert_load(1, [])
    writer.close()
    assert not (tmp_path / "other").exists() and not (tmp_path / "tb").exists()


def test_append_keeps_earlier_records(tmp_path: Path) -> None:
    for step, append in ((1, False), (2, True)):
        writer = MetricsWriter(tmp_path, None, None, is_writer=True, append=append)
        writer.write(step, {"train/lm_loss": 1.0})
        writer.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_evaluate_on_a_tiny_model() -> None:
    model = HMoEForCausalLM(debug_config())
    batches = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 512, (5, 2, 16))]
    result = evaluate(model, batches, num_batches=3)
    assert result.batches == 3 and result.tokens == 3 * 2 * 15
    assert math.isfinite(result.loss) and result.ppl == pytest.approx(math.exp(result.loss))
    assert len(result.loads) == len(model.moe_layers())
    assert model.training  # restored
    non_expert = int(parameter_summary(model)["non_expert_params"])
    table = format_routing_table(result, non_expert)
    assert "e3:128" in table and "activated params per token" in table
    payload = result.to_dict(non_expert)
    assert payload["activated_params_per_token"] > non_expert
    assert sum(payload["moe_layers"][0]["token_fraction"]) == pytest.approx(1.0)


def test_ep_load_scalars_per_rank_params_flops_and_imbalance() -> None:
    """Hand-computed: params = (1, 2, 3, 4), kept tokens (10, 20, 30, 40), 2 steps on 4 ranks."""
    from hmoe_ds.placement import ExpertPlacement
    from hmoe_ds.training.metrics import ep_load_scalars

    acc = RoutingAccumulator()
    acc.update([stats([4, 8, 12, 16], 40, sizes=(1, 2, 3, 4))])
    acc.update([stats([6, 12, 18, 24], 60, sizes=(1, 2, 3, 4))])
    (load,) = acc.reduce()
    assert load.expert_params == (1, 2, 3, 4)

    contiguous = ExpertPlacement(((0, 1), (2, 3)))
    s = ep_load_scalars([load], [contiguous], steps=2, world_size=4)
    # ep 2 on 4 ranks: 2 replicas per EP rank; FLOPs = 2 * params * tokens / (steps * replicas)
    assert s["moe/layer_0/ep_rank_0_expert_params"] == 3 and s["moe/layer_0/ep_rank_1_expert_params"] == 7
    assert s["moe/layer_0/ep_rank_0_expert_flops_per_step"] == pytest.approx(2 * (1 * 10 + 2 * 20) / 4)  # 25
    assert s["moe/layer_0/ep_rank_1_expert_flops_per_step"] == pytest.approx(2 * (3 * 30 + 4 * 40) / 4)  # 125
    assert s["moe/layer_0/ep_params_imbalance"] == pytest.approx(7 / 5)
    assert s["moe/layer_0/ep_flops_imbalance"] == pytest.approx(125 / 75)

    paired = ExpertPlacement(((0, 3), (1, 2)))
    s = ep_load_scalars([load], [paired], steps=2, world_size=4)
    assert s["moe/layer_0/ep_params_imbalance"] == pytest.approx(1.0)
    assert s["moe/layer_0/ep_rank_0_expert_flops_per_step"] == pytest.approx(2 * (10 + 160) / 4)  # 85
    assert s["moe/layer_0/ep_flops_imbalance"] == pytest.approx(85 / 75)

    single = ep_load_scalars([load], [ExpertPlacement(((0, 1, 2, 3),))], steps=2, world_size=2)
    assert single["moe/layer_0/ep_rank_0_expert_params"] == 10
    assert single["moe/layer_0/ep_rank_0_expert_flops_per_step"] == pytest.approx(2 * 300 / (2 * 2))
    assert single["moe/layer_0/ep_flops_imbalance"] == 1.0
    assert not any("ep_rank_1" in k for k in single)

    with pytest.raises(ValueError, match="2 placements for 1 MoE layers"):
        ep_load_scalars([load], [contiguous, paired], steps=1, world_size=4)


def test_ep_load_scalars_count_three_d_h_per_token_on_a_real_layer() -> None:
    """From a real HMoE layer: rank FLOPs = 2 * sum_e 3*d*h_e * tokens_e (SwiGLU experts, forward)."""
    from hmoe_ds import HMoE
    from hmoe_ds.training.metrics import ep_load_scalars

    d, sizes = 8, [2, 4, 6, 8]
    layer = HMoE(hidden_size=d, expert_sizes=sizes, routing="top_k", top_k=2)
    with collect_routing_stats() as stats:
        layer(torch.randn(3, 5, d))
    acc = RoutingAccumulator()
    acc.update(stats)
    (load,) = acc.reduce()
    s = ep_load_scalars([load], [layer.placement], steps=1, world_size=1)
    counts = stats[0].assignments_per_expert.tolist()
    assert sum(counts) == 3 * 5 * 2
    assert s["moe/layer_0/ep_rank_0_expert_params"] == sum(3 * d * h for h in sizes)
    assert s["moe/layer_0/ep_rank_0_expert_flops_per_step"] == pytest.approx(
        sum(2 * 3 * d * h * c for h, c in zip(sizes, counts))
    )


def test_read_jsonl_skips_a_last_line_still_being_written(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "train/lm')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"step": \n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_jsonl(path)
