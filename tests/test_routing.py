"""Routers (hmoe_ds.routing) against the per-token sort-and-cumsum reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hmoe_ds.routing import multiplicative_jitter, route, top_p_mask

from .reference import route_reference


def _check_against_reference(logits, method, k, p, renormalize):
    out = route(logits, method=method, top_k=k, top_p=p, renormalize=renormalize)
    ref = route_reference(logits, method, k, p, renormalize)
    for t, (chosen, gates) in enumerate(ref):
        got = set(torch.nonzero(out.mask_TE[t]).flatten().tolist())
        assert got == chosen, f"token {t}: router chose {got}, reference {chosen}"
        for e in range(logits.shape[1]):
            expected = float(gates[e]) if e in chosen else 0.0
            assert out.weights_TE[t, e].item() == pytest.approx(expected, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 40),
    experts=st.integers(1, 12),
    p=st.floats(0.05, 1.0),
    renormalize=st.booleans(),
    seed=st.integers(0, 10_000),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
)
def test_top_p_matches_sort_and_cumsum_reference(tokens, experts, p, renormalize, seed, scale):
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)) * scale
    _check_against_reference(logits, "top_p", 1, p, renormalize)


@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(1, 40), experts=st.integers(1, 12), data=st.data(), renormalize=st.booleans(),
       seed=st.integers(0, 10_000))
def test_top_k_matches_reference_for_any_k(tokens, experts, data, renormalize, seed):
    k = data.draw(st.integers(1, experts))
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))
    out = route(logits, method="top_k", top_k=k, renormalize=renormalize)
    assert out.mask_TE.sum(dim=1).eq(k).all()
    _check_against_reference(logits, "top_k", k, 0.5, renormalize)


def test_top_p_includes_the_crossing_expert_and_at_least_one():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.34, 0.33, 0.33]])
    mask = top_p_mask(probs, 0.6)
    assert mask.tolist() == [[True, True, False], [True, False, False], [True, True, False]]
    # p tiny: still one expert; p = 1: every expert with mass left.
    assert top_p_mask(probs, 1e-6).sum(dim=1).eq(1).all()
    assert top_p_mask(probs, 1.0).all()


def test_gates_renormalised_by_default_and_raw_on_request():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits, dim=1)
    renorm = route(logits, method="top_k", top_k=2)
    raw = route(logits, method="top_k", top_k=2, renormalize=False)
    assert renorm.weights_TE.sum().item() == pytest.approx(1.0)
    assert raw.weights_TE[0, :2].tolist() == pytest.approx(probs[0, :2].tolist())
    assert raw.weights_TE[0, 2:].abs().sum() == 0


def test_gate_gradient_reaches_the_router_logits():
    logits = torch.randn(8, 5, requires_grad=True)
    out = route(logits, method="top_p", top_p=0.6)
    (out.weights_TE * torch.randn(8, 5)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_jitter_is_bounded_and_off_at_zero():
    x = torch.ones(100, 4)
    assert torch.equal(multiplicative_jitter(x, 0.0), x)
    y = multiplicative_jitter(x, 0.1)
    assert (y >= 0.9).all() and (y <= 1.1).all() and not torch.equal(y, x)


def test_top_p_one_keeps_every_expert_despite_rounding() -> None:
    """Found by hypothesis: with peaked logits the float32 mass of the first experts can round to 1.0."""
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)) * 5.0
    out = route(logits, method="top_p", top_p=1.0, renormalize=False)
    assert bool(out.mask_TE.all())
    _check_against_reference(logits, "top_p", 2, 1.0, False)
