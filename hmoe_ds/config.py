"""Configuration of one HMoE layer: a typed, self-validating dataclass.

Every choice is a :class:`StrEnum`, so YAML/JSON strings (``"top_p"``) and the
enum members compare equal, and every error names the field, the bad value and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import sys
from dataclasses import dataclass
from typing import Any, Mapping

from .placement import ExpertPlacement

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10

    class StrEnum(str, enum.Enum):
        def __str__(self) -> str:
            return str(self.value)


class RoutingMethod(StrEnum):
    """How each token picks its experts (HMoE paper, Sec. 3.1)."""

    TOP_K = "top_k"  # a fixed number of experts per token (Eq. 8)
    TOP_P = "top_p"  # the smallest set whose probability mass reaches p (Eq. 9-11)


class ExpertActivation(StrEnum):
    """Expert FFN type. The gated ones have three matrices, the others two."""

    SWIGLU = "swiglu"
    GEGLU = "geglu"
    GELU = "gelu"
    RELU = "relu"

    @property
    def gated(self) -> bool:
        return self in (ExpertActivation.SWIGLU, ExpertActivation.GEGLU)


class SizeNormalization(StrEnum):
    """How expert sizes h_i are normalised inside the P-Penalty loss (Eq. 4).

    ``mean`` (h_i / mean(h)) makes P-Penalty equal the load-balance loss when
    all experts have the same size, which is the property the paper states;
    ``max`` (h_i / max(h)) keeps every weight <= 1.
    """

    MEAN = "mean"
    MAX = "max"


class PlacementStrategy(StrEnum):
    """How logical experts are laid out over expert-parallel ranks."""

    CONTIGUOUS = "contiguous"  # DeepSpeed's: rank r holds experts [r*E/ep, (r+1)*E/ep)
    BALANCED = "balanced"  # equalise expected work (size x routed share) per rank, shares uniform
    # Equalise measured work: at every (re)start from a checkpoint, each layer is re-placed from the token shares
    # the run logged up to it (hmoe_ds.training.replacement); "balanced" until anything is measured.
    MEASURED = "measured"


class ExpertCompute(StrEnum):
    """How a rank computes its experts (:mod:`hmoe_ds.experts`); the result is the same.

    ``grouped``: one grouped GEMM (``torch.nn.functional.grouped_mm``) per
    width bucket for each projection, so the operator count per layer is
    bounded by the number of buckets, not the number of experts. ``loop``:
    one GEMM chain per expert, in one autograd node. ``auto``: grouped on
    accelerators, the loop on CPU (measured faster there); the rule is in
    :func:`hmoe_ds.experts.resolve_expert_compute`.
    """

    AUTO = "auto"
    GROUPED = "grouped"
    LOOP = "loop"


class GateConvention(StrEnum):
    """Whose conventions Top-K routing follows; the math of both is in :mod:`hmoe_ds.routing`.

    ``hmoe``: the HMoE paper's (Eq. 3 and 8): gates renormalised over the
    chosen experts, full experts drop the latest tokens, the balance loss
    counts every chosen expert, ``exp_counts`` counts computed assignments.
    ``deepspeed``: DeepSpeed ``TopKGate``'s (see
    :func:`hmoe_ds.routing.route_deepspeed`), which layers built with
    DeepSpeed's constructor arguments get, so they reproduce DeepSpeed's MoE.
    """

    HMOE = "hmoe"
    DEEPSPEED = "deepspeed"


class NoisyGatePolicy(StrEnum):
    """DeepSpeed's ``noisy_gate_policy``: ``Jitter`` (router input x U(0.99, 1.01)) or ``RSample`` (Gumbel, top-1)."""

    JITTER = "Jitter"
    RSAMPLE = "RSample"


#: DeepSpeed's Jitter epsilon (``multiplicative_jitter``'s default).
DEEPSPEED_JITTER_EPS = 1e-2


class MoEFrontend(StrEnum):
    """How the layer presents its parameters to DeepSpeed (the math is identical).

    ``moe``: a ``deepspeed.moe.layer.MoE`` subclass with one module per expert
    (ZeRO stages 0-2; what DeepSpeed users know). ``autoep``: an
    ``AutoEPMoELayer`` subclass with each rank's experts packed into three
    parameters, the only form DeepSpeed partitions under ZeRO stage 3.
    """

    MOE = "moe"
    AUTOEP = "autoep"


def _choice(enum_cls: type[StrEnum], name: str, value: Any) -> Any:
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {allowed}") from None


@dataclass
class HMoELayerConfig:
    """Everything that defines one heterogeneous MoE layer (besides ``hidden_size``).

    Attributes:
        expert_sizes: FFN hidden size h_i of each expert, one per expert; all
            experts map d_model -> d_model. Unequal sizes make the layer an HMoE.
        routing: ``top_k`` (Eq. 8) or ``top_p`` (Eq. 9-11).
        top_k: experts per token for Top-K routing (1 <= k <= number of experts).
        top_p: probability-mass threshold p in (0, 1] for Top-P routing. The
            expert whose cumulative probability crosses p is included, so at
            least one expert is always active (Eq. 9).
        renormalize_gates: renormalise the gate weights over the chosen experts
            (Eq. 8 and 11, the paper's default); ``False`` keeps raw softmax
            probabilities as in the dynamic-routing code (Huang et al., 2024).
        activation: expert FFN type; SwiGLU as in the paper's LLaMA experts.
        capacity_factor: ``None`` (default) is dropless: every chosen (token,
            expert) pair is computed, as in the paper. A number enables the
            capacity path: each expert takes at most
            ``max(min_capacity, ceil(capacity_factor * assignments / E))`` tokens
            and the rest are dropped and counted.
        eval_capacity_factor: capacity factor in eval mode (defaults to
            ``capacity_factor``).
        min_capacity: lower bound of the per-expert capacity.
        jitter_eps: multiplicative input jitter for the router during training
            (DeepSpeed's "Jitter" policy); 0 disables it.
        load_balance_coef: weight of the Switch/GShard load-balance loss (Eq. 3).
        p_penalty_coef: weight of the HMoE parameter-penalty loss (Eq. 4); the
            paper uses 0.1 and *replaces* load balance with it for HMoE.
        entropy_coef: weight of the router-entropy loss (Eq. 5, Top-P; 3e-2 in
            the paper).
        z_loss_coef: weight of the router z-loss (ST-MoE); off in the paper.
        size_normalization: normalisation of h_i inside P-Penalty.
        ep_size: expert-parallel world size; must divide the number of experts.
        placement: how experts are placed over the ``ep_size`` ranks: a
            :class:`PlacementStrategy`, or an explicit
            :class:`~hmoe_ds.placement.ExpertPlacement` (one layer's layout resolved
            from measured load; its plain form is ``{"rank_experts": [[...], ...]}``).
        frontend: the DeepSpeed base class (``moe`` for ZeRO 0-2, ``autoep``
            for ZeRO-3); the trainer picks it from the DeepSpeed config.
        expert_compute: ``auto`` (default), ``grouped`` or ``loop``: how the
            experts are computed (same numbers within fp32 round-off; see
            :class:`ExpertCompute`). ``grouped`` needs ``hidden_size`` to be a
            multiple of 8 (``grouped_mm``'s 16-byte stride rule in bf16).
        gate_convention: ``hmoe`` (default) or ``deepspeed``: whose Top-K
            conventions the router follows (:class:`GateConvention`).
        noisy_gate_policy: DeepSpeed's ``None``, ``Jitter`` (the same as
            ``jitter_eps=0.01``) or ``RSample`` (Gumbel-noisy top-1 choice
            in training; ``deepspeed`` convention, k = 1).
        use_rts: random token selection: a full expert keeps a random subset
            of its tokens (``deepspeed`` convention, k = 1).
        top2_2nd_expert_sampling: choose the second expert with Gumbel noise
            (``deepspeed`` convention, k = 2).
        shared_expert_size: FFN hidden size of an always-on shared expert
            beside the routed ones (DeepSeekMoE, Qwen-MoE), added to the MoE
            output; 0 (default) for none. Counted in activated parameters.
        use_residual: Residual MoE (DeepSpeed's ``use_residual``, PR-MoE):
            the dense expert is mixed with the MoE output by a learned
            per-token two-way softmax coefficient instead of added.
    """

    expert_sizes: list[int]
    routing: RoutingMethod = RoutingMethod.TOP_P
    top_k: int = 2
    top_p: float = 0.6
    renormalize_gates: bool = True
    activation: ExpertActivation = ExpertActivation.SWIGLU
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    min_capacity: int = 4
    jitter_eps: float = 0.0
    load_balance_coef: float = 0.0
    p_penalty_coef: float = 0.1
    entropy_coef: float = 0.0
    z_loss_coef: float = 0.0
    size_normalization: SizeNormalization = SizeNormalization.MEAN
    ep_size: int = 1
    placement: PlacementStrategy | ExpertPlacement = PlacementStrategy.CONTIGUOUS
    frontend: MoEFrontend = MoEFrontend.MOE
    expert_compute: ExpertCompute = ExpertCompute.AUTO
    gate_convention: GateConvention = GateConvention.HMOE
    noisy_gate_policy: NoisyGatePolicy | None = None
    use_rts: bool = False
    top2_2nd_expert_sampling: bool = False
    shared_expert_size: int = 0
    use_residual: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_experts(self) -> int:
        return len(self.expert_sizes)

    def validate(self) -> "HMoELayerConfig":
        """Check every field; raise ``ValueError`` naming the field and the fix."""
        sizes = self.expert_sizes
        if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__len__") or len(sizes) == 0:
            raise ValueError(
                f"expert_sizes={sizes!r}: need a non-empty list of positive ints "
                "(one FFN hidden size per expert), e.g. [256, 384, 512, 640]"
            )
        bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s <= 0]
        if bad:
            raise ValueError(
                f"expert_sizes={list(sizes)!r}: every size must be a positive int; bad entries: {bad}"
            )
        self.expert_sizes = [int(s) for s in sizes]
        n = len(self.expert_sizes)
        self.routing = _choice(RoutingMethod, "routing", self.routing)
        self.activation = _choice(ExpertActivation, "activation", self.activation)
        self.size_normalization = _choice(SizeNormalization, "size_normalization", self.size_normalization)
        if isinstance(self.placement, dict):
            self.placement = ExpertPlacement.from_dict(self.placement)
        if not isinstance(self.placement, ExpertPlacement):
            self.placement = _choice(PlacementStrategy, "placement", self.placement)
        self.frontend = _choice(MoEFrontend, "frontend", self.frontend)
        self.expert_compute = _choice(ExpertCompute, "expert_compute", self.expert_compute)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= n:
            raise ValueError(f"top_k={self.top_k!r}: must be an int with 1 <= top_k <= number of experts ({n})")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < float(self.top_p) <= 1.0):
            raise ValueError(f"top_p={self.top_p!r}: must be a number in (0, 1]")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value)):
                raise ValueError(f"{name}={value!r}: must be a positive number, or null/None for dropless routing")
        if not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            raise ValueError(f"min_capacity={self.min_capacity!r}: must be an int >= 0")
        if not isinstance(self.jitter_eps, (int, float)) or not 0.0 <= self.jitter_eps < 1.0:
            raise ValueError(f"jitter_eps={self.jitter_eps!r}: must be in [0, 1)")
        for name in ("load_balance_coef", "p_penalty_coef", "entropy_coef", "z_loss_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise ValueError(f"{name}={value!r}: must be a finite number >= 0 (0 disables the loss)")
        self.gate_convention = _choice(GateConvention, "gate_convention", self.gate_convention)
        if self.noisy_gate_policy in (None, "None"):
            self.noisy_gate_policy = None
        else:
            self.noisy_gate_policy = _choice(NoisyGatePolicy, "noisy_gate_policy", self.noisy_gate_policy)
        for name in ("use_rts", "top2_2nd_expert_sampling", "use_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be true or false")
        if self.gate_convention is GateConvention.DEEPSPEED and self.routing is not RoutingMethod.TOP_K:
            raise ValueError(f"gate_convention='deepspeed' is Top-K routing; got routing={str(self.routing)!r}: "
                             "set routing='top_k' or gate_convention='hmoe'")
        if self.gate_convention is GateConvention.HMOE and self.noisy_gate_policy is NoisyGatePolicy.RSAMPLE:
            raise ValueError("noisy_gate_policy='RSample' is DeepSpeed's top-1 rule: set gate_convention='deepspeed' "
                             "(and routing='top_k', top_k=1), or use noisy_gate_policy='Jitter'")
        if self.gate_convention is GateConvention.HMOE and (self.use_rts or self.top2_2nd_expert_sampling):
            raise ValueError("use_rts and top2_2nd_expert_sampling are DeepSpeed gate rules: set "
                             "gate_convention='deepspeed', or leave them false")
        if isinstance(self.shared_expert_size, bool) or not isinstance(self.shared_expert_size, int) \
                or self.shared_expert_size < 0:
            raise ValueError(f"shared_expert_size={self.shared_expert_size!r}: must be an int >= 0 (0: no shared expert)")
        if isinstance(self.ep_size, bool) or not isinstance(self.ep_size, int) or self.ep_size < 1:
            raise ValueError(f"ep_size={self.ep_size!r}: must be an int >= 1")
        if n % self.ep_size != 0:
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            raise ValueError(
                f"ep_size={self.ep_size} does not divide the number of experts ({n}); "
                f"allowed ep_size values: {divisors}"
            )
        if isinstance(self.placement, ExpertPlacement) and (
                self.placement.ep_size != self.ep_size or len(self.placement.slot_to_expert) != n):
            raise ValueError(f"placement={self.placement.to_dict()}: an explicit layout must place the {n} experts "
                             f"on ep_size={self.ep_size} ranks")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (enums as strings), e.g. for ``PretrainedConfig``."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ExpertPlacement):
                value = value.to_dict()
            out[f.name] = str(value) if isinstance(value, enum.Enum) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HMoELayerConfig":
        """Build from a mapping; unknown keys are an error that lists the allowed ones."""
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown MoE layer option(s) {unknown}; allowed: {sorted(allowed)}")
        if "expert_sizes" not in data:
            raise ValueError("expert_sizes is required (one FFN hidden size per expert)")
        return cls(**dict(data))
