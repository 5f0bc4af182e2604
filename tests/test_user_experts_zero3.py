"""The user's own expert modules under ZeRO-3 (the AutoEP front-end), EP 1 and 2, and in hmoe-ds's shards.

A tiny model (Linear -> MoE layer -> Linear, MSE + aux loss) with user experts
(copies of a template, or unequal experts with biases and GELU from a
factory) is built inside ``deepspeed.zero.Init`` and trained through
``deepspeed.initialize`` with ZeRO stage 3 on 2 gloo ranks, and compared with
one plain PyTorch process training the ZeRO 0-2 layer (the user's modules
themselves, ``experts.ModuleExperts``) on every rank's micro-batch: per-step
losses, and every parameter after training (user experts read back by their
own names). Tolerances as in ``tests/test_zero_equivalence.py``. The
unequal-expert case has expert packs above DeepSpeed's persistence threshold
(1e5 elements) and runs with DeepSpeed's default prefetch. The EP 2 case also
writes hmoe-ds's per-rank shards, reads them back by the user's names, and
restores them elastically into an EP 1 ZeRO-3 engine and a ZeRO-2 engine of
the ZeRO 0-2 front-end, optimizer state included.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from .distributed import run_distributed
from .reference import train_data_parallel_in_one_process

D = 16
STEPS = 6
LR = 1e-2
PARAM_ATOL = LR / 100
#: Unequal experts whose packs exceed DeepSpeed's parameter-persistence threshold (1e5) at D=64.
BIG_D, BIG_SIZES = 64, [256, 512, 1024, 1600]


class BiasGeluFFN(nn.Module):
    """An expert unlike HMoE's built-in one: biases, GELU, the user's own names."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d, h)
        self.fc_out = nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(torch.nn.functional.gelu(self.fc_in(x)))


def template_expert(d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, 24), nn.GELU(), nn.Linear(24, d))


CASES = {
    # DeepSpeed's own call (Residual MoE), unchanged, built inside zero.Init: HMoE returns the ZeRO-3 layer.
    "template": dict(kind="template", d=D),
    "factory": dict(kind="factory", d=BIG_D),
}


class Toy(nn.Module):
    def __init__(self, kind: str, d: int, ep_size: int, zero3: bool) -> None:
        super().__init__()
        from hmoe_ds import HMoE, HMoELayerConfig, build_moe_layer

        self.inp = nn.Linear(d, d)
        if kind == "template":
            torch.manual_seed(5)  # the template's values: every rank builds the same template
            self.moe = HMoE(d, template_expert(d), 4, ep_size=ep_size, k=2, drop_tokens=False,
                            top2_2nd_expert_sampling=False, use_residual=True)  # Residual MoE, as DeepSpeed's
            assert self.moe.mlp is not None and self.moe.coefficient is not None
        else:
            config = HMoELayerConfig(expert_sizes=BIG_SIZES, routing="top_p", top_p=0.6, p_penalty_coef=0.1,
                                     entropy_coef=0.03, ep_size=ep_size, frontend="autoep" if zero3 else "moe")
            self.moe = build_moe_layer(d, config, expert=lambda h: BiasGeluFFN(d, h))
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, aux, _ = self.moe(self.inp(x))
        return torch.nn.functional.mse_loss(self.out(h), y) + aux


def _dense_params(model: Toy) -> dict[str, torch.Tensor]:
    """Everything but the experts, by a name both front-ends share (Residual MoE's MLP and coefficient too)."""
    params = {f"inp.{k}": v for k, v in model.inp.named_parameters()}
    params.update({f"out.{k}": v for k, v in model.out.named_parameters()})
    params["gate"] = model.moe.moe_core.gate.wg.weight
    for branch in ("mlp", "coefficient"):
        module = getattr(model.moe, branch, None)
        if module is not None:
            params.update({f"{branch}.{k}": v for k, v in module.named_parameters()})
    return params


def _dense(model: Toy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _dense_params(model).items()}


def _load(model: Toy, dense: dict[str, torch.Tensor], experts: dict[int, dict[str, torch.Tensor]]) -> None:
    from hmoe_ds.partitioned import write_full

    params = _dense_params(model)
    assert sorted(params) == sorted(dense)
    for key, param in params.items():
        write_full(param, dense[key])
    model.moe.moe_core.load_local_expert_parameters(experts)


def _batch(rank: int, step: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(12, d, generator=g), torch.randn(12, d, generator=g)


def _reference(kind: str, d: int) -> Toy:
    torch.manual_seed(0)
    model = Toy(kind, d, 1, zero3=False)
    with torch.no_grad():  # copies of one template start equal: make them differ (outputs of order 1)
        for p in model.moe.moe_core.experts.parameters():
            p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1)
    return model


def _ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 12, "gradient_accumulation_steps": 1, "steps_per_print": 10_000,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01, "torch_adam": True}},
            "zero_optimization": {"stage": stage}}  # DeepSpeed's default buckets, prefetch and thresholds


def _engine(model: Toy, stage: int):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "all"})
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=_ds_config(stage))
    return engine


def _build_zero3(kind: str, d: int, ep_size: int) -> Toy:
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=_ds_config(3)):
        return Toy(kind, d, ep_size, zero3=True)


def _gathered(model: Toy) -> tuple[dict, dict]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return _dense(model), model.moe.moe_core.local_expert_parameters()


def _train(rank: int, world_size: int, kind: str, d: int, ep_size: int, shard_dir: str | None = None) -> dict:
    from hmoe_ds.experts import PackedModuleExperts
    from hmoe_ds.layer_autoep import HMoEAutoEP

    reference = _reference(kind, d)
    model = _build_zero3(kind, d, ep_size)
    layer = model.moe
    assert isinstance(layer, HMoEAutoEP) and isinstance(layer.experts, PackedModuleExperts)
    out: dict = {"repr": repr(layer), "pack_shapes": [tuple(p.ds_shape) for p in layer.experts.packs()],
                 "pack_numel": max(p.ds_numel for p in layer.experts.packs()),
                 "expert_params": list(layer.moe_core.expert_params),
                 "reference_expert_params": list(reference.moe.moe_core.expert_params)}
    _load(model, _dense(reference), reference.moe.moe_core.local_expert_parameters())
    engine = _engine(model, 3)
    out["partitioned"] = all(p.ds_tensor.numel() < p.ds_numel for p in layer.experts.packs())
    out["partition_group_size"] = torch.distributed.get_world_size(layer.experts.w1.ds_process_group)
    losses = []
    for step in range(STEPS):
        loss = engine(*_batch(rank, step, d))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    out["losses"] = losses
    out["dense"], out["experts"] = _gathered(model)
    out["local_experts"] = list(layer.moe_core.local_expert_ids)
    if shard_dir is not None:
        out.update(_shards_and_elastic(rank, engine, model, kind, d, Path(shard_dir)))
    engine.destroy()
    return out


def _next_step(engine, rank: int, d: int) -> float:
    loss = engine(*_batch(rank, STEPS, d))
    engine.backward(loss)
    engine.step()
    return loss.item()


def _shards_and_elastic(rank: int, engine, model: Toy, kind: str, d: int, shard_dir: Path) -> dict:
    """Write this rank's shard, read every shard back, restore it at EP 1 (ZeRO-3) and into ZeRO-2, step once more."""
    from hmoe_ds import collectives
    from hmoe_ds.shards import ShardReader, load_sharded_state, write_rank_shard

    write_rank_shard(engine, shard_dir, rank)
    collectives.barrier()
    reader = ShardReader(shard_dir)
    out: dict = {"shard_shapes": reader.shapes(), "states": reader.states(),
                 "shard_experts": {k: reader.get(k) for k in reader.shapes() if ".deepspeed_experts." in k},
                 "shard_exp_avg": {k: reader.get(k, "exp_avg") for k in reader.shapes() if ".deepspeed_experts." in k}}
    out["next_loss"] = _next_step(engine, rank, d)
    out["next_dense"], out["next_experts"] = _gathered(model)
    restored = {}
    for name, build, stage in (("zero3_ep1", lambda: _build_zero3(kind, d, 1), 3),
                               ("zero2_ep1", lambda: Toy(kind, d, 1, zero3=False), 2)):
        torch.manual_seed(123)  # anything: every value is overwritten from the shards
        other = build()
        other_engine = _engine(other, stage)
        load_sharded_state(other_engine, reader)
        loss = _next_step(other_engine, rank, d)
        if stage == 3:
            dense, experts = _gathered(other)
        else:
            dense, experts = _dense(other), other.moe.moe_core.local_expert_parameters()
        restored[name] = {"loss": loss, "dense": dense, "experts": experts}
        other_engine.destroy()
    out["restored"] = restored
    return out


def _train_reference(kind: str, d: int, world_size: int, steps: int = STEPS):
    model = _reference(kind, d)
    history = train_data_parallel_in_one_process(model, lambda r, step: _batch(r, step, d), world_size, steps, LR)
    return history, _dense(model), model.moe.moe_core.local_expert_parameters()


def _assert_params(dense, experts, ref_dense, ref_experts, what: str) -> None:
    for key, value in dense.items():
        torch.testing.assert_close(value, ref_dense[key], rtol=0, atol=PARAM_ATOL, msg=f"{what}: {key}")
    for logical, named in experts.items():
        assert set(named) == set(ref_experts[logical]), (what, logical)
        for name, value in named.items():
            torch.testing.assert_close(value, ref_experts[logical][name], rtol=0, atol=PARAM_ATOL,
                                       msg=f"{what}: expert {logical} {name}")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("ep_size", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_user_experts_train_under_zero3_as_one_process(case, ep_size, tmp_path):
    spec = CASES[case]
    elastic = case == "factory" and ep_size == 2
    results = run_distributed(_train, world_size=2, timeout=900, kind=spec["kind"], d=spec["d"], ep_size=ep_size,
                              shard_dir=str(tmp_path) if elastic else None)
    steps = STEPS + 1 if elastic else STEPS
    ref_losses, ref_dense, ref_experts = _train_reference(spec["kind"], spec["d"], 2, STEPS)
    for rank, result in enumerate(results):
        assert "loop path" in result["repr"] and "user expert modules" in result["repr"]
        assert result["expert_params"] == result["reference_expert_params"]  # P-Penalty and statistics
        assert len(set(result["pack_shapes"])) == 1 and result["pack_shapes"][0][0] == 1
        for step in range(STEPS):
            assert result["losses"][step] == pytest.approx(ref_losses[step][rank], abs=1e-5), (rank, step)
        _assert_params(result["dense"], result["experts"], ref_dense, ref_experts, f"rank {rank}")
        if ep_size == 1:  # ZeRO-3 partitions the packs over the expert-data-parallel group (both ranks)
            assert result["partitioned"] and result["partition_group_size"] == 2
    # Every EP rank's packs have the same shapes (ZeRO-3's prefetch all-gathers must match).
    assert results[0]["pack_shapes"] == results[1]["pack_shapes"]
    held = sorted(e for r in results[:ep_size] for e in r["local_experts"])
    assert held == list(range(4))
    if spec["kind"] == "factory":
        assert results[0]["pack_numel"] > 100_000  # above DeepSpeed's parameter-persistence threshold
    if elastic:
        _check_shards_and_elastic(results, spec, steps)


def _check_shards_and_elastic(results, spec, steps) -> None:
    ref_losses, ref_dense, ref_experts = _train_reference(spec["kind"], spec["d"], 2, steps)
    shard = results[0]
    prefix = "moe.deepspeed_moe.experts.deepspeed_experts"
    expected = {f"{prefix}.{e}.{name}" for e in range(4) for name in ("fc_in.weight", "fc_in.bias",
                                                                      "fc_out.weight", "fc_out.bias")}
    assert set(shard["shard_experts"]) == expected  # the user's own names, under logical expert ids
    assert {"exp_avg", "exp_avg_sq"} <= set(shard["states"])
    after = {}
    for r in results:
        after.update(r["experts"])
    for key, value in shard["shard_experts"].items():
        logical, name = int(key[len(prefix) + 1:].split(".", 1)[0]), key[len(prefix) + 1:].split(".", 1)[1]
        torch.testing.assert_close(value, after[logical][name], rtol=0, atol=0, msg=key)
        assert float(shard["shard_exp_avg"][key].abs().sum()) > 0, key
    for rank, result in enumerate(results):
        assert result["next_loss"] == pytest.approx(ref_losses[STEPS][rank], abs=1e-5)
        _assert_params(result["next_dense"], result["next_experts"], ref_dense, ref_experts, f"EP 2, rank {rank}")
        for name, restored in result["restored"].items():
            # Same weights and optimizer state: the restored run's next step is the original's.
            assert restored["loss"] == pytest.approx(result["next_loss"], abs=1e-5), (name, rank)
            assert sorted(restored["experts"]) == [0, 1, 2, 3]
            _assert_params(restored["dense"], restored["experts"], ref_dense, ref_experts, f"{name}, rank {rank}")


def _all_parameters(model: Toy) -> dict[str, torch.Tensor]:
    """Every parameter (the packs included, padding and all), gathered, by its name in the model."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {name: p.detach().clone() for name, p in model.named_parameters()}


def _deepspeed_checkpoint_round_trip(rank: int, world_size: int, kind: str, d: int, ep_size: int,
                                     ckpt_dir: str) -> dict:
    """Train, ``engine.save_checkpoint``, step on; a fresh engine (other weights) ``load_checkpoint``s, steps on."""
    reference = _reference(kind, d)  # first: hmoe_ds (hence transformers) is not imported inside zero.Init
    model = _build_zero3(kind, d, ep_size)
    _load(model, _dense(reference), reference.moe.moe_core.local_expert_parameters())
    engine = _engine(model, 3)
    for step in range(STEPS):
        loss = engine(*_batch(rank, step, d))
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(ckpt_dir, tag="mid")
    saved = _all_parameters(model)
    out: dict = {"next_loss": _next_step(engine, rank, d), "next": _all_parameters(model),
                 "next_experts": _gathered(model)[1]}
    engine.destroy()

    torch.manual_seed(77)  # other weights everywhere: everything must come from the checkpoint
    other = _build_zero3(kind, d, ep_size)
    scrambled = Toy(kind, d, 1, zero3=False)
    with torch.no_grad():
        for p in scrambled.parameters():
            p.normal_()
    _load(other, _dense(scrambled), scrambled.moe.moe_core.local_expert_parameters())
    other_engine = _engine(other, 3)
    out["before_load_differs"] = any(not torch.equal(v, saved[k]) for k, v in _all_parameters(other).items())
    load_path, _ = other_engine.load_checkpoint(ckpt_dir, tag="mid")
    out["load_path"] = load_path
    loaded = _all_parameters(other)
    out["loaded_mismatch"] = sorted(k for k in saved if not torch.equal(loaded[k], saved[k]))
    out["resumed_loss"] = _next_step(other_engine, rank, d)
    out["resumed"] = _all_parameters(other)
    out["resumed_experts"] = _gathered(other)[1]
    other_engine.destroy()
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case, ep_size", [("factory", 1), ("factory", 2), ("template", 2)])
def test_user_experts_zero3_deepspeed_checkpoint_resumes_exactly(case, ep_size, tmp_path):
    """2 ranks, ZeRO-3: DeepSpeed's own save_checkpoint/load_checkpoint restores user experts and Adam exactly
    (unequal experts of the user's type; DeepSpeed-style template copies with Residual MoE)."""
    spec = CASES[case]
    results = run_distributed(_deepspeed_checkpoint_round_trip, world_size=2, timeout=900, kind=spec["kind"],
                              d=spec["d"], ep_size=ep_size, ckpt_dir=str(tmp_path / "ckpt"))
    for rank, result in enumerate(results):
        assert result["load_path"] is not None, rank
        assert result["before_load_differs"], rank
        assert result["loaded_mismatch"] == [], (rank, result["loaded_mismatch"])
        # The resumed step is the uninterrupted run's, bit for bit: weights, and the Adam moments behind the update.
        assert result["resumed_loss"] == result["next_loss"], rank
        for name, value in result["next"].items():
            torch.testing.assert_close(result["resumed"][name], value, rtol=0, atol=0, msg=f"rank {rank} {name}")
        for logical, named in result["next_experts"].items():
            for name, value in named.items():
                torch.testing.assert_close(result["resumed_experts"][logical][name], value, rtol=0, atol=0,
                                           msg=f"rank {rank} expert {logical} {name}")


def test_zero2_frontend_user_expert_shards_round_trip_by_the_users_names(tmp_path):
    """One process, no ZeRO: the ZeRO 0-2 layer's user experts in a shard, by logical id and the user's names."""
    from types import SimpleNamespace

    from hmoe_ds.shards import ShardReader, load_sharded_state, write_rank_shard

    model = _reference("factory", D)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    model(*_batch(0, 0, D)).backward()
    optimizer.step()
    write_rank_shard(SimpleNamespace(module=model, optimizer=optimizer), tmp_path, 0)
    reader = ShardReader(tmp_path)
    prefix = "moe.deepspeed_moe.experts.deepspeed_experts"
    experts = model.moe.moe_core.local_expert_parameters()
    for e, named in experts.items():
        for name, value in named.items():
            assert reader.shapes()[f"{prefix}.{e}.{name}"] == tuple(value.shape)
            torch.testing.assert_close(reader.get(f"{prefix}.{e}.{name}"), value, rtol=0, atol=0)
    assert {name for named in experts.values() for name in named} == {"fc_in.weight", "fc_in.bias",
                                                                      "fc_out.weight", "fc_out.bias"}
    torch.manual_seed(9)
    other = Toy("factory", D, 1, zero3=False)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=LR)
    load_sharded_state(SimpleNamespace(module=other, optimizer=other_optimizer), reader)
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(other_optimizer.state[b]["exp_avg"], optimizer.state[a]["exp_avg"], msg=name)


def _ep2_forward_backward(rank: int, world_size: int) -> dict:
    """The ZeRO-3 layer with unequal user experts at EP 2 (no engine) against the ZeRO 0-2 layer at EP 1."""
    from hmoe_ds import HMoELayerConfig, build_moe_layer

    config = HMoELayerConfig(expert_sizes=[8, 16, 24, 32], routing="top_k", top_k=2, p_penalty_coef=0.1)
    torch.manual_seed(0)
    full = build_moe_layer(D, config, expert=lambda h: BiasGeluFFN(D, h))
    ep = build_moe_layer(D, HMoELayerConfig(**{**config.__dict__, "ep_size": world_size, "frontend": "autoep"}),
                         expert=lambda h: BiasGeluFFN(D, h))
    ep.moe_core.gate.load_state_dict(full.moe_core.gate.state_dict())
    ep.moe_core.load_local_expert_parameters(full.moe_core.local_expert_parameters())
    checks = {}
    for r in range(world_size):  # every rank's tokens through the full layer; this rank's through the EP layer
        x = torch.randn(13, D, generator=torch.Generator().manual_seed(100 + r)).requires_grad_(True)
        out, aux, counts = full(x)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(200 + r))
        ((out * upstream).sum() + aux).backward()
        if r == rank:
            xe = x.detach().clone().requires_grad_(True)
            oute, auxe, countse = ep(xe)
            ((oute * upstream).sum() + auxe).backward()
            checks = {"out": (oute.detach(), out.detach()), "aux": (auxe.detach(), aux.detach()),
                      "x_grad": (xe.grad, x.grad), "counts": (countse.tolist(), counts.tolist())}
    grads = ep.experts.expert_parameters([p.grad for p in ep.experts.packs()])
    reference = {logical: {n: p.grad for n, p in full.moe_core.experts.deepspeed_experts[logical].named_parameters()}
                 for logical in range(4)}
    checks["expert_grads"] = [(grads[slot], reference[logical]) for slot, logical in enumerate(ep.moe_core.local_expert_ids)]
    return checks


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_layer_with_unequal_user_experts_at_ep2_matches_one_process_in_output_and_gradients():
    for rank, checks in enumerate(run_distributed(_ep2_forward_backward, world_size=2)):
        torch.testing.assert_close(*checks["out"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(*checks["aux"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(*checks["x_grad"], rtol=1e-5, atol=1e-6)
        assert checks["counts"][0] == checks["counts"][1]
        for mine, ref in checks["expert_grads"]:
            assert mine.keys() == ref.keys()
            for name in ref:  # every rank's tokens reached the local experts through the all-to-all backward
                torch.testing.assert_close(mine[name], ref[name], rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")


def test_hf_export_refuses_user_experts_and_names_the_alternative(tmp_path):
    """The HF model has the built-in experts only: a source holding user experts is refused with the way out."""
    from types import SimpleNamespace

    from hmoe_ds.checkpoint import CheckpointError
    from hmoe_ds.export import WeightsSource, check_structure
    from hmoe_ds.modeling import HMoEConfig
    from hmoe_ds.shards import write_rank_shard

    model = _reference("factory", D)
    write_rank_shard(SimpleNamespace(module=model, optimizer=torch.optim.AdamW(model.parameters())), tmp_path, 0)
    source = WeightsSource("checkpoint", tmp_path, tmp_path, {}, None, None)
    config = HMoEConfig(vocab_size=32, hidden_size=D, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(CheckpointError, match=r"user's own expert modules .*fc_in.*ShardReader"):
        check_structure(source, config)
