"""Auxiliary router losses as keyword-only pure functions.

Shape legend: T tokens, E experts. Notation of the HMoE paper (Wang et al.,
arXiv 2408.10681, Sec. 3.2): E^t is the set of experts active for token t,

* T_i    = (1/T) sum_t 1{i in E^t}      (share of tokens that activate expert i)
* Phat_i = (1/T) sum_t P_{i,t}          (mean router probability, full softmax)

Every function takes the router's *actual* selection (``mask_TE``) instead of
recomputing one, which would be silently wrong for Top-P. Gradients flow
through the probabilities only; the selection counts are constants, as in
Switch/GShard.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .config import SizeNormalization


def _expert_share_E(mask_TE: torch.Tensor) -> torch.Tensor:
    return mask_TE.float().mean(dim=0)


def load_balance_loss(*, probs_TE: torch.Tensor, mask_TE: torch.Tensor) -> torch.Tensor:
    """Switch/GShard load-balance loss, Eq. 3: ``L_lb = N * sum_i T_i * Phat_i``.

    Equals 1 (times k for Top-K) when routing is perfectly uniform.
    """
    num_experts = probs_TE.shape[1]
    return num_experts * torch.sum(_expert_share_E(mask_TE) * probs_TE.mean(dim=0))


def normalized_expert_sizes(
    expert_sizes: Sequence[int] | torch.Tensor,
    normalization: SizeNormalization | str = SizeNormalization.MEAN,
    *,
    device: torch.device | None = None,
) -> torch.Tensor:
    """h_i scaled for P-Penalty: h_i / mean(h) (default) or h_i / max(h).

    The paper states that P-Penalty equals the load-balance loss when all
    experts have the same size; that holds only when h is normalised so that
    equal sizes give 1, which is what ``mean`` does.
    """
    sizes_E = torch.as_tensor(expert_sizes, dtype=torch.float32, device=device)
    if SizeNormalization(normalization) is SizeNormalization.MEAN:
        return sizes_E / sizes_E.mean()
    return sizes_E / sizes_E.max()


def p_penalty_loss(
    *,
    probs_TE: torch.Tensor,
    mask_TE: torch.Tensor,
    expert_sizes_E: torch.Tensor,
) -> torch.Tensor:
    """HMoE parameter-penalty loss, Eq. 4: ``L_pp = N * sum_i M_i * Phat_i``.

    ``M_i = (1/T) sum_t 1{i in E^t} * h_i`` weighs each expert's share of tokens
    by its (normalised, see :func:`normalized_expert_sizes`) size, so the
    gradient pushes router probability away from large, heavily used experts
    and towards small ones, lowering activated parameters per token.
    """
    num_experts = probs_TE.shape[1]
    m_E = _expert_share_E(mask_TE) * expert_sizes_E.to(probs_TE.dtype)
    return num_experts * torch.sum(m_E * probs_TE.mean(dim=0))


def router_entropy_loss(*, probs_TE: torch.Tensor) -> torch.Tensor:
    """Router entropy, Eq. 5, minimised for Top-P: ``mean_t(-sum_i P_i log P_i)``.

    The HMoE paper prints ``N * sum_i P_i log P_i`` without the minus sign (a
    typo: minimising that would *raise* entropy); the dynamic-routing paper
    (Huang et al., 2024, Eq. 6) minimises the entropy, which sharpens the
    distribution so Top-P does not activate almost every expert.
    """
    log_probs_TE = torch.log(probs_TE.clamp(min=torch.finfo(probs_TE.dtype).tiny))
    return -(probs_TE * log_probs_TE).sum(dim=1).mean()


def router_z_loss(*, logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t(logsumexp(logits_t)^2)``; off in the paper."""
    return torch.logsumexp(logits_TE.float(), dim=1).square().mean()
