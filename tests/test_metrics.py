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
    from PIL import Image

    with Image.open(tmp_path / "expert_load.png") as png:
        png_size = png.size
    assert png_size[0] > 400 and png_size[1] > 200

    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/lm_loss", "val/loss", "moe/layer_1/expert_2_token_fraction"} <= set(tags["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("train/lm_loss")] == [(10, 3.5), (20, 3.0)]
    assert "moe/expert_load" in tags["images"]
    (image,) = events.Images("moe/expert_load")
    assert (image.step, image.width, image.height) == (20, *png_size)  # one picture, the file's


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


# ---- which tags a run writes (issue: no constant charts, per-expert tags opt-in, DeepSpeed's tags on steps)


def layer_config(**overrides: Any) -> Any:
    from hmoe_ds.config import HMoELayerConfig

    return HMoELayerConfig(**{"expert_sizes": [32, 64, 96, 128], **overrides})


def test_layer_tags_leave_out_what_routing_fixes() -> None:
    from hmoe_ds.training.metrics import PER_EXPERT_AUTO_LIMIT, LayerTags, layer_tags

    # Top-P, dropless, EP 1: experts per token and activated params vary; drops and EP tags cannot.
    assert layer_tags(layer_config(routing="top_p")) == LayerTags(
        per_expert=True, experts_per_token=True, activated_params=True, dropped_assignments=False, ep_flops=False)
    # Top-K dropless: always K experts; unequal sizes still vary the activated parameters.
    topk = layer_tags(layer_config(routing="top_k"))
    assert not topk.experts_per_token and topk.activated_params
    # ... equal sizes: K * params every token.
    assert not layer_tags(layer_config(routing="top_k", expert_sizes=[64] * 4)).activated_params
    # A capacity limit can drop assignments, so all three vary.
    capped = layer_tags(layer_config(routing="top_k", expert_sizes=[64] * 4, capacity_factor=1.0))
    assert capped.experts_per_token and capped.activated_params and capped.dropped_assignments
    assert layer_tags(layer_config(ep_size=2)).ep_flops
    # Per-expert tags: auto up to the limit, or forced.
    many = [64] * (PER_EXPERT_AUTO_LIMIT + 1)
    assert layer_tags(layer_config(expert_sizes=[64] * PER_EXPERT_AUTO_LIMIT)).per_expert
    assert not layer_tags(layer_config(expert_sizes=many)).per_expert
    assert layer_tags(layer_config(expert_sizes=many), "always").per_expert
    assert not layer_tags(layer_config(), "never").per_expert
    with pytest.raises(ValueError, match="per_expert_metrics='some'"):
        layer_tags(layer_config(), "some")


def test_routing_scalars_write_only_the_tags_asked_for() -> None:
    from hmoe_ds.training.metrics import LayerTags

    acc = RoutingAccumulator()
    acc.update([stats([1, 3], 2, sizes=(32, 64)), stats([2, 2], 2, sizes=(32, 64))])
    loads = acc.reduce()
    every = routing_scalars(loads, 0)
    quiet = LayerTags(per_expert=False, experts_per_token=False, activated_params=False, dropped_assignments=False)
    some = routing_scalars(loads, 0, tags=[quiet, LayerTags()])
    assert set(some) < set(every)
    assert not [t for t in some if t.startswith("moe/layer_0/") and not t.split("/")[-1].startswith(("load_", "dead"))]
    assert {t for t in every if t.startswith("moe/layer_1/")} <= set(some)
    assert "moe/activated_params_per_token" in some  # layer 1's varies, so the model's does
    only_quiet = routing_scalars(loads, 0, tags=[quiet, quiet])
    assert "moe/activated_params_per_token" not in only_quiet and "moe/mean_experts_per_token" not in only_quiet
    assert all(some[t] == every[t] for t in some)
    with pytest.raises(ValueError, match="1 LayerTags for 2 MoE layers"):
        routing_scalars(loads, 0, tags=[quiet])


def test_ep_load_scalars_with_tags_keep_only_the_flops_of_ep_layers() -> None:
    from hmoe_ds.placement import ExpertPlacement
    from hmoe_ds.training.metrics import LayerTags, ep_load_scalars

    acc = RoutingAccumulator()
    acc.update([stats([4, 8, 12, 16], 40, sizes=(1, 2, 3, 4)), stats([1, 1, 1, 1], 4, sizes=(1, 2, 3, 4))])
    loads = acc.reduce()
    placements = [ExpertPlacement(((0, 1), (2, 3))), ExpertPlacement(((0, 1, 2, 3),))]
    every = ep_load_scalars(loads, placements, steps=1, world_size=2)
    ran = ep_load_scalars(loads, placements, steps=1, world_size=2,
                          tags=[LayerTags(ep_flops=True), LayerTags(ep_flops=False)])
    assert set(ran) == {"moe/layer_0/ep_rank_0_expert_flops_per_step", "moe/layer_0/ep_rank_1_expert_flops_per_step",
                        "moe/layer_0/ep_flops_imbalance"}
    assert all(ran[t] == every[t] for t in ran)


def test_layout_without_per_expert_tags_charts_only_what_is_written() -> None:
    import re

    from hmoe_ds.training.metrics import LayerTags

    tags = [LayerTags(per_expert=False), LayerTags()]
    layout = custom_scalars_layout([(32, 64), (32, 64)], tags=tags)
    assert not any("per expert" in title for title in layout["MoE layer 0"])
    assert any("per expert" in title for title in layout["MoE layer 1"])
    acc = RoutingAccumulator()
    acc.update([stats([1, 3], 2, sizes=(32, 64)), stats([2, 2], 2, sizes=(32, 64))])
    written = set(routing_scalars(acc.reduce(), 0, tags=tags))
    for charts in list(layout.values())[1:]:
        for _, regexes in charts.values():
            assert all(any(re.fullmatch(r, t) for t in written) for r in regexes), regexes


def test_constant_facts_name_the_constants_and_the_placement() -> None:
    from hmoe_ds.placement import ExpertPlacement
    from hmoe_ds.training.metrics import constant_facts, layer_tags

    configs = [layer_config(routing="top_k", top_k=2, expert_sizes=[64] * 4), layer_config(routing="top_p")]
    tags = [layer_tags(c) for c in configs]
    placements = [ExpertPlacement(((0, 1), (2, 3))), ExpertPlacement(((0, 3), (1, 2)))]
    params = [[3 * 8 * h for h in c.expert_sizes] for c in configs]
    text = constant_facts(configs, tags, placements, params)
    rows = text.splitlines()
    assert rows[2] == ("| 0 | 64, 64, 64, 64 | top_k (k=2) | 2 experts; 3,072 expert params; "
                       "0 dropped (no capacity limit) | 3,072, 3,072 (1.000) |")
    # {32, 128} vs {64, 96} on two EP ranks: 3*8*160 each
    assert rows[3] == "| 1 | 32, 64, 96, 128 | top_p (p=0.6) | 0 dropped (no capacity limit) | 3,840, 3,840 (1.000) |"


def test_step_aligned_monitor_moves_deepspeeds_samples_events_onto_steps(tmp_path: Path, tb_monitor: Any) -> None:
    from hmoe_ds.training.metrics import StepAlignedMonitor

    monitor = StepAlignedMonitor(tb_monitor, samples_per_step=16)
    assert monitor.enabled and monitor.tb_monitor is tb_monitor.tb_monitor  # the rest passes through
    for step in (1, 2):  # as DeepSpeed's engine writes them after step `step`: x = samples seen
        monitor.write_events([("Train/Samples/lr", 1e-3, 16 * step),
                              ("Train/Samples/elapsed_time_ms_forward", 5.0 * step, 16 * step)])
        monitor.write_events([("train/lm_loss", 3.0 / step, step)])
    tb_monitor.tb_monitor.summary_writer.flush()
    events = EventAccumulator(str(tmp_path / "tb" / "run"), size_guidance={"scalars": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"deepspeed/elapsed_time_ms_forward", "train/lm_loss"}
    assert [(e.step, e.value) for e in events.Scalars("deepspeed/elapsed_time_ms_forward")] == [(1, 5.0), (2, 10.0)]
    assert [e.step for e in events.Scalars("train/lm_loss")] == [1, 2]
    with pytest.raises(ValueError, match="samples_per_step=0"):
        StepAlignedMonitor(tb_monitor, 0)


def test_record_only_scalars_reach_metrics_jsonl_but_not_tensorboard(tmp_path: Path, tb_monitor: Any) -> None:
    writer = MetricsWriter(tmp_path, tb_monitor, tmp_path / "tb" / "run", is_writer=True)
    writer.write(3, {"train/lm_loss": 2.0}, record_only={"moe/layer_0/ep_rank_0_expert_params": 10.0})
    writer.write_text("run/constants", "| a | b |\n|---|---|\n| 1 | 2 |")
    writer.close()
    (record,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert record["train/lm_loss"] == 2.0 and record["moe/layer_0/ep_rank_0_expert_params"] == 10.0
    events = EventAccumulator(str(tmp_path / "tb" / "run"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert events.Tags()["scalars"] == ["train/lm_loss"]
    assert "run/constants/text_summary" in events.Tags()["tensors"]


def test_run_config_refuses_an_unknown_per_expert_metrics() -> None:
    from hmoe_ds.training.experiment import RunConfig

    with pytest.raises(ValueError, match="per_expert_metrics='yes'.*'auto'"):
        RunConfig(output_dir="x", per_expert_metrics="yes").validate()
