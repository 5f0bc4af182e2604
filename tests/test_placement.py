"""Expert placement (hmoe_ds/placement.py): DeepSpeed's contiguous layout and the size-balanced one.

The arithmetic sizes are the quickstart's, 16 x {9, 11, ..., 23}: sorted, so the
contiguous layout puts every large expert on the last EP rank.
"""

from __future__ import annotations

import pytest

from hmoe_ds.config import PlacementStrategy
from hmoe_ds.placement import (
    ExpertPlacement,
    balanced_placement,
    contiguous_placement,
    make_placement,
    slot_to_expert_tensor,
)

ARITHMETIC = [16 * x for x in range(9, 24, 2)]  # 144, 176, ..., 368 (8 experts)


def max_over_mean(placement: ExpertPlacement, weights: list[float]) -> float:
    load = placement.rank_load(weights)
    return max(load) / (sum(load) / len(load))


@pytest.mark.parametrize("num_experts, ep_size", [(8, 1), (8, 2), (8, 4), (8, 8), (6, 3), (16, 4)])
def test_contiguous_is_deepspeeds_layout(num_experts: int, ep_size: int) -> None:
    """DeepSpeed's MoE: EP rank r owns global experts [r*E/ep, (r+1)*E/ep), i.e. slot order = expert order."""
    placement = contiguous_placement(num_experts, ep_size)
    per_rank = num_experts // ep_size
    assert placement.ep_size == ep_size and placement.num_local_experts == per_rank
    for r in range(ep_size):
        assert placement.local_experts(r) == tuple(range(r * per_rank, (r + 1) * per_rank))
    assert placement.slot_to_expert == list(range(num_experts))
    assert slot_to_expert_tensor(placement).tolist() == list(range(num_experts))


@pytest.mark.parametrize(
    "ep_size, contiguous_ratio, expected_ranks",
    [
        (2, 1280 / 1024, ((0, 3, 4, 7), (1, 2, 5, 6))),
        (4, 704 / 512, ((0, 7), (1, 6), (2, 5), (3, 4))),
    ],
)
def test_balanced_evens_out_arithmetic_sizes(ep_size: int, contiguous_ratio: float, expected_ranks: tuple) -> None:
    contiguous = contiguous_placement(len(ARITHMETIC), ep_size)
    balanced = balanced_placement(ARITHMETIC, ep_size)
    assert max_over_mean(contiguous, ARITHMETIC) == pytest.approx(contiguous_ratio)  # 1.25 (ep 2), 1.375 (ep 4)
    assert max_over_mean(balanced, ARITHMETIC) == pytest.approx(1.0)  # every rank holds the same total width
    assert balanced.rank_experts == expected_ranks  # large paired with small, as in the paper's Appendix D


@pytest.mark.parametrize("k", [1, 3, 16])
def test_balanced_is_scale_free_and_far_better_for_any_multiple(k: int) -> None:
    sizes = [k * x for x in range(9, 24, 2)]
    for ep_size in (2, 4):
        balanced = balanced_placement(sizes, ep_size)
        contiguous = contiguous_placement(len(sizes), ep_size)
        assert balanced == balanced_placement(ARITHMETIC, ep_size)  # only the ratios of sizes matter
        assert max_over_mean(balanced, sizes) - 1 < 0.01 * (max_over_mean(contiguous, sizes) - 1)


def test_balanced_is_deterministic_and_places_every_expert_once() -> None:
    sizes = [96, 32, 64, 128, 32, 96, 64, 128, 160, 32, 64, 96]
    for ep_size in (1, 2, 3, 4, 6, 12):
        first = balanced_placement(sizes, ep_size)
        assert all(balanced_placement(list(sizes), ep_size) == first for _ in range(3))
        assert sorted(first.slot_to_expert) == list(range(len(sizes)))
        assert {len(r) for r in first.rank_experts} == {len(sizes) // ep_size}
        assert all(list(r) == sorted(r) for r in first.rank_experts)  # local slots in expert order
        assert ExpertPlacement.from_dict(first.to_dict()) == first


def test_ties_are_broken_by_index() -> None:
    assert balanced_placement([100] * 4, 2).rank_experts == ((0, 2), (1, 3))
    assert balanced_placement([100] * 4, 1).rank_experts == ((0, 1, 2, 3),)


def test_expected_token_share_rebalances_work_not_width() -> None:
    """Equal widths, skewed usage: uniform shares balance width only; the shares balance h_i * s_i."""
    sizes, share = [100] * 4, [0.4, 0.3, 0.2, 0.1]
    work = [h * s for h, s in zip(sizes, share)]
    by_size = balanced_placement(sizes, 2)
    by_work = balanced_placement(sizes, 2, expected_token_share=share)
    assert by_size.rank_experts == ((0, 2), (1, 3)) and max_over_mean(by_size, work) == pytest.approx(60 / 50)
    assert by_work.rank_experts == ((0, 3), (1, 2)) and max_over_mean(by_work, work) == pytest.approx(1.0)
    # Uniform shares are the default.
    assert balanced_placement(sizes, 2, expected_token_share=[1.0] * 4) == by_size


def test_expected_token_share_on_arithmetic_sizes_beats_contiguous() -> None:
    """Small experts used more (as the paper observes): the share-aware placement differs and is far flatter."""
    share = [0.3, 0.2, 0.15, 0.1, 0.1, 0.07, 0.05, 0.03]
    work = [h * s for h, s in zip(ARITHMETIC, share)]
    aware = balanced_placement(ARITHMETIC, 2, expected_token_share=share)
    assert aware != balanced_placement(ARITHMETIC, 2)
    assert max_over_mean(contiguous_placement(8, 2), work) == pytest.approx(133.6 / 104.96)  # ~1.27
    assert max_over_mean(aware, work) < 1.025


def test_make_placement_dispatches_on_the_strategy() -> None:
    assert make_placement("contiguous", ARITHMETIC, 4) == contiguous_placement(8, 4)
    assert make_placement(PlacementStrategy.BALANCED, ARITHMETIC, 4) == balanced_placement(ARITHMETIC, 4)
    with pytest.raises(ValueError):
        make_placement("round_robin", ARITHMETIC, 4)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: contiguous_placement(8, 3), r"ep_size=3 must be >= 1 and divide the number of experts \(8\)"),
        (lambda: contiguous_placement(8, 0), r"ep_size=0 must be >= 1"),
        (lambda: balanced_placement(ARITHMETIC, 3), r"ep_size=3 must be >= 1 and divide"),
        (lambda: balanced_placement(ARITHMETIC, 2, expected_token_share=[1.0] * 7),
         r"expected_token_share has 7 entries for 8 experts"),
        (lambda: ExpertPlacement(((0, 1), (1, 2))), r"must hold every expert 0..3 exactly once"),
        (lambda: ExpertPlacement(((0, 1, 2), (3,))), r"every rank must hold the same number of experts"),
    ],
)
def test_bad_input_is_refused(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
