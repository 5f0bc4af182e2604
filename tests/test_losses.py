"""Auxiliary losses (hmoe_ds.losses) against loop references, Eq. 3-5 of the HMoE paper."""

from __future__ import annotations

import pytest
import torch

from hmoe_ds import losses as L
from hmoe_ds.routing import route

from .reference import entropy_reference, load_balance_reference, p_penalty_reference, z_loss_reference

SIZES = [64, 128, 192, 256, 320]


@pytest.mark.parametrize("method", ["top_k", "top_p"])
def test_losses_match_loop_references_in_value_and_gradient(method):
    logits = torch.randn(23, len(SIZES), requires_grad=True)
    r = route(logits, method=method, top_k=2, top_p=0.6)
    sizes = L.normalized_expert_sizes(SIZES)
    fast = {
        "lb": L.load_balance_loss(probs_TE=r.probs_TE, mask_TE=r.mask_TE),
        "pp": L.p_penalty_loss(probs_TE=r.probs_TE, mask_TE=r.mask_TE, expert_sizes_E=sizes),
        "ent": L.router_entropy_loss(probs_TE=r.probs_TE),
        "z": L.router_z_loss(logits_TE=r.logits_TE),
    }
    ref_logits = logits.detach().clone().requires_grad_(True)
    probs = torch.softmax(ref_logits, dim=1)
    slow = {
        "lb": load_balance_reference(probs, r.mask_TE),
        "pp": p_penalty_reference(probs, r.mask_TE, SIZES),
        "ent": entropy_reference(probs),
        "z": z_loss_reference(ref_logits),
    }
    for name in fast:
        assert fast[name].item() == pytest.approx(slow[name].item(), rel=1e-5), name
        (g_fast,) = torch.autograd.grad(fast[name], logits, retain_graph=True)
        (g_slow,) = torch.autograd.grad(slow[name], ref_logits, retain_graph=True)
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-4, atol=1e-6, msg=name)


def test_p_penalty_equals_load_balance_when_sizes_are_equal():
    logits = torch.randn(50, 8)
    for method in ("top_k", "top_p"):
        r = route(logits, method=method, top_k=2)
        lb = L.load_balance_loss(probs_TE=r.probs_TE, mask_TE=r.mask_TE)
        pp = L.p_penalty_loss(probs_TE=r.probs_TE, mask_TE=r.mask_TE,
                              expert_sizes_E=L.normalized_expert_sizes([512] * 8))
        assert pp.item() == pytest.approx(lb.item(), rel=1e-6)


def test_p_penalty_gradient_pushes_probability_away_from_large_experts():
    # Uniform router, every expert equally used: only the sizes differ.
    logits = torch.zeros(16, len(SIZES), requires_grad=True)
    mask = torch.ones(16, len(SIZES), dtype=torch.bool)
    probs = torch.softmax(logits, dim=1)
    loss = L.p_penalty_loss(probs_TE=probs, mask_TE=mask, expert_sizes_E=L.normalized_expert_sizes(SIZES))
    (grad,) = torch.autograd.grad(loss, logits)
    per_expert = grad.mean(dim=0)
    # Gradient descent lowers logits with positive gradient: the largest expert's most.
    assert torch.all(per_expert[1:] > per_expert[:-1]), per_expert
    assert per_expert[-1] > 0 > per_expert[0]
    # One SGD step on the logits moves probability mass to the small experts.
    new_probs = torch.softmax(logits - 10.0 * grad, dim=1).mean(dim=0)
    assert new_probs[0] > 1 / len(SIZES) > new_probs[-1]


def test_size_normalisation_options():
    assert L.normalized_expert_sizes([1, 3]).tolist() == [0.5, 1.5]
    assert L.normalized_expert_sizes([1, 4], "max").tolist() == [0.25, 1.0]


def test_entropy_is_minimal_for_a_one_hot_router():
    sharp = torch.tensor([[1.0, 0.0, 0.0]])
    flat = torch.full((1, 3), 1 / 3)
    assert L.router_entropy_loss(probs_TE=sharp).item() == pytest.approx(0.0, abs=1e-6)
    assert L.router_entropy_loss(probs_TE=flat).item() == pytest.approx(torch.log(torch.tensor(3.0)).item())
