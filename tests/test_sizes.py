"""Tests for hmoe_ds/sizes.py: size distributions, the solver and parameter accounting (single process)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hmoe_ds.sizes import (
    SizeDistribution,
    activated_expert_params_per_token,
    describe_expert_sizes,
    expected_activated_expert_params,
    expert_param_count,
    parse_expert_sizes,
    relative_sizes,
    router_param_count,
    solve_expert_sizes,
    total_expert_params,
    validate_expert_sizes,
)

PAPER_3B = [2304, 2816, 3328, 3840, 4352, 4864, 5376, 5888]


# ----------------------------------------------------------------------------- the paper's examples


def test_paper_3b_arithmetic_from_homogeneous_baseline() -> None:
    sizes = solve_expert_sizes(num_experts=8, homogeneous_hidden=4096, distribution="arithmetic")
    assert sizes == PAPER_3B
    assert sum(sizes) == 8 * 4096 == 32768
    assert sizes == [256 * r for r in (9, 11, 13, 15, 17, 19, 21, 23)]


def test_paper_3b_default_distribution_is_arithmetic() -> None:
    assert solve_expert_sizes(num_experts=8, total_hidden=32768) == PAPER_3B


def test_paper_04b_sum_12288() -> None:
    sizes = solve_expert_sizes(num_experts=8, total_hidden=12288, distribution="arithmetic", multiple=64)
    assert sum(sizes) == 12288
    assert all(s % 64 == 0 for s in sizes)
    assert sizes == sorted(sizes)
    # Exact shares are 96 x {9..23} = 13.5..34.5 multiples of 64: every share is within one multiple.
    for s, r in zip(sizes, range(9, 24, 2)):
        assert abs(s - 96 * r) < 64
    # Ties (all x.5) go to the larger experts: documented tie rule.
    assert sizes == [832, 1024, 1216, 1408, 1664, 1856, 2048, 2240]
    # With multiple=32 the arithmetic shape is hit exactly.
    assert solve_expert_sizes(num_experts=8, total_hidden=12288, multiple=32) == [96 * r for r in range(9, 24, 2)]


# ----------------------------------------------------------------------------- distributions


def test_relative_sizes_paper_shapes() -> None:
    assert relative_sizes("uniform", 8) == [1.0] * 8
    assert relative_sizes("arithmetic", 8) == [9, 11, 13, 15, 17, 19, 21, 23]
    assert relative_sizes("geometric", 8) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert relative_sizes("hybrid", 8) == [1, 1, 1, 1, 2, 2, 4, 4]
    assert relative_sizes(SizeDistribution.HYBRID, 8) == relative_sizes("hybrid", 8)


def test_relative_sizes_generalisation() -> None:
    assert relative_sizes("arithmetic", 1) == [2]
    assert relative_sizes("arithmetic", 4) == [5, 7, 9, 11]
    assert relative_sizes("arithmetic", 16) == [2 * i + 17 for i in range(16)]
    assert relative_sizes("geometric", 3) == [1, 2, 4]
    assert relative_sizes("hybrid", 4) == [1, 1, 2, 4]
    assert relative_sizes("hybrid", 16) == [1] * 8 + [2] * 4 + [4] * 4


def test_size_distribution_is_str_enum() -> None:
    assert SizeDistribution("geometric") is SizeDistribution.GEOMETRIC
    assert str(SizeDistribution.ARITHMETIC) == "arithmetic"
    assert SizeDistribution.HYBRID == "hybrid"
    assert [d.value for d in SizeDistribution] == ["uniform", "arithmetic", "geometric", "hybrid"]


@pytest.mark.parametrize("distribution", ["uniform", "arithmetic", "geometric", "hybrid"])
def test_each_distribution_scaled_exactly(distribution: str) -> None:
    # Totals chosen so each shape scales with no rounding: sizes == relative * scale.
    rel = relative_sizes(distribution, 8)
    scale = 64
    sizes = solve_expert_sizes(num_experts=8, total_hidden=int(sum(rel)) * scale, distribution=distribution)
    assert sizes == [int(r) * scale for r in rel]


def test_uniform_matches_homogeneous() -> None:
    assert solve_expert_sizes(num_experts=8, homogeneous_hidden=2048, distribution="uniform") == [2048] * 8


def test_geometric_small_total_clamps_small_experts_to_one_multiple() -> None:
    # Shares of the four smallest experts are below one multiple; they get exactly one and the rest is re-shared.
    sizes = solve_expert_sizes(num_experts=8, total_hidden=16 * 64, distribution="geometric")
    assert sizes == [64, 64, 64, 64, 64, 128, 192, 384]
    assert sum(sizes) == 1024


def test_explicit_relative_keeps_order() -> None:
    assert solve_expert_sizes(num_experts=3, total_hidden=6 * 64, relative=[3, 1, 2]) == [192, 64, 128]
    assert solve_expert_sizes(num_experts=2, total_hidden=300, relative=[0.5, 1.0], multiple=1) == [100, 200]


def test_target_not_a_multiple_gives_closest_achievable() -> None:
    # 4 experts, multiple 64: 1000 -> 15.625 multiples -> 16 -> 1024.
    assert sum(solve_expert_sizes(num_experts=4, total_hidden=1000, distribution="uniform")) == 1024
    # 970 -> 15.16 multiples -> 15 -> 960.
    assert sum(solve_expert_sizes(num_experts=4, total_hidden=970, distribution="uniform")) == 960
    # Exactly half way rounds up: 992 = 15.5 multiples -> 16.
    assert sum(solve_expert_sizes(num_experts=4, total_hidden=992, distribution="uniform")) == 1024


def test_single_expert() -> None:
    assert solve_expert_sizes(num_experts=1, total_hidden=4096) == [4096]


# ----------------------------------------------------------------------------- parse_expert_sizes


def test_parse_explicit_list_round_trip() -> None:
    sizes = [128, 192, 256, 320]
    out = parse_expert_sizes(sizes)
    assert out == sizes and out is not sizes
    assert parse_expert_sizes((1, 2, 3)) == [1, 2, 3]
    assert parse_expert_sizes(parse_expert_sizes(PAPER_3B)) == PAPER_3B


def test_parse_mapping_spec() -> None:
    spec = {"distribution": "arithmetic", "num_experts": 8, "total_hidden": 12288, "multiple": 64}
    assert parse_expert_sizes(spec) == solve_expert_sizes(**spec)  # type: ignore[arg-type]
    assert parse_expert_sizes({"num_experts": 8, "homogeneous_hidden": 4096}) == PAPER_3B
    assert parse_expert_sizes({"num_experts": 2, "relative": [1, 3], "total_hidden": 256}) == [64, 192]


def test_parse_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['hidden'\]; allowed keys: distribution"):
        parse_expert_sizes({"num_experts": 8, "hidden": 4096})
    with pytest.raises(ValueError, match="needs 'num_experts'"):
        parse_expert_sizes({"total_hidden": 4096})
    with pytest.raises(ValueError, match="must be a list of positive ints or a mapping.*got str 'arithmetic'"):
        parse_expert_sizes("arithmetic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got int 8"):
        parse_expert_sizes(8)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- validation errors


def test_validate_expert_sizes_errors() -> None:
    assert validate_expert_sizes([1, 2]) == [1, 2]
    with pytest.raises(ValueError, match=r"expert_sizes must be a non-empty list of positive ints, got \[\]"):
        validate_expert_sizes([])
    with pytest.raises(ValueError, match=r"expert_sizes\[1\]=0 is invalid: every expert size must be a positive int"):
        validate_expert_sizes([64, 0])
    with pytest.raises(ValueError, match=r"expert_sizes\[0\]=-64 is invalid"):
        validate_expert_sizes([-64])
    with pytest.raises(ValueError, match=r"expert_sizes\[2\]=64.0 is invalid"):
        validate_expert_sizes([64, 64, 64.0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"expert_sizes\[0\]=True is invalid"):
        validate_expert_sizes([True])
    with pytest.raises(ValueError, match="expert_sizes must be a list of positive ints, got str"):
        validate_expert_sizes("64")  # type: ignore[arg-type]


def test_num_experts_errors() -> None:
    with pytest.raises(ValueError, match=r"num_experts must be a positive int \(>= 1\), got 0"):
        relative_sizes("uniform", 0)
    with pytest.raises(ValueError, match=r"num_experts must be a positive int \(>= 1\), got -1"):
        solve_expert_sizes(num_experts=-1, total_hidden=1024)
    with pytest.raises(ValueError, match=r"num_experts must be a positive int \(>= 1\), got 2.0"):
        solve_expert_sizes(num_experts=2.0, total_hidden=1024)  # type: ignore[arg-type]


def test_multiple_errors() -> None:
    with pytest.raises(ValueError, match=r"multiple must be a positive int \(>= 1\), got 0"):
        solve_expert_sizes(num_experts=8, total_hidden=4096, multiple=0)


def test_unknown_distribution_error() -> None:
    msg = (
        r"distribution='linear' is not a known expert-size distribution; "
        r"allowed: 'uniform', 'arithmetic', 'geometric', 'hybrid'"
    )
    with pytest.raises(ValueError, match=msg):
        relative_sizes("linear", 8)
    with pytest.raises(ValueError, match=msg):
        solve_expert_sizes(num_experts=8, total_hidden=4096, distribution="linear")


def test_hybrid_divisibility_error() -> None:
    msg = "num_experts=6 does not work with distribution='hybrid': it needs num_experts divisible by 4"
    with pytest.raises(ValueError, match=msg):
        relative_sizes("hybrid", 6)


def test_target_errors() -> None:
    with pytest.raises(ValueError, match="give exactly one of .* got total_hidden=None, homogeneous_hidden=None"):
        solve_expert_sizes(num_experts=8)
    with pytest.raises(ValueError, match="give exactly one of .* got total_hidden=4096, homogeneous_hidden=512"):
        solve_expert_sizes(num_experts=8, total_hidden=4096, homogeneous_hidden=512)
    with pytest.raises(ValueError, match=r"total_hidden must be a positive int \(>= 1\), got -5"):
        solve_expert_sizes(num_experts=8, total_hidden=-5)
    with pytest.raises(ValueError, match=r"homogeneous_hidden must be a positive int \(>= 1\), got 0"):
        solve_expert_sizes(num_experts=8, homogeneous_hidden=0)
    with pytest.raises(
        ValueError,
        match=r"target total total_hidden=500 is too small: 8 experts of at least multiple=64 each need a total >= 512",
    ):
        solve_expert_sizes(num_experts=8, total_hidden=500)
    with pytest.raises(ValueError, match=r"num_experts \* homogeneous_hidden = 8 \* 32 = 256 is too small"):
        solve_expert_sizes(num_experts=8, homogeneous_hidden=32)


def test_relative_errors() -> None:
    with pytest.raises(ValueError, match="give at most one of distribution \\('geometric'\\) or relative"):
        solve_expert_sizes(num_experts=2, total_hidden=256, distribution="geometric", relative=[1, 2])
    with pytest.raises(ValueError, match="relative has 3 entries but num_experts=2"):
        solve_expert_sizes(num_experts=2, total_hidden=256, relative=[1, 2, 3])
    with pytest.raises(ValueError, match=r"relative\[1\]=0 is invalid: relative sizes must be finite positive numbers"):
        solve_expert_sizes(num_experts=2, total_hidden=256, relative=[1, 0])
    with pytest.raises(ValueError, match=r"relative\[0\]=inf is invalid"):
        solve_expert_sizes(num_experts=2, total_hidden=256, relative=[float("inf"), 1])
    with pytest.raises(ValueError, match="relative must be a list of 2 positive numbers"):
        solve_expert_sizes(num_experts=2, total_hidden=256, relative="12")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- parameter accounting


def test_param_counts_by_hand() -> None:
    d, sizes = 4, [2, 6]
    assert expert_param_count(d, 2) == 3 * 4 * 2 == 24  # gate, up, down
    assert expert_param_count(d, 6) == 72
    assert expert_param_count(d, 6, gated=False) == 2 * 4 * 6 == 48
    assert total_expert_params(d, sizes) == 96
    assert total_expert_params(d, sizes, gated=False) == 64
    assert router_param_count(d, 2) == 8


def test_activated_params_measured_by_hand() -> None:
    # 10 tokens; expert 0 (24 params) got 7 tokens, expert 1 (72 params) got 5: (7*24 + 5*72) / 10 = 52.8.
    assert activated_expert_params_per_token(4, [2, 6], [7, 5], 10) == pytest.approx(52.8)
    plain = activated_expert_params_per_token(4, [2, 6], [7, 5], 10, gated=False)
    assert plain == pytest.approx((7 * 16 + 5 * 48) / 10)
    torch = pytest.importorskip("torch")
    assert activated_expert_params_per_token(4, [2, 6], torch.tensor([7, 5]), 10) == pytest.approx(52.8)


def test_expected_activated_params() -> None:
    # Uniform top-2 over 8 experts: k * mean params, equal for the paper's HMoE and its homogeneous baseline.
    d = 1024
    rates = [2 / 8] * 8
    hmoe = expected_activated_expert_params(d, PAPER_3B, rates)
    homo = expected_activated_expert_params(d, [4096] * 8, rates)
    assert hmoe == pytest.approx(homo) == pytest.approx(2 * 3 * d * 4096)
    # All tokens to the smallest expert only.
    assert expected_activated_expert_params(4, [2, 6], [1.0, 0.0]) == 24


def test_accounting_errors() -> None:
    with pytest.raises(ValueError, match="tokens_per_expert has 1 entries but expert_sizes has 2"):
        activated_expert_params_per_token(4, [2, 6], [7], 10)
    with pytest.raises(ValueError, match="has a negative count"):
        activated_expert_params_per_token(4, [2, 6], [7, -1], 10)
    with pytest.raises(ValueError, match=r"num_tokens must be a positive int \(>= 1\), got 0"):
        activated_expert_params_per_token(4, [2, 6], [0, 0], 0)
    with pytest.raises(ValueError, match="selection_rates has 3 entries but expert_sizes has 2"):
        expected_activated_expert_params(4, [2, 6], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"selection_rates\[1\]=1.5 is invalid: .* in \[0, 1\]"):
        expected_activated_expert_params(4, [2, 6], [0.5, 1.5])
    with pytest.raises(ValueError, match=r"hidden_size must be a positive int \(>= 1\), got 0"):
        expert_param_count(0, 64)
    with pytest.raises(ValueError, match=r"expert_sizes\[0\]=0 is invalid"):
        total_expert_params(4, [0])


def test_describe_expert_sizes() -> None:
    text = describe_expert_sizes(1024, PAPER_3B, top_k=2)
    assert "8 experts, d=1024, gated" in text
    assert "sizes: [2304, 2816, 3328, 3840, 4352, 4864, 5376, 5888] (sum 32768, max/min 2.56)" in text
    assert f"{3 * 1024 * 32768:,}" in text  # 100,663,296 expert params
    assert "100.66M" in text
    assert "router: 8,192" in text
    assert "uniform top-2: 25.17M" in text  # 2 * 3 * 1024 * 4096
    assert "top-" not in describe_expert_sizes(1024, PAPER_3B)
    with pytest.raises(ValueError, match="top_k=9 exceeds the number of experts"):
        describe_expert_sizes(1024, PAPER_3B, top_k=9)


# ----------------------------------------------------------------------------- properties

_DISTRIBUTIONS = [d.value for d in SizeDistribution]


@st.composite
def _problems(draw: st.DrawFn) -> tuple[str, int, int, int]:
    distribution = draw(st.sampled_from(_DISTRIBUTIONS))
    n = 4 * draw(st.integers(1, 8)) if distribution == "hybrid" else draw(st.integers(1, 32))
    multiple = draw(st.sampled_from([1, 8, 32, 64, 128]) | st.integers(1, 300))
    total = draw(st.integers(n * multiple, n * multiple * 60))
    return distribution, n, multiple, total


@settings(max_examples=300, deadline=None)
@given(_problems())
def test_solver_properties(problem: tuple[str, int, int, int]) -> None:
    distribution, n, multiple, total = problem
    sizes = solve_expert_sizes(num_experts=n, total_hidden=total, distribution=distribution, multiple=multiple)
    assert len(sizes) == n
    assert all(s % multiple == 0 and s >= multiple for s in sizes)
    # The sum is exact whenever achievable, else the nearest multiple (halves up).
    if total % multiple == 0:
        assert sum(sizes) == total
    else:
        assert sum(sizes) == ((2 * total + multiple) // (2 * multiple)) * multiple
    assert sizes == sorted(sizes)  # ascending like the distribution
    # Without clamping to the one-multiple minimum, every size is within one multiple of its exact share.
    rel = [Fraction(r) for r in relative_sizes(distribution, n)]
    shares = [r / sum(rel) * sum(sizes) for r in rel]
    if min(shares) >= multiple:
        assert all(abs(s - share) < multiple for s, share in zip(sizes, shares))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 1 << 20), min_size=1, max_size=64))
def test_explicit_list_round_trip_property(sizes: list[int]) -> None:
    assert parse_expert_sizes(sizes) == sizes
