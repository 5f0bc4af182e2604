"""Expert FFN hidden sizes for heterogeneous experts, and parameter accounting.

HMoE (Wang et al. 2024, "HMoE: Heterogeneous Mixture of Experts for Language
Modeling", arXiv 2408.10681) gives the N experts of an MoE layer different FFN
hidden sizes h_1..h_N. The paper studies a few *relative* size distributions
(its expert-size-distribution ablation) and scales them so that the
SUM of hidden sizes equals the homogeneous model's N * h, which keeps total
expert parameters (and, under uniform routing, expected activated parameters)
equal to the baseline. Its 3B model uses 256 x {9, 11, ..., 23} =
{2304, 2816, ..., 5888} (sum 32,768 = 8 x 4096); its 0.4B model's experts sum
to 12,288.

This module owns:

* :class:`SizeDistribution` and :func:`relative_sizes` — the named shapes;
* :func:`solve_expert_sizes` — scale a shape to a target total, each size a
  multiple of e.g. 64, with the sum hit exactly;
* :func:`parse_expert_sizes` — the single entry point for configs (an explicit
  list, or a mapping of :func:`solve_expert_sizes` keywords);
* parameter accounting — total and activated expert parameters (the paper's
  "activated parameters" metric, averaged over tokens after training).

Notation: d = model width (``hidden_size``), h_i = expert i's FFN hidden size,
E = number of experts, T = number of tokens.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from fractions import Fraction
from typing import Any

if sys.version_info >= (3, 11):
    from enum import StrEnum as _StrEnum
else:  # pragma: no cover - exercised only on Python 3.10

    class _StrEnum(str, Enum):
        """Python 3.10 stand-in for :class:`enum.StrEnum` (str() gives the value)."""

        def __str__(self) -> str:
            return str(self.value)


__all__ = [
    "SizeDistribution",
    "activated_expert_params_per_token",
    "describe_expert_sizes",
    "expected_activated_expert_params",
    "expert_param_count",
    "parse_expert_sizes",
    "relative_sizes",
    "router_param_count",
    "solve_expert_sizes",
    "total_expert_params",
    "validate_expert_sizes",
]


class SizeDistribution(_StrEnum):
    """Named relative expert-size shapes (the HMoE paper's size-distribution ablation).

    * ``uniform``: all equal — the homogeneous MoE baseline.
    * ``arithmetic``: {9, 11, ..., 23} for 8 experts — used in all of the
      paper's main experiments.
    * ``geometric``: {1, 2, 4, ..., 128} for 8 experts — the paper's worst
      (the ratio is so extreme that small experts starve).
    * ``hybrid``: {1, 1, 1, 1, 2, 2, 4, 4} for 8 experts — beat arithmetic in
      the paper's ablation.
    """

    UNIFORM = "uniform"
    ARITHMETIC = "arithmetic"
    GEOMETRIC = "geometric"
    HYBRID = "hybrid"


_ALLOWED_DISTRIBUTIONS = ", ".join(repr(d.value) for d in SizeDistribution)
_SPEC_KEYS = ("distribution", "relative", "num_experts", "total_hidden", "homogeneous_hidden", "multiple")


# --------------------------------------------------------------------------- validation helpers


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `True` experts is always a config mistake.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_positive_int(name: str, value: object) -> int:
    if not _is_int(value) or int(value) < 1:  # type: ignore[call-overload]
        raise ValueError(f"{name} must be a positive int (>= 1), got {value!r}")
    return int(value)  # type: ignore[call-overload]


def _as_distribution(distribution: SizeDistribution | str) -> SizeDistribution:
    try:
        return SizeDistribution(distribution)
    except ValueError:
        raise ValueError(
            f"distribution={distribution!r} is not a known expert-size distribution; "
            f"allowed: {_ALLOWED_DISTRIBUTIONS} (or pass an explicit `relative` list)"
        ) from None


def validate_expert_sizes(expert_sizes: Sequence[int]) -> list[int]:
    """Check an explicit list of expert hidden sizes and return it as ``list[int]``.

    Raises ValueError if the list is empty or any entry is not a positive int.
    Order is kept (the layer maps logical expert i to ``expert_sizes[i]``).
    """
    if isinstance(expert_sizes, (str, bytes)) or not isinstance(expert_sizes, Sequence):
        raise ValueError(
            f"expert_sizes must be a list of positive ints, got {type(expert_sizes).__name__} {expert_sizes!r}"
        )
    if len(expert_sizes) == 0:
        raise ValueError("expert_sizes must be a non-empty list of positive ints, got []")
    for i, size in enumerate(expert_sizes):
        if not _is_int(size) or int(size) < 1:
            raise ValueError(
                f"expert_sizes[{i}]={size!r} is invalid: every expert size must be a positive int, "
                f"got expert_sizes={list(expert_sizes)!r}"
            )
    return [int(size) for size in expert_sizes]


# --------------------------------------------------------------------------- shapes


def relative_sizes(distribution: SizeDistribution | str, num_experts: int) -> list[float]:
    """Relative (unscaled) expert sizes for a named distribution, ascending.

    The paper only gives 8-expert shapes (its size-distribution ablation); for other E we
    generalise as follows:

    * ``uniform``: ``[1] * E``.
    * ``arithmetic``: ``2*i + (E + 1)`` for i in 0..E-1, i.e. consecutive odd
      numbers starting at E + 1 ({9, ..., 23} for E = 8). This keeps the
      paper's max/min ratio close to 3 for any E ((3E - 1) / (E + 1)) —
      the paper found moderate ratios work best — and the sum is 2 E^2.
    * ``geometric``: ``2**i`` ({1, ..., 128} for E = 8); the ratio grows as
      2^(E-1), so this is mainly for reproducing the ablation.
    * ``hybrid``: half the experts 1, a quarter 2, a quarter 4
      ({1,1,1,1,2,2,4,4} for E = 8); needs E divisible by 4.
    """
    dist = _as_distribution(distribution)
    n = _check_positive_int("num_experts", num_experts)
    if dist is SizeDistribution.UNIFORM:
        return [1.0] * n
    if dist is SizeDistribution.ARITHMETIC:
        return [float(2 * i + n + 1) for i in range(n)]
    if dist is SizeDistribution.GEOMETRIC:
        return [float(2**i) for i in range(n)]
    # HYBRID
    if n % 4 != 0:
        raise ValueError(
            f"num_experts={n} does not work with distribution='hybrid': it needs num_experts divisible by 4 "
            "(half the experts size 1, a quarter size 2, a quarter size 4); use a multiple of 4 or another "
            "distribution"
        )
    return [1.0] * (n // 2) + [2.0] * (n // 4) + [4.0] * (n // 4)


# --------------------------------------------------------------------------- solver


def _apportion(weights: Sequence[Fraction], units: int) -> list[int]:
    """Split ``units`` (>= len(weights)) into positive ints proportional to ``weights``.

    Water-filling plus the largest-remainder (Hamilton) method, in exact
    rational arithmetic so ties (common: the 0.4B model's shares are all
    x.5) are decided by the rule below, not by float noise:

    1. Experts whose proportional share is below one unit get exactly one, and
       the remaining units are re-shared among the others; repeat.
    2. Each remaining expert gets floor(share); the leftover units go one each
       to the largest fractional parts, ties to the higher index (the larger
       expert when weights ascend), which keeps ascending weights ascending.

    Result: sum == units, every entry >= 1, and |alloc_i - share_i| < 1 for
    every expert not clamped in step 1.
    """
    alloc = [0] * len(weights)
    free = list(range(len(weights)))
    remaining = units
    # Invariant: remaining >= len(free), so step 1 can never clamp every free expert.
    while True:
        total = sum((weights[i] for i in free), Fraction(0))
        clamped = [i for i in free if weights[i] * remaining < total]
        if not clamped:
            break
        for i in clamped:
            alloc[i] = 1
        remaining -= len(clamped)
        free = [i for i in free if alloc[i] == 0]

    shares = {i: weights[i] * remaining / total for i in free}
    for i in free:
        alloc[i] = math.floor(shares[i])
    leftover = remaining - sum(alloc[i] for i in free)
    by_remainder = sorted(free, key=lambda i: (shares[i] - alloc[i], i), reverse=True)
    for i in by_remainder[:leftover]:
        alloc[i] += 1
    return alloc


def solve_expert_sizes(
    *,
    num_experts: int,
    total_hidden: int | None = None,
    homogeneous_hidden: int | None = None,
    distribution: SizeDistribution | str | None = None,
    relative: Sequence[float] | None = None,
    multiple: int = 64,
) -> list[int]:
    """Expert FFN hidden sizes proportional to a shape, summing to a target.

    Following the HMoE paper, the sizes are scaled so that sum_i h_i equals
    the target: ``total_hidden`` directly, or ``num_experts *
    homogeneous_hidden`` to match a homogeneous baseline's total FFN
    parameters (give exactly one of the two).

    Args:
        num_experts: E.
        total_hidden: target sum of the E hidden sizes.
        homogeneous_hidden: per-expert hidden size of the homogeneous baseline.
        distribution: named shape (see :func:`relative_sizes`); defaults to
            ``"arithmetic"`` (the paper's main setting) when ``relative`` is
            not given. Give at most one of ``distribution`` and ``relative``.
        relative: explicit positive relative sizes, length E; the output keeps
            its order.
        multiple: every size is a multiple of this (e.g. 64 for efficient
            matmuls), and at least one multiple.

    Returns:
        E ints, each a multiple of ``multiple`` and >= ``multiple``, in the
        shape's order (ascending for the named distributions). The sum equals
        the target exactly when the target is a multiple of ``multiple``;
        otherwise it is the closest achievable sum, the target rounded to the
        nearest multiple (halves round up). Each size is within one multiple of
        its exact proportional share, except sizes raised to the one-multiple
        minimum (the others then shrink to pay for them).

    Examples (the paper's 3B model):
        >>> solve_expert_sizes(num_experts=8, homogeneous_hidden=4096, distribution="arithmetic")
        [2304, 2816, 3328, 3840, 4352, 4864, 5376, 5888]
    """
    n = _check_positive_int("num_experts", num_experts)
    m = _check_positive_int("multiple", multiple)

    if (total_hidden is None) == (homogeneous_hidden is None):
        raise ValueError(
            "give exactly one of total_hidden (the sum of expert sizes) or homogeneous_hidden (the baseline's "
            f"per-expert size; target = num_experts * homogeneous_hidden), got total_hidden={total_hidden!r}, "
            f"homogeneous_hidden={homogeneous_hidden!r}"
        )
    if total_hidden is not None:
        target = _check_positive_int("total_hidden", total_hidden)
        target_name = f"total_hidden={target}"
    else:
        target = n * _check_positive_int("homogeneous_hidden", homogeneous_hidden)
        target_name = f"num_experts * homogeneous_hidden = {n} * {homogeneous_hidden} = {target}"

    if relative is not None and distribution is not None:
        raise ValueError(
            f"give at most one of distribution ({distribution!r}) or relative ({relative!r}), not both"
        )
    if relative is None:
        weights_f: Sequence[float] = relative_sizes(
            SizeDistribution.ARITHMETIC if distribution is None else distribution, n
        )
    else:
        if isinstance(relative, (str, bytes)) or not isinstance(relative, Sequence):
            raise ValueError(f"relative must be a list of {n} positive numbers, got {relative!r}")
        if len(relative) != n:
            raise ValueError(
                f"relative has {len(relative)} entries but num_experts={n}; give one relative size per expert"
            )
        for i, r in enumerate(relative):
            if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(r) or r <= 0:
                raise ValueError(f"relative[{i}]={r!r} is invalid: relative sizes must be finite positive numbers")
        weights_f = relative

    if target < n * m:
        raise ValueError(
            f"target total {target_name} is too small: {n} experts of at least multiple={m} each need a total "
            f">= {n * m}; raise the total or lower multiple"
        )
    # Closest achievable total in units of `multiple`; exact when m divides the target.
    units = (2 * target + m) // (2 * m)
    # Fractions: exact shares, so ties break by the documented rule and the
    # paper's 3B example comes out exact without float round-off.
    weights = [Fraction(float(w)) for w in weights_f]
    return [u * m for u in _apportion(weights, units)]


def parse_expert_sizes(spec: Sequence[int] | Mapping[str, Any]) -> list[int]:
    """Expert sizes from a config value (e.g. the ``expert_sizes`` YAML field).

    ``spec`` is either

    * an explicit list of positive ints, returned as is (validated), e.g.
      ``[128, 192, 256, 320]``; or
    * a mapping of :func:`solve_expert_sizes` keywords, e.g.
      ``{"distribution": "arithmetic", "num_experts": 8, "total_hidden": 12288,
      "multiple": 64}`` (keys: distribution, relative, num_experts,
      total_hidden, homogeneous_hidden, multiple; num_experts required).
    """
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(_SPEC_KEYS), key=str)
        if unknown:
            raise ValueError(
                f"expert-size spec has unknown key(s) {unknown!r}; allowed keys: {', '.join(_SPEC_KEYS)}"
            )
        if "num_experts" not in spec:
            raise ValueError(
                f"expert-size spec {dict(spec)!r} needs 'num_experts' (plus total_hidden or homogeneous_hidden)"
            )
        return solve_expert_sizes(**spec)
    if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        return validate_expert_sizes(spec)
    raise ValueError(
        f"expert-size spec must be a list of positive ints or a mapping of solve_expert_sizes keywords "
        f"({', '.join(_SPEC_KEYS)}), got {type(spec).__name__} {spec!r}"
    )


# --------------------------------------------------------------------------- parameter accounting


def expert_param_count(hidden_size: int, expert_size: int, gated: bool = True) -> int:
    """Weights of one expert FFN of width d = ``hidden_size`` and hidden size h.

    Gated (SwiGLU/GeGLU, the paper's LLaMA experts): gate, up and down
    projections, 3 * d * h. Plain MLP (GELU/ReLU): 2 * d * h. No biases (LLaMA
    style).
    """
    d = _check_positive_int("hidden_size", hidden_size)
    h = _check_positive_int("expert_size", expert_size)
    return (3 if gated else 2) * d * h


def total_expert_params(hidden_size: int, expert_sizes: Sequence[int], gated: bool = True) -> int:
    """Weights of all experts in one MoE layer: sum_i params(h_i), router excluded."""
    return sum(expert_param_count(hidden_size, h, gated) for h in validate_expert_sizes(expert_sizes))


def router_param_count(hidden_size: int, num_experts: int) -> int:
    """Router weights W_r (d x E, no bias): P_t = softmax(W_r x_t), as in HMoE's router."""
    return _check_positive_int("hidden_size", hidden_size) * _check_positive_int("num_experts", num_experts)


def activated_expert_params_per_token(
    hidden_size: int,
    expert_sizes: Sequence[int],
    tokens_per_expert: Iterable[float],
    num_tokens: int,
    gated: bool = True,
) -> float:
    """Measured expert parameters activated per token in one MoE layer.

    The paper's activated-parameter metric (reported in its Table 1, averaged
    over 3M tokens after training): sum_i count_i * params(h_i) / T, where count_i is
    the number of tokens routed to expert i (``tokens_per_expert``, e.g.
    ``RoutingStats.assignments_per_expert``; a 1-D tensor works) and T =
    ``num_tokens``. Under Top-P the number of experts per token varies, so this
    is the quantity P-Penalty (Eq. 4) pushes down.
    """
    sizes = validate_expert_sizes(expert_sizes)
    counts = [float(c) for c in tokens_per_expert]
    if len(counts) != len(sizes):
        raise ValueError(
            f"tokens_per_expert has {len(counts)} entries but expert_sizes has {len(sizes)}; give one count per expert"
        )
    if any(c < 0 for c in counts):
        raise ValueError(f"tokens_per_expert={counts!r} has a negative count; counts must be >= 0")
    t = _check_positive_int("num_tokens", num_tokens)
    return sum(c * expert_param_count(hidden_size, h, gated) for c, h in zip(counts, sizes)) / t


def expected_activated_expert_params(
    hidden_size: int,
    expert_sizes: Sequence[int],
    selection_rates: Sequence[float],
    gated: bool = True,
) -> float:
    """A-priori expected expert parameters activated per token in one MoE layer.

    ``selection_rates[i]`` is the fraction of tokens that select expert i
    (T_i of HMoE Eq. 3, in [0, 1]; the rates sum to the mean number of experts
    per token). Returns sum_i rate_i * params(h_i). With uniform Top-K routing
    every rate is k / E, giving k * mean_i params(h_i) — equal for a
    homogeneous and a heterogeneous layer with the same total size, which is
    why the paper matches sums.
    """
    sizes = validate_expert_sizes(expert_sizes)
    rates = [float(r) for r in selection_rates]
    if len(rates) != len(sizes):
        raise ValueError(
            f"selection_rates has {len(rates)} entries but expert_sizes has {len(sizes)}; give one rate per expert"
        )
    for i, r in enumerate(rates):
        if not 0.0 <= r <= 1.0:
            raise ValueError(
                f"selection_rates[{i}]={r!r} is invalid: a selection rate is a fraction of tokens, in [0, 1]"
            )
    return sum(r * expert_param_count(hidden_size, h, gated) for r, h in zip(rates, sizes))


def _human(count: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{suffix}"
    return f"{count:.0f}"


def describe_expert_sizes(
    hidden_size: int, expert_sizes: Sequence[int], top_k: int | None = None, gated: bool = True
) -> str:
    """A short human report on one MoE layer's expert sizes.

    Sizes, max/min ratio (the paper found moderate ratios work best), total
    expert parameters, router parameters and, if ``top_k`` is given, the
    expected activated expert parameters per token under uniform Top-K
    routing (k * mean params).
    """
    sizes = validate_expert_sizes(expert_sizes)
    n = len(sizes)
    total = total_expert_params(hidden_size, sizes, gated)
    lines = [
        f"{n} experts, d={hidden_size}, {'gated (3 d h)' if gated else 'plain (2 d h)'} FFN",
        f"  sizes: {sizes} (sum {sum(sizes)}, max/min {max(sizes) / min(sizes):.2f})",
        f"  expert params per layer: {_human(total)} ({total:,}); router: {router_param_count(hidden_size, n):,}",
    ]
    if top_k is not None:
        k = _check_positive_int("top_k", top_k)
        if k > n:
            raise ValueError(f"top_k={k} exceeds the number of experts ({n}); use 1 <= top_k <= {n}")
        expected = expected_activated_expert_params(hidden_size, sizes, [k / n] * n, gated)
        lines.append(f"  expected activated expert params/token at uniform top-{k}: {_human(expected)}")
    return "\n".join(lines)
