"""HMoE as a drop-in for DeepSpeed's MoE: its constructor, the user's experts, its gate rules, Residual MoE.

Each case builds DeepSpeed's ``MoE`` and ``HMoE`` with the same arguments,
loads one state dict into both (the parameter names must agree), runs both
from the same random seed (DeepSpeed's gates draw noise: random token
selection, Gumbel sampling, jitter) and compares outputs, ``l_aux``,
``exp_counts`` and every gradient.
"""

from __future__ import annotations

import pytest
import torch
from deepspeed.moe.layer import MoE
from torch import nn

from hmoe_ds import HMoE, collect_routing_stats

D, H, E, T = 12, 20, 4, 40


def user_expert(hidden: int = H) -> nn.Module:
    """An expert unlike HMoE's built-in one: biases, GELU, two layers."""
    return nn.Sequential(nn.Linear(D, hidden), nn.GELU(), nn.Linear(hidden, D))


def _pair(**kwargs):
    torch.manual_seed(0)
    ds = MoE(D, user_expert(), E, **kwargs)
    hm = HMoE(D, user_expert(), E, **kwargs)
    with torch.no_grad():  # both layers start with equal copies: make the experts differ, or any choice would do
        for param in ds.parameters():
            param.normal_(0.0, 0.5)
    hm.load_state_dict(ds.state_dict(), strict=True)
    return ds, hm


def _run(layer, x, seed, used_token=None, train=True):
    layer.train(train)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out, l_aux, counts = layer(x, used_token)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    ((out * upstream).sum() + l_aux).backward()
    return out.detach(), l_aux.detach(), counts.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


def _assert_same(ds, hm, x, seed=5, used_token=None, train=True):
    out_ds, aux_ds, counts_ds, xg_ds, grads_ds = _run(ds, x, seed, used_token, train)
    out_hm, aux_hm, counts_hm, xg_hm, grads_hm = _run(hm, x, seed, used_token, train)
    torch.testing.assert_close(out_hm, out_ds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux_hm, aux_ds.to(aux_hm.dtype), rtol=1e-5, atol=1e-7)
    assert counts_hm.tolist() == counts_ds.tolist()
    torch.testing.assert_close(xg_hm, xg_ds, rtol=1e-4, atol=1e-6)
    assert grads_hm.keys() == grads_ds.keys()
    for name, grad in grads_ds.items():
        if grad is None:
            assert grads_hm[name] is None or grads_hm[name].abs().sum() == 0, name
        else:
            torch.testing.assert_close(grads_hm[name], grad, rtol=1e-4, atol=1e-6, msg=name)


CASES = {
    "top1-rts": dict(k=1),
    "top1-no-rts": dict(k=1, use_rts=False, capacity_factor=4.0),
    "top1-tight-capacity-rts": dict(k=1, capacity_factor=0.5, min_capacity=1),
    "top1-dropless": dict(k=1, drop_tokens=False),
    "top1-rsample": dict(k=1, noisy_gate_policy="RSample", drop_tokens=False),
    "top1-jitter": dict(k=1, noisy_gate_policy="Jitter", drop_tokens=False),
    "top2-sampling": dict(k=2),
    "top2-tight-capacity": dict(k=2, capacity_factor=0.5, min_capacity=1),
    "top2-no-sampling-dropless": dict(k=2, top2_2nd_expert_sampling=False, drop_tokens=False),
    "top3-capacity": dict(k=3, capacity_factor=0.6, min_capacity=1),
    "residual-top2": dict(k=2, use_residual=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_deepspeed_style_layer_matches_deepspeed_moe(case):
    ds, hm = _pair(**CASES[case])
    x = torch.randn(2, T // 2, D)
    _assert_same(ds, hm, x)


def test_eval_mode_uses_eval_capacity_and_no_noise():
    ds, hm = _pair(k=1, capacity_factor=0.25, eval_capacity_factor=2.0, noisy_gate_policy="RSample", min_capacity=1)
    _assert_same(ds, hm, torch.randn(T, D), train=False)


def test_used_token_masks_tokens_as_deepspeed_does_for_top1():
    ds, hm = _pair(k=1, drop_tokens=False)
    used = (torch.arange(T) % 3 != 0).long()  # DeepSpeed needs integer flags when dropless
    _assert_same(ds, hm, torch.randn(T, D), used_token=used)
    out, _, counts = hm(torch.randn(T, D), used)
    assert int(counts.sum()) == int(used.sum())
    assert out[used == 0].abs().sum() == 0


def test_deepspeed_positional_call_and_parameter_names():
    expert = user_expert()
    layer = HMoE(D, expert, 4, 1, 2)  # hidden_size, expert, num_experts, ep_size, k
    assert layer.config.top_k == 2 and str(layer.config.gate_convention) == "deepspeed"
    names = [n for n, _ in layer.named_parameters()]
    assert "deepspeed_moe.experts.deepspeed_experts.3.2.bias" in names  # the user's own module names
    assert "deepspeed_moe.experts" in repr(layer) or "user expert modules" in repr(layer)
    assert "loop path" in repr(layer.deepspeed_moe.experts)
    for p in layer.deepspeed_moe.experts.parameters():
        assert p.allreduce is False and p.group_name == "ep_size_1"


def test_unequal_user_experts_from_a_factory_count_their_real_parameters():
    sizes = [8, 16, 24, 32]
    layer = HMoE(D, lambda h: user_expert(h), expert_sizes=sizes, k=2, drop_tokens=False)
    widths = [e[0].out_features for e in layer.deepspeed_moe.experts.deepspeed_experts]
    assert widths == sizes
    per_expert = [2 * D * h + h + D for h in sizes]  # two Linears with biases
    assert list(layer.deepspeed_moe.expert_params) == per_expert
    with collect_routing_stats() as stats:
        _, _, counts = layer(torch.randn(T, D))
    expected = sum(int(c) * p for c, p in zip(counts, per_expert)) / T
    assert stats[0].activated_expert_params_per_token == pytest.approx(expected)
    with pytest.raises(TypeError, match="user's own expert modules"):
        layer.moe_core.local_expert_weights()


def test_shared_expert_is_added_and_counted():
    layer = HMoE(D, [8, 16, 24, 32], routing="top_k", top_k=1, shared_expert_size=10)
    x = torch.randn(T, D)
    with collect_routing_stats() as stats:
        out, _, _ = layer(x)
    with torch.no_grad():
        routed, _, _ = layer.deepspeed_moe(x)
        torch.testing.assert_close(out, routed + layer.mlp(x))
    shared = 3 * D * 10
    assert stats[0].always_active_params == shared
    assert stats[0].activated_expert_params_per_token > shared


def test_earlier_call_styles_keep_hmoe_semantics():
    layer = HMoE(D, [8, 16, 24, 32], capacity_factor=0.5, min_capacity=1, routing="top_k", top_k=2)
    assert str(layer.config.gate_convention) == "hmoe" and layer.config.p_penalty_coef == 0.1
    assert HMoE(D, expert_sizes=[8, 16]).config.routing == "top_p"


@pytest.mark.parametrize("kwargs, match", [
    (dict(expert=user_expert(), expert_sizes=[8, 16]), "factory"),
    (dict(expert=None), "expert_sizes"),
    (dict(expert=lambda h: user_expert(h)), "factory expert needs expert_sizes"),
    (dict(expert=lambda h: "not a module", expert_sizes=[8]), "must return an nn.Module"),
    (dict(expert_sizes=[8, 16], enable_expert_tensor_parallelism=True), "must be known when the layer is built"),
    (dict(expert=user_expert(), num_experts=4, enable_expert_tensor_parallelism=1), "must be True or False"),
    (dict(expert=user_expert(), num_experts=4, noisy_gate_policy="Loud"), "noisy_gate_policy='Loud'"),
    (dict(expert_sizes=[8, 16], num_experts=3), "num_experts=3 but expert_sizes has 2"),
    (dict(expert=user_expert(), num_experts=4, frontend="autoep", enable_expert_tensor_parallelism=True),
     "ZeRO-3 layer .* has no tensor parallelism"),
    (dict(expert=user_expert(), num_experts=4, k=2, top_k=2), "not both"),
    (dict(expert_sizes=[8, 16], use_rts=True, routing="top_p"), "deepspeed"),
    (dict(expert_sizes=[8, 16], use_residual=True), "use_residual=True needs a dense expert: set shared_expert_size"),
])
def test_bad_drop_in_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        HMoE(D, **kwargs)


def test_repr_states_the_expert_compute_path():
    assert "loop path" in repr(HMoE(D, user_expert(), 4))
    assert "grouped (" in repr(HMoE(64, [32, 64, 96, 128], expert_compute="grouped"))
    assert "loop path" in repr(HMoE(64, [32, 64, 96, 128], expert_compute="loop"))


def test_use_tutel_is_accepted_and_changes_nothing():
    ds, hm = _pair(k=2, use_tutel=True)
    _assert_same(ds, hm, torch.randn(T, D))


def _expert_parallel_pair(rank: int, world_size: int, k: int) -> dict:
    ds_layer = MoE(D, user_expert(), E, ep_size=world_size, k=k)
    ds_layer.set_deepspeed_parallelism()  # what DeepSpeed's engine calls; creates the expert groups
    hm_layer = HMoE(D, user_expert(), E, ep_size=world_size, k=k)
    with torch.no_grad():
        for param in ds_layer.parameters():  # different experts on every rank and slot
            param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(param.numel() + 7 * rank))
        torch.distributed.broadcast(ds_layer.deepspeed_moe.gate.wg.weight, 0)  # the router is replicated
    hm_layer.load_state_dict(ds_layer.state_dict(), strict=True)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(100 + rank))
    results = [_run(layer, x, seed=3 + rank) for layer in (ds_layer, hm_layer)]
    return {"out": [r[0] for r in results], "aux": [r[1] for r in results], "counts": [r[2] for r in results],
            "x_grad": [r[3] for r in results], "grads": [r[4] for r in results]}


@pytest.mark.parametrize("k", [1, 2])
def test_expert_parallel_layer_matches_deepspeed_moe(k):
    """EP 2 over two gloo ranks: DeepSpeed's MoE and HMoE, same weights per rank, same seeds."""
    from .distributed import run_distributed

    for result in run_distributed(_expert_parallel_pair, world_size=2, k=k):
        torch.testing.assert_close(result["out"][1], result["out"][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["aux"][1], result["aux"][0], rtol=1e-5, atol=1e-7)
        assert result["counts"][1].tolist() == result["counts"][0].tolist()
        torch.testing.assert_close(result["x_grad"][1], result["x_grad"][0], rtol=1e-4, atol=1e-6)
        for name, grad in result["grads"][0].items():
            torch.testing.assert_close(result["grads"][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_used_token_in_hmoe_style_layers_routes_only_marked_tokens():
    layer = HMoE(D, [8, 16, 24, 32], routing="top_k", top_k=2)
    x = torch.randn(T, D)
    used = (torch.arange(T) % 4 != 0).long()
    with collect_routing_stats() as stats:
        out, _, counts = layer(x, used)
    assert out[used == 0].abs().sum() == 0 and out[used == 1].abs().sum() > 0
    assert int(counts.sum()) == 2 * int(used.sum()) and stats[0].selected_per_expert.sum() == counts.sum()
    full, _, _ = layer(x)
    torch.testing.assert_close(out[used == 1], full[used == 1])
    with pytest.raises(ValueError, match="used_token has 3 entries for 40 tokens"):
        layer(x, torch.ones(3))


def test_hmoe_built_for_zero3_is_the_zero3_layer(monkeypatch):
    """DeepSpeed refuses MoE subclasses under ZeRO-3 at deepspeed.initialize; HMoE built inside zero.Init (or with
    frontend='autoep') returns the ZeRO-3 layer, with the user's experts (tests/test_user_experts_zero3.py trains it)."""
    from deepspeed.runtime.zero import partition_parameters

    from hmoe_ds import layer as layer_module

    built = []
    monkeypatch.setattr(layer_module, "HMoEAutoEP", lambda hidden, *, config, expert: built.append((config, expert)))
    assert HMoE(D, user_expert(), 4, k=2, frontend="autoep") is None  # what HMoEAutoEP(...) returned
    config, expert = built[-1]
    assert str(config.frontend) == "autoep" and config.top_k == 2 and isinstance(expert, nn.Module)
    monkeypatch.setattr(partition_parameters, "zero_init_context", 1)  # as inside deepspeed.zero.Init()
    factory = lambda h: user_expert(h)  # noqa: E731
    HMoE(D, factory, expert_sizes=[8, 16])
    assert built[-1][1] is factory and str(built[-1][0].frontend) == "autoep"
    HMoE(D, expert_sizes=[8, 16])
    assert built[-1][1] is None

    class Sub(HMoE):
        pass

    with pytest.raises(ValueError, match="refuses deepspeed.moe.layer.MoE subclasses under ZeRO-3"):
        Sub(D, expert_sizes=[8, 16])
