"""Routers as pure functions: logits in, a :class:`RouterOutput` out.

Shape legend: T tokens, E experts.

Both routers start from the full softmax P_t = softmax(W_r x_t) (HMoE paper,
Eq. 1) and differ only in which experts they keep:

* Top-K keeps the k most probable experts (Eq. 8);
* Top-P keeps the shortest prefix of experts, sorted by probability, whose
  cumulative mass reaches p (Eq. 9), so the expert that crosses p is included
  and at least one expert is always active.

Gate weights are renormalised over the kept experts (Eq. 8 and 11) unless
``renormalize=False``, which keeps the raw probabilities as the
dynamic-routing reference code does (Huang et al., 2024, arXiv 2403.07652).
Selection is a boolean ``[T, E]`` mask rather than ``[T, K]`` indices because
Top-P chooses a variable number of experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import RoutingMethod


@dataclass(frozen=True)
class RouterOutput:
    """What a router decided for a batch of tokens.

    Attributes:
        logits_TE: raw router logits (fp32), for the z-loss.
        probs_TE: full softmax over all experts (fp32), P_t in the paper; the
            auxiliary losses use it, never a re-derived selection.
        mask_TE: bool, True where expert e is active for token t (E^t).
        weights_TE: gate weights g_{t,e} (fp32, differentiable w.r.t. the
            router), zero outside ``mask_TE``.
    """

    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    mask_TE: torch.Tensor
    weights_TE: torch.Tensor


def _gate_weights(probs_TE: torch.Tensor, mask_TE: torch.Tensor, renormalize: bool) -> torch.Tensor:
    kept_TE = probs_TE * mask_TE
    if not renormalize:
        return kept_TE
    # eps clamp as DeepSpeed's gating does: only reachable when every kept
    # probability underflows, which would otherwise divide by zero.
    denom_T1 = kept_TE.sum(dim=1, keepdim=True).clamp(min=torch.finfo(kept_TE.dtype).eps)
    return kept_TE / denom_T1


def top_k_mask(probs_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k most probable experts per token (Eq. 8)."""
    _, idx_TK = torch.topk(probs_TE, k=k, dim=1)
    return torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(1, idx_TK, True)


def top_p_mask(probs_TE: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean mask of the Top-P set per token (Eq. 9).

    Expert j (in descending-probability order) is kept iff the mass of the
    experts strictly before it is still below p: that keeps exactly the
    shortest prefix whose cumulative sum reaches p, the crossing expert
    included, and always the most probable expert (its prefix mass is 0 < p).
    ``p >= 1`` keeps every expert (dense routing), whatever the rounding of the
    softmax.
    """
    if p >= 1.0:
        return torch.ones_like(probs_TE, dtype=torch.bool)
    sorted_TE, order_TE = torch.sort(probs_TE, dim=1, descending=True, stable=True)
    # In float64: a float32 running sum rounds differently depending on how the scan
    # is computed (sequentially, or with a wider accumulator as torch's CPU cumsum
    # does), which could flip a decision when the mass is within an ulp of p.
    cumulative_TE = torch.cumsum(sorted_TE.double(), dim=1)
    # Shifted rather than ``cumsum - sorted``: the subtraction rounds differently
    # from the running sum and could flip a decision when p is within an ulp.
    mass_before_TE = torch.cat([torch.zeros_like(cumulative_TE[:, :1]), cumulative_TE[:, :-1]], dim=1)
    keep_sorted_TE = mass_before_TE < p
    return torch.zeros_like(keep_sorted_TE).scatter_(1, order_TE, keep_sorted_TE)


def route(
    logits_TE: torch.Tensor,
    *,
    method: RoutingMethod | str,
    top_k: int = 2,
    top_p: float = 0.6,
    renormalize: bool = True,
) -> RouterOutput:
    """Route tokens given router logits ``[T, E]``.

    Args:
        logits_TE: router logits W_r x_t; converted to fp32 here because the
            softmax, the Top-P cumulative sum and the losses need the precision.
        method: ``top_k`` or ``top_p``.
        top_k: experts per token for Top-K.
        top_p: mass threshold for Top-P, in (0, 1].
        renormalize: renormalise gates over the kept experts (Eq. 8/11).
    """
    method = RoutingMethod(method)
    logits_TE = logits_TE.float()
    probs_TE = torch.softmax(logits_TE, dim=1)
    with torch.no_grad():
        if method is RoutingMethod.TOP_K:
            mask_TE = top_k_mask(probs_TE, top_k)
        else:
            mask_TE = top_p_mask(probs_TE, top_p)
    return RouterOutput(
        logits_TE=logits_TE,
        probs_TE=probs_TE,
        mask_TE=mask_TE,
        weights_TE=_gate_weights(probs_TE, mask_TE, renormalize),
    )


def multiplicative_jitter(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Multiply the router input by U(1 - eps, 1 + eps) noise (DeepSpeed's "Jitter").

    Draws from torch's global RNG, so exact resume needs the RNG state saved.
    """
    if eps <= 0:
        return x
    noise = torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
    return x * noise
