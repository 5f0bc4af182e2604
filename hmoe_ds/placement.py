"""Placement of logical experts on expert-parallel ranks.

With unequal experts, DeepSpeed's contiguous placement (rank r holds experts
``[r*E/ep, (r+1)*E/ep)``) puts all the large experts on the last rank when
sizes are sorted, as the paper's are. The HMoE paper (Appendix D) proposes
pairing large, rarely used experts with small, often used ones so that every
device carries about the same work; :func:`balanced_placement` does that with
a greedy longest-processing-time assignment under the constraint that every
rank holds the same number of experts (DeepSpeed's groups assume it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .config import PlacementStrategy


@dataclass(frozen=True)
class ExpertPlacement:
    """Which logical experts each expert-parallel rank holds, in local-slot order.

    ``rank_experts[r][j]`` is the logical expert in local slot j of EP rank r.
    Flattened rank by rank this is the *slot order*: the order in which tokens
    are grouped before the all-to-all (DeepSpeed's global expert id of a slot is
    its index in this order).
    """

    rank_experts: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        flat = self.slot_to_expert
        if sorted(flat) != list(range(len(flat))):
            raise ValueError(f"placement {self.rank_experts} must hold every expert 0..{len(flat) - 1} exactly once")
        if len({len(r) for r in self.rank_experts}) != 1:
            raise ValueError(f"placement {self.rank_experts}: every rank must hold the same number of experts")

    @property
    def ep_size(self) -> int:
        return len(self.rank_experts)

    @property
    def num_local_experts(self) -> int:
        return len(self.rank_experts[0])

    @property
    def slot_to_expert(self) -> list[int]:
        return [e for rank in self.rank_experts for e in rank]

    def local_experts(self, ep_rank: int) -> tuple[int, ...]:
        return self.rank_experts[ep_rank]

    def rank_load(self, weights: Sequence[float]) -> list[float]:
        """Sum of per-expert ``weights`` (sizes, FLOPs, ...) on each rank."""
        return [float(sum(weights[e] for e in rank)) for rank in self.rank_experts]

    def to_dict(self) -> dict:
        return {"rank_experts": [list(r) for r in self.rank_experts]}

    @classmethod
    def from_dict(cls, data: dict) -> "ExpertPlacement":
        return cls(tuple(tuple(int(e) for e in r) for r in data["rank_experts"]))


def contiguous_placement(num_experts: int, ep_size: int) -> ExpertPlacement:
    """DeepSpeed's layout: rank r holds experts ``[r*E/ep, (r+1)*E/ep)``."""
    _check(num_experts, ep_size)
    per_rank = num_experts // ep_size
    return ExpertPlacement(tuple(tuple(range(r * per_rank, (r + 1) * per_rank)) for r in range(ep_size)))


def balanced_placement(
    expert_sizes: Sequence[int],
    ep_size: int,
    expected_token_share: Sequence[float] | None = None,
) -> ExpertPlacement:
    """Equalise expected work per rank (HMoE paper, Appendix D).

    Work of expert i is ``h_i * s_i`` where s_i is its expected share of routed
    tokens (uniform when not given, so the static default balances size
    alone). Experts are taken in decreasing work and each goes to the
    least-loaded rank that still has a free slot; ties go to the lower rank so
    the result is deterministic and identical on every process.
    """
    num_experts = len(expert_sizes)
    _check(num_experts, ep_size)
    share = [1.0] * num_experts if expected_token_share is None else [float(s) for s in expected_token_share]
    if len(share) != num_experts:
        raise ValueError(f"expected_token_share has {len(share)} entries for {num_experts} experts")
    work = [float(h) * s for h, s in zip(expert_sizes, share)]
    per_rank = num_experts // ep_size
    ranks: list[list[int]] = [[] for _ in range(ep_size)]
    load = [0.0] * ep_size
    for expert in sorted(range(num_experts), key=lambda e: (-work[e], e)):
        open_ranks = [r for r in range(ep_size) if len(ranks[r]) < per_rank]
        target = min(open_ranks, key=lambda r: (load[r], r))
        ranks[target].append(expert)
        load[target] += work[expert]
    return ExpertPlacement(tuple(tuple(sorted(r)) for r in ranks))


def make_placement(
    strategy: PlacementStrategy | str,
    expert_sizes: Sequence[int],
    ep_size: int,
    expected_token_share: Sequence[float] | None = None,
) -> ExpertPlacement:
    """Build the placement named by ``strategy`` (see :class:`PlacementStrategy`)."""
    if PlacementStrategy(strategy) is PlacementStrategy.CONTIGUOUS:
        return contiguous_placement(len(expert_sizes), ep_size)
    return balanced_placement(expert_sizes, ep_size, expected_token_share)


def slot_to_expert_tensor(placement: ExpertPlacement, device: torch.device | None = None) -> torch.Tensor:
    return torch.tensor(placement.slot_to_expert, dtype=torch.long, device=device)


def _check(num_experts: int, ep_size: int) -> None:
    if ep_size < 1 or num_experts % ep_size != 0:
        raise ValueError(f"ep_size={ep_size} must be >= 1 and divide the number of experts ({num_experts})")
