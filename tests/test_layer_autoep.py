"""The ZeRO-3 front-end as DeepSpeed's engine sees it, and the layer protocol both front-ends satisfy."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from .distributed import run_distributed

SIZES = [16, 24, 32, 40]
D = 8


def test_every_engine_attribute_is_still_read_by_deepspeeds_engine():
    """ENGINE_ATTRIBUTES names what the engine does with each attribute: each must still be read there."""
    import deepspeed.runtime.engine as engine

    from hmoe_ds.layer_autoep import ENGINE_ATTRIBUTES

    source = inspect.getsource(engine)
    for attribute, purpose in ENGINE_ATTRIBUTES.items():
        assert re.search(rf"\bmodule\.{attribute}\b", source), f"the engine no longer reads module.{attribute}"
        for function in re.findall(r"\b(_?[a-z_]+)(?= ?[:/])", purpose):
            if function.startswith("_") or function.startswith("load_"):
                assert f"def {function}(" in source, f"{attribute}: the engine has no {function} any more"


def _build_both_frontends(rank: int, world_size: int) -> dict:
    from hmoe_ds import HMoELayerConfig, MoELayer, build_moe_layer
    from hmoe_ds.layer_autoep import ENGINE_ATTRIBUTES, HMoEAutoEP

    autoep = build_moe_layer(D, HMoELayerConfig(expert_sizes=SIZES, ep_size=world_size, frontend="autoep"))
    moe = build_moe_layer(D, HMoELayerConfig(expert_sizes=SIZES, ep_size=world_size))
    assert isinstance(autoep, HMoEAutoEP)
    out = {"missing": [a for a in ENGINE_ATTRIBUTES if not hasattr(autoep, a)]}
    for layer, name in ((autoep, "autoep"), (moe, "moe")):
        core = layer.moe_core
        out[name] = {
            "protocol": isinstance(layer, MoELayer),
            "logical_experts": layer.config.num_experts,
            "local": list(core.local_expert_ids),
            "sizes": layer.expert_sizes,
            "placement_ranks": layer.placement.ep_size,
        }
    out["autoep"]["deepspeed_num_experts"] = autoep.num_experts  # packs, one per EP rank
    out["autoep"]["num_local_experts"] = autoep.num_local_experts
    x = torch.randn(5, D)
    for layer, name in ((autoep, "autoep"), (moe, "moe")):
        y, l_aux, counts = layer(x)
        out[name]["shapes"] = (tuple(y.shape), tuple(l_aux.shape), tuple(counts.shape))
    return out


def test_both_frontends_satisfy_the_layer_protocol_and_autoep_sets_what_the_engine_reads():
    for rank, result in enumerate(run_distributed(_build_both_frontends, world_size=2)):
        assert result["missing"] == []
        for name in ("autoep", "moe"):
            r = result[name]
            assert r["protocol"] and r["logical_experts"] == len(SIZES) and r["sizes"] == SIZES
            assert r["placement_ranks"] == 2 and len(r["local"]) == 2
            assert r["shapes"] == ((5, D), (), (len(SIZES),))
        # DeepSpeed counts packs (one per EP rank); hmoe-ds code reads config.num_experts.
        assert result["autoep"]["deepspeed_num_experts"] == 2 and result["autoep"]["num_local_experts"] == 1
        assert result["autoep"]["local"] == result["moe"]["local"]


def test_non_gated_packs_have_a_zero_w3_placeholder_that_deepspeed_can_checkpoint():
    """gelu/relu: ``experts.w3`` is a [1, 1, D] zero parameter, never computed with, with a zero gradient."""
    from hmoe_ds.experts import PackedHeteroExperts

    for activation in ("gelu", "relu"):
        experts = PackedHeteroExperts(D, SIZES, activation, "loop", padded_width=sum(SIZES) + 8)
        assert experts.w3_is_placeholder and tuple(experts.w3.shape) == (1, 1, D)
        assert torch.count_nonzero(experts.w3) == 0
        assert all(w3 is None for _, _, w3 in experts.per_expert_weights())
        assert [p for p, _ in experts.full_values(experts.per_expert_weights())] == [experts.w1, experts.w2]
        out = experts(torch.randn(4 * len(SIZES), D), [4] * len(SIZES))
        out.square().sum().backward()
        assert experts.w3.grad is not None and torch.count_nonzero(experts.w3.grad) == 0
        assert experts.w1.grad.abs().sum() > 0
    gated = PackedHeteroExperts(D, SIZES, "swiglu", "loop")
    assert not gated.w3_is_placeholder and tuple(gated.w3.shape) == (1, sum(SIZES), D)


class _Tiny(torch.nn.Module):
    def __init__(self, activation: str, ep_size: int) -> None:
        super().__init__()
        from hmoe_ds import HMoELayerConfig, build_moe_layer

        self.inp = torch.nn.Linear(D, D)
        self.moe = build_moe_layer(D, HMoELayerConfig(expert_sizes=SIZES, activation=activation, ep_size=ep_size,
                                                      frontend="autoep"))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, aux, _ = self.moe(self.inp(x))
        return torch.nn.functional.mse_loss(h, y) + aux


def _non_gated_zero3_checkpoint(rank: int, world_size: int, ckpt_dir: str) -> dict:
    """ZeRO-3, EP 2, gelu: DeepSpeed's save_checkpoint, then load_checkpoint into a fresh engine, one step each."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from hmoe_ds import collectives
    from hmoe_ds.layer_autoep import HMoEAutoEP  # before zero.Init: transformers must not be imported inside it
    from hmoe_ds.shards import ShardReader, load_sharded_state, write_rank_shard

    config = {"train_micro_batch_size_per_gpu": 6, "steps_per_print": 10_000,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
              "zero_optimization": {"stage": 3}}

    def engine_and_model(seed: int):
        torch.manual_seed(seed)
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = _Tiny("gelu", world_size)
        assert isinstance(model.moe, HMoEAutoEP) and model.moe.experts.w3_is_placeholder
        groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()),
                                                                       "name": "all"})
        return deepspeed.initialize(model=model, model_parameters=groups, config=config)[0], model

    def step(engine, i: int) -> float:
        g = torch.Generator().manual_seed(100 * i + rank)
        loss = engine(torch.randn(6, D, generator=g), torch.randn(6, D, generator=g))
        engine.backward(loss)
        engine.step()
        return loss.item()

    def params(model) -> dict[str, torch.Tensor]:
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {n: p.detach().clone() for n, p in model.named_parameters()}

    engine, model = engine_and_model(0)
    for i in range(2):
        step(engine, i)
    engine.save_checkpoint(ckpt_dir, tag="t")
    out = {"next_loss": step(engine, 2), "next": params(model)}
    engine.destroy()
    engine, model = engine_and_model(1)
    engine.load_checkpoint(ckpt_dir, tag="t")
    shard_dir = Path(ckpt_dir) / "shards"
    shard_dir.mkdir(exist_ok=True)
    write_rank_shard(engine, shard_dir, rank)  # hmoe-ds's logical shards hold no w3 for a non-gated layer
    collectives.barrier()
    out.update(resumed_loss=step(engine, 2), resumed=params(model))
    engine.destroy()
    reader = ShardReader(shard_dir)
    out["shard_expert_keys"] = sorted(k for k in reader.shapes() if "experts" in k)
    engine, model = engine_and_model(2)
    load_sharded_state(engine, reader)  # and back into a ZeRO-3 engine: the placeholder restored as zeros
    out.update(sharded_loss=step(engine, 2), sharded=params(model))
    engine.destroy()
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_non_gated_experts_under_zero3_save_and_load_with_deepspeeds_checkpoint(tmp_path):
    """2 ranks, EP 2, gelu: DeepSpeed 0.19.8 read experts.w3 and failed on None; the placeholder saves and resumes."""
    results = run_distributed(_non_gated_zero3_checkpoint, world_size=2, ckpt_dir=str(tmp_path))
    for rank, result in enumerate(results):
        assert result["resumed_loss"] == result["next_loss"], rank
        for name, value in result["next"].items():
            torch.testing.assert_close(result["resumed"][name], value, rtol=0, atol=0, msg=f"rank {rank} {name}")
        assert tuple(result["next"]["moe.experts.w3"].shape) == (1, 1, D)
        assert torch.count_nonzero(result["next"]["moe.experts.w3"]) == 0
        assert result["shard_expert_keys"] and not any(".w3" in k for k in result["shard_expert_keys"])
        assert result["sharded_loss"] == pytest.approx(result["next_loss"], abs=1e-6), rank
        for name, value in result["next"].items():
            torch.testing.assert_close(result["sharded"][name], value, rtol=0, atol=1e-6, msg=f"rank {rank} {name}")
