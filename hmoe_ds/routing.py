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

:func:`route_deepspeed` is Top-K with the conventions of DeepSpeed's
``TopKGate`` (its ``top1gating``, ``top2gating`` and ``topkgating``), for
layers built DeepSpeed-style: which experts are chosen (noisy selection,
sampled second expert), which assignments a full expert drops first, that
the gates are renormalised *after* the drop, and which selection the balance
loss counts. It returns the same :class:`RouterOutput`; the dispatch plan
reads the extra fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import RoutingMethod
# The selection rules live once, in the standalone model that every export carries (it may import nothing of
# hmoe_ds); the training router uses the same functions, so the two cannot choose differently.
from .hf.modeling_hmoe import top_k_mask, top_p_mask


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
    #: The selection the load-balance loss counts (DeepSpeed's top-1/top-2 count the first choice only).
    balance_mask_TE: torch.Tensor | None = None
    #: Factor on the load-balance loss (DeepSpeed's top-k for k > 2 divides by k).
    balance_scale: float = 1.0
    #: Which assignments a full expert keeps first (higher first); ``None`` keeps them in token order.
    drop_priority_TE: torch.Tensor | None = None
    #: Renormalise each token's gates over the experts that kept it, after capacity drops.
    renormalize_after_drop: bool = False


def _gate_weights(probs_TE: torch.Tensor, mask_TE: torch.Tensor, renormalize: bool) -> torch.Tensor:
    kept_TE = probs_TE * mask_TE
    if not renormalize:
        return kept_TE
    # eps clamp as DeepSpeed's gating does: only reachable when every kept
    # probability underflows, which would otherwise divide by zero.
    denom_T1 = kept_TE.sum(dim=1, keepdim=True).clamp(min=torch.finfo(kept_TE.dtype).eps)
    return kept_TE / denom_T1


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

    Draws from torch's global RNG exactly as DeepSpeed does (a
    ``torch.distributions`` uniform), so a seeded run consumes the same random
    numbers as DeepSpeed's gate; exact resume needs the RNG state saved.
    """
    if eps <= 0:
        return x
    low = torch.tensor(1.0 - eps, device=x.device)
    high = torch.tensor(1.0 + eps, device=x.device)
    return x * torch.distributions.uniform.Uniform(low, high).rsample(x.shape)


def gumbel_noise(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Standard Gumbel samples, drawn as DeepSpeed's ``gumbel_rsample`` draws them."""
    zero, one = torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)
    return torch.distributions.gumbel.Gumbel(zero, one).rsample(shape)


def uniform_noise(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """U(0, 1) samples, drawn as DeepSpeed's random token selection draws them."""
    zero, one = torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)
    return torch.distributions.uniform.Uniform(zero, one).rsample(shape)


def route_deepspeed(
    logits_TE: torch.Tensor,
    *,
    top_k: int,
    training: bool,
    noisy_gate_policy: str | None = None,
    use_rts: bool = False,
    second_expert_sampling: bool = False,
    used_token_T: torch.Tensor | None = None,
) -> RouterOutput:
    """Top-K routing with DeepSpeed ``TopKGate``'s conventions (``top1gating``/``top2gating``/``topkgating``).

    * k = 1: the expert of highest probability, or of highest logit plus
      Gumbel noise with ``noisy_gate_policy="RSample"`` (training only); the
      gate is the raw probability. A full expert keeps a random subset of its
      tokens with ``use_rts`` (random token selection), else the first in
      token order.
    * k = 2: the first choice by probability; the second by logit, plus
      Gumbel noise with ``second_expert_sampling``. A full expert keeps first
      choices before second choices, each in token order. Gates are
      renormalised over the kept pair.
    * k > 2: the k most probable; a full expert keeps its most probable
      tokens. Gates are renormalised over the kept experts.

    The balance loss (Eq. 3) counts the first choice only for k <= 2 and is
    divided by k for k > 2, as DeepSpeed's ``l_aux``. ``used_token_T`` (1 for
    tokens to route, 0 for padding) removes tokens from the selection, the
    counts and the loss; DeepSpeed applies it for k = 1 only, here for every k.
    Random numbers are drawn in DeepSpeed's order and way, so a seeded layer
    makes DeepSpeed's random choices.
    """
    logits_TE = logits_TE.float()
    num_tokens, num_experts = logits_TE.shape
    device = logits_TE.device
    noisy_logits_TE = None
    if top_k == 1 and noisy_gate_policy == "RSample" and training:
        noisy_logits_TE = logits_TE + gumbel_noise(logits_TE.shape, device)
    probs_TE = torch.softmax(logits_TE, dim=1)
    used_T1 = None if used_token_T is None else used_token_T.reshape(-1, 1).to(torch.bool)
    drop_priority_TE = None
    with torch.no_grad():
        if top_k <= 2:
            first_T = torch.argmax(noisy_logits_TE if noisy_logits_TE is not None else probs_TE, dim=1)
            first_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(1, first_T[:, None], True)
            if used_T1 is not None:
                first_TE = first_TE & used_T1
            mask_TE = first_TE
            if top_k == 2:
                second_logits_TE = logits_TE
                if second_expert_sampling:
                    second_logits_TE = logits_TE + gumbel_noise(logits_TE.shape, device)
                second_T = torch.argmax(second_logits_TE.masked_fill(first_TE, float("-inf")), dim=1)
                second_TE = torch.zeros_like(first_TE).scatter_(1, second_T[:, None], True)
                if used_T1 is not None:
                    second_TE = second_TE & used_T1
                mask_TE = first_TE | second_TE
                # First choices queue before second choices, each in token order.
                token_T1 = torch.arange(num_tokens, device=device, dtype=torch.float32)[:, None]
                drop_priority_TE = -(token_T1 + num_tokens * second_TE.float())
            elif use_rts:
                drop_priority_TE = first_TE.float() * uniform_noise(first_TE.shape, device)
            balance_mask_TE, balance_scale = first_TE, 1.0
        else:
            mask_TE = top_k_mask(probs_TE, top_k)
            if used_T1 is not None:
                mask_TE = mask_TE & used_T1
            drop_priority_TE = probs_TE.detach()
            balance_mask_TE, balance_scale = mask_TE, 1.0 / top_k
    return RouterOutput(
        logits_TE=logits_TE,
        probs_TE=probs_TE,
        mask_TE=mask_TE,
        weights_TE=_gate_weights(probs_TE, mask_TE, renormalize=top_k > 1),
        balance_mask_TE=balance_mask_TE,
        balance_scale=balance_scale,
        drop_priority_TE=drop_priority_TE,
        renormalize_after_drop=top_k > 1,
    )
