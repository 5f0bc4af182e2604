"""The HMoE layer: against a per-token reference, against DeepSpeed's MoE, and its input checks."""

from __future__ import annotations

import pytest
import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import is_moe_param

from hmoe_ds import HMoE, HMoELayerConfig, collect_routing_stats
from hmoe_ds.experts import FFNExpert
from hmoe_ds.sizes import expert_param_count

from .reference import moe_reference

SIZES = [32, 48, 64, 96, 128]
D = 24


def _run(layer, x):
    """``(layer(x), its RoutingStats)``: the statistics come through the collector, not the output tuple."""
    with collect_routing_stats() as stats:
        out = layer(x)
    assert len(stats) == 1
    return out, stats[0]


def _experts_by_logical_id(layer: HMoE):
    return list(layer.deepspeed_moe.experts.deepspeed_experts)


def _reference_forward(layer: HMoE, x_TD: torch.Tensor, capacity=None):
    cfg = layer.config
    logits = layer.deepspeed_moe.gate(x_TD)
    return moe_reference(x_TD, logits, _experts_by_logical_id(layer), str(cfg.routing), cfg.top_k, cfg.top_p,
                         cfg.renormalize_gates, capacity)


@pytest.mark.parametrize(
    "options",
    [
        dict(routing="top_k", top_k=1),
        dict(routing="top_k", top_k=2),
        dict(routing="top_k", top_k=4),
        dict(routing="top_p", top_p=0.6),
        dict(routing="top_p", top_p=0.9, renormalize_gates=False),
        dict(routing="top_k", top_k=2, activation="gelu"),
    ],
)
def test_dropless_layer_matches_per_token_reference_with_gradients(options):
    layer = HMoE(D, SIZES, **options)
    x = torch.randn(3, 11, D, requires_grad=True)
    (out, _, counts), stats = _run(layer, x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = _reference_forward(layer, x_ref.reshape(-1, D)).reshape(x.shape)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert counts.sum().item() == stats.selected_per_expert.sum().item()
    assert stats.dropped_assignments == 0

    upstream = torch.randn_like(out)
    params = list(layer.parameters())
    grads = torch.autograd.grad((out * upstream).sum(), [x] + params, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [x_ref] + params, allow_unused=True)
    for g, r in zip(grads, ref_grads):
        if r is None:  # an expert nobody chose: the fast path still gives it a zero gradient
            assert g is None or g.abs().sum() == 0
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_capacity_path_drops_in_token_order_and_counts_drops():
    layer = HMoE(D, SIZES, routing="top_k", top_k=2, capacity_factor=0.5, min_capacity=1)
    x = torch.randn(40, D)
    (out, _, counts), stats = _run(layer, x)
    capacity = max(1, -(-int(0.5 * 40 * 2) // len(SIZES)))  # ceil(cf * T * k / E)
    ref = _reference_forward(layer, x, capacity=capacity)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert counts.max().item() <= capacity
    assert stats.dropped_assignments == 40 * 2 - int(counts.sum())
    assert stats.dropped_assignments > 0


def test_eval_capacity_factor_applies_in_eval_mode():
    layer = HMoE(D, SIZES, routing="top_k", top_k=2, capacity_factor=0.25, eval_capacity_factor=100.0, min_capacity=1)
    x = torch.randn(40, D)
    layer.train()
    assert _run(layer, x)[1].dropped_assignments > 0
    layer.eval()
    assert _run(layer, x)[1].dropped_assignments == 0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_equal_sizes_reproduce_deepspeed_moe(k):
    """Same weights, DeepSpeed's sampling off, no token dropped -> same output and gradients."""
    h, num_experts = 40, 4
    ds = MoE(D, FFNExpert(D, h), num_experts=num_experts, k=k, drop_tokens=False, use_rts=False,
             noisy_gate_policy=None, top2_2nd_expert_sampling=False, min_capacity=0)
    # DeepSpeed's top-1 gate weight is the raw probability (Switch); top-k>=2 renormalises.
    hm = HMoE(D, [h] * num_experts, routing="top_k", top_k=k, renormalize_gates=k > 1,
              p_penalty_coef=0.0, load_balance_coef=1.0)
    hm.load_state_dict(ds.state_dict(), strict=True)
    x1 = torch.randn(2, 19, D, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    out_ds, aux_ds, counts_ds = ds(x1)
    out_hm, aux_hm, counts_hm = hm(x2)
    torch.testing.assert_close(out_hm, out_ds, rtol=1e-5, atol=1e-6)
    assert counts_hm.tolist() == counts_ds.tolist()
    if k == 1:  # DeepSpeed's top-1 l_aux is exactly Eq. 3
        assert aux_hm.item() == pytest.approx(aux_ds.item(), rel=1e-6)
    upstream = torch.randn_like(out_ds)
    (out_ds * upstream).sum().backward()
    (out_hm * upstream).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    ds_params = dict(ds.named_parameters())
    for name, p in hm.named_parameters():
        if name.endswith("gate.wg.weight"):
            continue  # below, looser: it sums over every token, and the two layers accumulate in another order
        torch.testing.assert_close(p.grad, ds_params[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(hm.deepspeed_moe.gate.wg.weight.grad, ds.deepspeed_moe.gate.wg.weight.grad,
                               rtol=1e-4, atol=1e-6)


def test_expert_parameters_are_flagged_like_deepspeeds_experts():
    layer = HMoE(D, SIZES)
    for name, p in layer.named_parameters():
        if ".deepspeed_experts." in name:
            assert is_moe_param(p) and p.group_name == layer.expert_group_name, name
        else:
            assert not is_moe_param(p), name
    widths = [e.w1.weight.shape[0] for e in layer.deepspeed_moe.experts.deepspeed_experts]
    assert widths == SIZES


def test_aux_loss_is_the_weighted_sum_of_reported_terms():
    coefs = dict(load_balance_coef=0.01, p_penalty_coef=0.1, entropy_coef=0.03, z_loss_coef=0.001)
    layer = HMoE(D, SIZES, routing="top_p", **coefs)
    (_, l_aux, _), stats = _run(layer, torch.randn(30, D))
    terms = stats.losses
    expected = sum(coefs[f"{name}_coef"] * terms[name] for name in ("load_balance", "p_penalty", "entropy", "z_loss"))
    assert l_aux.item() == pytest.approx(expected, rel=1e-5)
    assert l_aux.requires_grad


def test_disabled_loss_terms_are_reported_but_not_in_l_aux():
    layer = HMoE(D, SIZES, p_penalty_coef=0.0)
    (_, l_aux, _), stats = _run(layer, torch.randn(30, D))
    assert l_aux.item() == 0.0
    assert stats.losses["p_penalty"] > 0


def test_stats_activated_parameters_and_experts_per_token():
    layer = HMoE(D, SIZES, routing="top_k", top_k=2)
    _, s = _run(layer, torch.randn(50, D))
    assert s.num_tokens == 50 and s.experts_per_token == pytest.approx(2.0)
    expected = sum(int(c) * expert_param_count(D, h) for c, h in zip(s.assignments_per_expert, SIZES)) / 50
    assert s.activated_expert_params_per_token == pytest.approx(expected)


def test_experts_without_tokens_still_get_zero_gradients():
    layer = HMoE(D, SIZES, routing="top_k", top_k=1)
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.zero_()
        layer.deepspeed_moe.gate.wg.weight[0].fill_(1.0)
    x = torch.rand(20, D)  # positive inputs: expert 0 always wins
    out, _, counts = layer(x)
    out.sum().backward()
    assert counts.tolist()[1:] == [0] * (len(SIZES) - 1)
    for expert in layer.deepspeed_moe.experts.deepspeed_experts[1:]:
        for p in expert.parameters():
            assert p.grad is not None and p.grad.abs().sum() == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(expert_sizes=[]), "expert_sizes"),
        (dict(expert_sizes=[64, 0, 32]), "expert_sizes.*positive"),
        (dict(expert_sizes=[64, -8]), "expert_sizes.*positive"),
        (dict(expert_sizes=[64, 64], routing="top_k", top_k=3), r"top_k=3.*1 <= top_k <= number of experts \(2\)"),
        (dict(expert_sizes=[64, 64], top_k=0), "top_k=0"),
        (dict(expert_sizes=[64, 64], top_p=0.0), r"top_p=0.0.*\(0, 1\]"),
        (dict(expert_sizes=[64, 64], top_p=1.5), r"top_p=1.5.*\(0, 1\]"),
        (dict(expert_sizes=[64, 64, 64], ep_size=2), r"ep_size=2 does not divide.*allowed ep_size values: \[1, 3\]"),
        (dict(expert_sizes=[64, 64], routing="top_q"), r"routing='top_q'.*'top_k', 'top_p'"),
        (dict(expert_sizes=[64, 64], capacity_factor=-1.0), "capacity_factor"),
        (dict(expert_sizes=[64, 64], p_penalty_coef=-0.1), "p_penalty_coef"),
    ],
)
def test_bad_configuration_is_a_value_error_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HMoE(D, **kwargs)


def test_wrong_input_width_is_reported_at_first_forward():
    layer = HMoE(D, SIZES)
    with pytest.raises(ValueError, match=rf"width 7 .*hidden_size={D}"):
        layer(torch.randn(4, 7))


def test_ep_size_above_one_without_a_process_group_is_explained():
    with pytest.raises(ValueError, match="deepspeed.init_distributed"):
        HMoE(D, [32, 64], ep_size=2)


def test_config_round_trip_and_unknown_keys():
    cfg = HMoELayerConfig(expert_sizes=SIZES, routing="top_k", top_k=3)
    assert HMoELayerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown MoE layer option\(s\) \['top_kk'\]"):
        HMoELayerConfig.from_dict({"expert_sizes": SIZES, "top_kk": 2})


def test_expert_init_is_per_logical_expert_whatever_the_frontend_or_placement():
    """Deterministic per-expert init: the packed (ZeRO-3) and module-list layers start identical."""
    from hmoe_ds.experts import PackedHeteroExperts
    from hmoe_ds.moe_core import MoECore
    from hmoe_ds.placement import balanced_placement

    class PackedHost(MoECore, torch.nn.Module):
        """The smallest MoECore host: packed experts (as the ZeRO-3 front-end) in another placement."""

        def __init__(self, config):
            torch.nn.Module.__init__(self)
            MoECore.__init__(self, D, config, balanced_placement(SIZES, 1), 0, PackedHeteroExperts(D, SIZES, "swiglu"))

    a = HMoE(D, SIZES)
    a.moe_core.init_expert_weights(0.02, seed=3)
    packed = PackedHost(a.config)
    packed.moe_core.init_expert_weights(0.02, seed=3)
    wa, wb = a.moe_core.local_expert_weights(), packed.moe_core.local_expert_weights()
    for e in range(len(SIZES)):
        for name in ("w1", "w2", "w3"):
            torch.testing.assert_close(wa[e][name], wb[e][name], rtol=0, atol=0)
    assert wa[0]["w1"].std().item() == pytest.approx(0.02, rel=0.2)
    other = HMoE(D, SIZES)
    other.moe_core.init_expert_weights(0.02, seed=4)
    assert not torch.equal(other.moe_core.local_expert_weights()[0]["w1"], wa[0]["w1"])


def test_load_local_expert_weights_rejects_other_sizes():
    a = HMoE(D, SIZES)
    b = HMoE(D, [s + 8 for s in SIZES])
    with pytest.raises(ValueError, match=r"expert 0 w1: checkpoint shape \(32, 24\) does not match.*\(40, 24\)"):
        b.moe_core.load_local_expert_weights(a.moe_core.local_expert_weights())


def test_deepspeed_outside_the_tested_range_is_refused(monkeypatch):
    from hmoe_ds.compat import check_deepspeed_version

    check_deepspeed_version("0.19.8")
    with pytest.raises(RuntimeError, match=r"tested with deepspeed >= 0.19.8, < 0.20.0; found 0.21.0.*deepspeed==0.19.8"):
        check_deepspeed_version("0.21.0")
    with pytest.raises(RuntimeError, match="found 0.18.3"):
        check_deepspeed_version("0.18.3")
    monkeypatch.setenv("HMOE_DS_SKIP_VERSION_CHECK", "1")
    check_deepspeed_version("0.21.0")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.bool])
def test_defect6_non_float_or_other_dtype_input_is_a_clear_error(dtype: torch.dtype) -> None:
    """Defect 6 (layer): float64/int64 input failed 17 frames deep with 'expected m1 and m2 to have the same dtype'."""
    layer = HMoE(hidden_size=D, expert_sizes=SIZES)
    x = torch.ones(2, 3, D).to(dtype)
    with pytest.raises(TypeError, match=rf"HMoE input has dtype {dtype}.*x\.to\(torch\.float32\)"):
        layer(x)
    layer.to(torch.float64)
    if dtype == torch.float64:  # a layer converted to the input's dtype accepts it
        out, l_aux, _ = layer(x)
        assert out.dtype == torch.float64 and torch.isfinite(out).all()


def test_routing_stats_reach_every_active_collector_once_per_forward():
    layer = HMoE(D, SIZES, routing="top_k", top_k=2)
    x = torch.randn(6, D)
    layer(x)  # no collector active: nothing is kept anywhere
    with collect_routing_stats() as outer:
        layer(x)
        with collect_routing_stats() as inner:
            layer(x)
    layer(x)
    assert len(outer) == 2 and len(inner) == 1 and inner[0] is outer[1]


def test_activation_checkpointing_recompute_adds_no_routing_stats():
    from torch.utils.checkpoint import checkpoint

    layer = HMoE(D, SIZES, routing="top_k", top_k=2)
    x = torch.randn(6, D, requires_grad=True)
    with collect_routing_stats() as stats:
        out = checkpoint(lambda t: layer(t)[0], x, use_reentrant=False)
    out.sum().backward()  # recomputes the layer's forward, outside the block
    assert len(stats) == 1 and x.grad is not None


def test_deprecated_names_still_work_and_warn():
    from hmoe_ds import dispatch

    layer = HMoE(D, SIZES, routing="top_k", top_k=2)
    with collect_routing_stats() as stats:
        layer(torch.randn(6, D))
    with pytest.warns(DeprecationWarning, match="collect_routing_stats"):
        assert layer.last_stats is stats[0]
    with pytest.warns(DeprecationWarning, match="assignments_per_expert"):
        assert stats[0].tokens_per_expert is stats[0].assignments_per_expert
    assert dispatch.combine is not dispatch.scatter_to_tokens
    with pytest.warns(DeprecationWarning, match="scatter_to_tokens"):
        from hmoe_ds.routing import route
        router = route(torch.randn(3, 2), method="top_k", top_k=1, top_p=0.5, renormalize=True)
        plan = dispatch.plan_dispatch(router, capacity=None)
        y = torch.randn(3, 4)
        torch.testing.assert_close(dispatch.combine(y, plan, 3), dispatch.scatter_to_tokens(y, plan, 3))
