"""The HMoE layer: a drop-in subclass of DeepSpeed's ``MoE``.

Shape legend: T tokens, D width, E experts.

``HMoE`` keeps DeepSpeed's contract (``forward -> (output, l_aux,
exp_counts)``, ``set_deepspeed_parallelism()``, expert parameters tagged
``allreduce=False`` with the expert group name and stored under
``deepspeed_moe.experts.deepspeed_experts.<local id>``), so DeepSpeed's engine
builds MoE optimizer groups, reduces expert gradients over the
expert-data-parallel group and writes one checkpoint file per expert, exactly
as for its own layer. Everything HMoE-specific lives in :class:`HMoEBlock`,
which does not depend on the DeepSpeed base class: routing
(:mod:`hmoe_ds.routing`), losses (:mod:`hmoe_ds.losses`), experts
(:mod:`hmoe_ds.experts`) and the token exchange (:mod:`hmoe_ds.dispatch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from . import losses as L
from .compat import check_deepspeed_version
from .config import HMoELayerConfig, MoEFrontend
from .dispatch import AllToAllExchange, LocalExchange, TokenExchange, combine, expert_capacity, plan_dispatch
from .experts import HeteroExperts, expert_compute_order
from .partitioned import write_full
from .placement import ExpertPlacement, make_placement
from .routing import multiplicative_jitter, route
from .sizes import expert_param_count

LOSS_NAMES = ("load_balance", "p_penalty", "entropy", "z_loss")


@dataclass
class RoutingStats:
    """Detached routing statistics of one forward pass of one layer.

    Tensors stay on the compute device; the float properties synchronise only
    when read, so logging every n steps costs nothing in between.
    """

    num_tokens: int
    tokens_per_expert: torch.Tensor  # [E] long: kept (token, expert) assignments per logical expert
    selected_per_expert: torch.Tensor  # [E] long: assignments chosen by the router, before any drop
    dropped: torch.Tensor  # 0-dim long
    loss_values: dict[str, torch.Tensor]  # unweighted, detached
    expert_sizes: tuple[int, ...]
    expert_params: tuple[int, ...] = field(repr=False, default=())

    @property
    def experts_per_token(self) -> float:
        """Mean number of experts the router chose per token (k for Top-K)."""
        return float(self.selected_per_expert.sum()) / max(self.num_tokens, 1)

    @property
    def dropped_assignments(self) -> int:
        return int(self.dropped)

    @property
    def activated_expert_params_per_token(self) -> float:
        """``sum_i count_i * params_i / T``: expert parameters a token activates (paper, Table 1)."""
        params = torch.tensor(self.expert_params, dtype=torch.float64)
        return float((self.tokens_per_expert.double().cpu() * params).sum()) / max(self.num_tokens, 1)

    @property
    def losses(self) -> dict[str, float]:
        return {name: float(value) for name, value in self.loss_values.items()}


class Router(nn.Module):
    """The router's projection W_r (no bias), named ``wg`` like DeepSpeed's ``TopKGate``."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        # fp32 logits whatever the model dtype: softmax and Top-P cumsums need it.
        return F.linear(x_TD.float(), self.wg.weight.float())


class HMoEComputeMixin:
    """Router -> losses -> dispatch -> exchange -> experts -> combine.

    Shared by every DeepSpeed front-end: :class:`HMoEBlock` (inside the
    ``deepspeed.moe.layer.MoE`` subclass, ZeRO 0-2) and
    :class:`hmoe_ds.layer_autoep.HMoEAutoEP` (an ``AutoEPMoELayer`` subclass,
    any ZeRO stage including 3). They differ only in how they present
    parameters to DeepSpeed; this mixin holds all the math and never depends on
    a DeepSpeed base class. The host module must be an ``nn.Module`` and calls
    :meth:`_init_moe` from its constructor.
    """

    hidden_size: int
    config: HMoELayerConfig
    placement: ExpertPlacement
    gate: Router
    experts: nn.Module

    def _init_moe(
        self,
        hidden_size: int,
        config: HMoELayerConfig,
        placement: ExpertPlacement,
        ep_rank: int,
        experts: nn.Module,
    ) -> None:
        self.hidden_size = hidden_size
        self.config = config
        self.placement = placement
        self.moe_ep_rank = ep_rank
        self.local_expert_ids = placement.local_experts(ep_rank)
        self.gate = Router(hidden_size, config.num_experts)
        # ``experts`` is called as a module (``experts(x, counts)``), never through
        # a method: ZeRO-3 gathers a module's parameters in its forward hooks.
        self.experts = experts
        own = [config.expert_sizes[e] for e in self.local_expert_ids]
        if list(experts.compute_order) != expert_compute_order(config.expert_compute, hidden_size, own):
            raise ValueError("the experts module's compute order differs from the layer's dispatch order")
        # Small constants built lazily on the compute device from Python data, not
        # buffers: HF loading builds modules on the meta device and leaves
        # non-persistent buffers uninitialised.
        self._constants: dict[tuple[str, torch.device], torch.Tensor] = {}
        self.expert_params = tuple(
            expert_param_count(hidden_size, h, gated=config.activation.gated) for h in config.expert_sizes
        )
        self.ep_group: Any = None
        self.exchange: TokenExchange = LocalExchange()
        self.l_aux: torch.Tensor | None = None
        self.exp_counts: torch.Tensor | None = None
        self.last_stats: RoutingStats | None = None

    def local_expert_weights(self) -> dict[int, dict[str, torch.Tensor]]:
        """This rank's experts by *logical* id: ``{e: {"w1": [h_e, D], "w2": [D, h_e], "w3": ...}}``.

        Detached copies, in ``nn.Linear`` layout whatever the front-end's storage
        (module list or packed). Under ZeRO-3 gather the parameters first
        (``deepspeed.zero.GatheredParameters``).
        """
        out = {}
        for logical, (w1, w2, w3) in zip(self.local_expert_ids, self.experts.per_expert_weights()):
            out[logical] = {"w1": w1.detach().clone(), "w2": w2.detach().clone()}
            if w3 is not None:
                out[logical]["w3"] = w3.detach().clone()
        return out

    def expert_weight_shapes(self, logical: int) -> dict[str, tuple[int, ...]]:
        """``{"w1": [h, D], "w2": [D, h], ("w3": [h, D])}`` of logical expert ``logical``."""
        h, d = self.config.expert_sizes[logical], self.hidden_size
        shapes = {"w1": (h, d), "w2": (d, h)}
        if self.config.activation.gated:
            shapes["w3"] = (h, d)
        return shapes

    @torch.no_grad()
    def init_expert_weights(self, std: float, seed: int) -> None:
        """normal(0, std) for every local expert, drawn per *logical* expert.

        Each expert's values come from a generator seeded by ``(seed, logical
        id)``, so the initial model is the same whatever the EP size, the
        placement or the front-end (module list or packed): runs that differ
        only in parallelism start identical. Parameters that HF loading marked
        as initialised (``_is_hf_initialized``) are left alone. Works on
        ZeRO-3-partitioned experts too (each rank writes its partition).
        """
        if any(getattr(p, "_is_hf_initialized", False) for p in self.experts.parameters()):
            return
        weights = {}
        for logical in self.local_expert_ids:
            generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(logical))
            weights[logical] = {name: torch.empty(shape).normal_(0.0, std, generator=generator)
                                for name, shape in self.expert_weight_shapes(logical).items()}
        self.load_local_expert_weights(weights)

    @torch.no_grad()
    def load_local_expert_weights(self, weights: dict[int, dict[str, torch.Tensor]]) -> None:
        """Copy logical experts' weights (as from :meth:`local_expert_weights`) into this rank's slots.

        ``weights`` may hold every logical expert; only the local ones are read.
        Shapes are checked so a checkpoint of other expert sizes fails loudly.
        ZeRO-3-partitioned experts are written partition by partition
        (:func:`hmoe_ds.partitioned.write_full`), never gathered.
        """
        per_expert = []
        for logical in self.local_expert_ids:
            if logical not in weights:
                raise KeyError(f"no weights for logical expert {logical} (have {sorted(weights)})")
            values = []
            for name, shape in self.expert_weight_shapes(logical).items():
                source = weights[logical][name]
                if tuple(source.shape) != shape:
                    raise ValueError(
                        f"expert {logical} {name}: checkpoint shape {tuple(source.shape)} does not match the "
                        f"layer's {shape} (expert_sizes {self.config.expert_sizes}, hidden {self.hidden_size})"
                    )
                values.append(source)
            per_expert.append((values[0], values[1], values[2] if len(values) > 2 else None))
        for param, value in self.experts.full_values(per_expert):
            write_full(param, value)

    def _constant(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._constants:
            if name == "slot_to_expert":
                value = torch.tensor(self._compute_slot_order(), dtype=torch.long, device=device)
            else:
                cfg = self.config
                value = L.normalized_expert_sizes(cfg.expert_sizes, cfg.size_normalization, device=device)
            self._constants[key] = value
        return self._constants[key]

    def _compute_slot_order(self) -> list[int]:
        """Logical expert of each slot of the grouped buffer: the placement's rank blocks, and inside
        each rank the order its experts module computes in (``experts.compute_order``).

        The grouped expert path wants each width bucket's rows contiguous;
        grouping the dispatch plan in that order costs nothing, where permuting
        rows afterwards would copy them. Every rank derives every other rank's
        order from the configuration alone (same function as its own), so the
        all-to-all's per-rank blocks agree.
        """
        cfg = self.config
        order = []
        for rank in range(self.placement.ep_size):
            local = self.placement.local_experts(rank)
            sizes = [cfg.expert_sizes[e] for e in local]
            order += [local[j] for j in expert_compute_order(cfg.expert_compute, self.hidden_size, sizes)]
        return order

    def _set_ep_group(self, ep_group: Any) -> None:
        """Bind the expert-parallel process group (DeepSpeed calls this on set-up)."""
        self.ep_group = ep_group
        if self.placement.ep_size > 1:
            self.exchange = AllToAllExchange(ep_group, self.placement.ep_size, self.placement.num_local_experts)

    def _aux_losses(self, router_logits_TE: torch.Tensor, probs_TE: torch.Tensor, mask_TE: torch.Tensor):
        cfg = self.config
        terms = {
            "load_balance": (cfg.load_balance_coef, lambda: L.load_balance_loss(probs_TE=probs_TE, mask_TE=mask_TE)),
            "p_penalty": (
                cfg.p_penalty_coef,
                lambda: L.p_penalty_loss(
                    probs_TE=probs_TE,
                    mask_TE=mask_TE,
                    expert_sizes_E=self._constant("normalized_sizes", probs_TE.device),
                ),
            ),
            "entropy": (cfg.entropy_coef, lambda: L.router_entropy_loss(probs_TE=probs_TE)),
            "z_loss": (cfg.z_loss_coef, lambda: L.router_z_loss(logits_TE=router_logits_TE)),
        }
        l_aux = probs_TE.new_zeros(())
        values: dict[str, torch.Tensor] = {}
        for name, (coef, fn) in terms.items():
            if coef > 0:
                value = fn()
                l_aux = l_aux + coef * value
            else:  # still reported, but no graph is built for a disabled term
                with torch.no_grad():
                    value = fn()
            values[name] = value.detach()
        return l_aux, values

    def _capacity(self, num_assignments: int) -> int | None:
        cfg = self.config
        factor = cfg.capacity_factor if self.training else (cfg.eval_capacity_factor or cfg.capacity_factor)
        if factor is None:
            return None
        return expert_capacity(num_assignments, cfg.num_experts, factor, cfg.min_capacity)

    def _moe_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        weight_dtype = self.gate.wg.weight.dtype  # the layer's dtype (also under ZeRO-3, where data is partitioned)
        if not x.is_floating_point() or (x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type)):
            # Otherwise torch fails deep inside the experts with "expected m1 and m2 to have the same dtype".
            what = "not floating point (token ids? embed them first)" if not x.is_floating_point() else \
                f"but the layer's weights are {weight_dtype}"
            raise TypeError(f"HMoE input has dtype {x.dtype}, {what}; pass hidden states as x.to({weight_dtype}), "
                            "or convert the layer with layer.to(dtype)")
        if x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"HMoE input has width {x.shape[-1]} but the layer was built with hidden_size={self.hidden_size}; "
                "pass hidden states of shape [..., hidden_size]"
            )
        x_TD = x.reshape(-1, self.hidden_size)
        num_tokens = x_TD.shape[0]
        router_in_TD = multiplicative_jitter(x_TD.float(), cfg.jitter_eps) if self.training else x_TD
        router = route(
            self.gate(router_in_TD),
            method=cfg.routing,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            renormalize=cfg.renormalize_gates,
        )
        l_aux, loss_values = self._aux_losses(router.logits_TE, router.probs_TE, router.mask_TE)

        selected_E = router.mask_TE.sum(dim=0)
        capacity = self._capacity(int(selected_E.sum())) if cfg.capacity_factor is not None else None
        plan = plan_dispatch(router, capacity=capacity, slot_to_expert_S=self._constant("slot_to_expert", x.device))
        x_AD = x_TD.index_select(0, plan.token_idx_A)
        x_RD, local_counts, context = self.exchange.dispatch(x_AD, plan.counts)
        y_RD = self.experts(x_RD, local_counts)
        y_AD = self.exchange.combine(y_RD, context)
        out = combine(y_AD, plan, num_tokens).reshape(x.shape)

        self.l_aux = l_aux
        self.exp_counts = plan.kept_per_expert_E.detach()
        self.last_stats = RoutingStats(
            num_tokens=num_tokens,
            tokens_per_expert=plan.kept_per_expert_E.detach(),
            selected_per_expert=selected_E.detach(),
            dropped=plan.num_dropped.detach(),
            loss_values=loss_values,
            expert_sizes=tuple(cfg.expert_sizes),
            expert_params=self.expert_params,
        )
        return out, l_aux, self.exp_counts


class HMoEBlock(HMoEComputeMixin, nn.Module):
    """The module that replaces DeepSpeed's ``MOELayer`` as ``HMoE.deepspeed_moe``.

    Its children are named ``gate`` and ``experts.deepspeed_experts.<i>`` as in
    DeepSpeed, so state dicts of equal-size layers load into DeepSpeed's ``MoE``.
    """

    def __init__(
        self,
        hidden_size: int,
        config: HMoELayerConfig,
        placement: ExpertPlacement,
        ep_rank: int,
        expert_group_name: str,
    ) -> None:
        super().__init__()
        local_sizes = [config.expert_sizes[e] for e in placement.local_experts(ep_rank)]
        experts = HeteroExperts(hidden_size, local_sizes, config.activation, expert_group_name, config.expert_compute)
        self._init_moe(hidden_size, config, placement, ep_rank, experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._moe_forward(x)


def expert_parallel_rank(ep_size: int, group_name: str) -> int:
    """This process's rank in its expert-parallel group, creating DeepSpeed's groups if needed.

    Needed at construction time because each rank builds only the experts the
    placement gives it, and those differ in size.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError(
            f"ep_size={ep_size} needs the distributed backend before the layer is built, because each "
            "rank builds only its own (unequal) experts: call deepspeed.init_distributed() first, or use ep_size=1"
        )
    world = dist.get_world_size()
    if world % ep_size != 0:
        raise ValueError(f"ep_size={ep_size} must divide the world size ({world}); choose a divisor of {world}")
    if group_name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_rank(group_name)


class _Placeholder(nn.Module):
    """A one-weight expert: DeepSpeed's constructor deep-copies its template
    expert per local expert before we swap in ours, so keep that copy cheap."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))


class HMoE(MoE):
    """Heterogeneous MoE layer, a drop-in replacement for ``deepspeed.moe.layer.MoE``.

    Example::

        layer = HMoE(hidden_size=256, expert_sizes=[128, 192, 256, 320],
                     routing="top_p", top_p=0.6, p_penalty_coef=0.1, entropy_coef=0.03)
        out, l_aux, exp_counts = layer(x)        # as DeepSpeed's MoE
        layer.last_stats.activated_expert_params_per_token

    Args:
        hidden_size: model width D (input and output of every expert).
        expert_sizes: FFN hidden size of each expert (HMoE paper, Sec. 3.1).
        config: a full :class:`HMoELayerConfig` instead of keyword options.
        **options: any other :class:`HMoELayerConfig` field (``routing``,
            ``top_k``, ``top_p``, loss coefficients, ``capacity_factor``,
            ``ep_size``, ``placement``, ...).

    With ``ep_size > 1`` the process group must exist (``deepspeed.init_distributed()``)
    before the layer is built: each rank builds only the experts the placement
    gives it, and those differ in size.
    """

    def __init__(
        self,
        hidden_size: int,
        expert_sizes: Sequence[int] | None = None,
        *,
        config: HMoELayerConfig | None = None,
        **options: Any,
    ) -> None:
        if config is None:
            if expert_sizes is None:
                raise ValueError("HMoE needs expert_sizes (one FFN hidden size per expert) or config=HMoELayerConfig")
            config = HMoELayerConfig(expert_sizes=list(expert_sizes), **options)
        elif expert_sizes is not None or options:
            raise ValueError("pass either config=HMoELayerConfig(...) or expert_sizes/options, not both")
        check_deepspeed_version()
        config.validate()
        if config.frontend is not MoEFrontend.MOE:
            raise ValueError(
                f"HMoE is the frontend='moe' layer; got frontend={str(config.frontend)!r}: "
                "use hmoe_ds.build_moe_layer(hidden_size, config) to get the matching class"
            )
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size={hidden_size!r}: must be a positive int")
        super().__init__(
            hidden_size,
            expert=_Placeholder(),
            num_experts=config.num_experts,
            ep_size=config.ep_size,
            k=1,
            drop_tokens=config.capacity_factor is not None,
            use_rts=False,
        )
        self.config = config
        self.hidden_size = hidden_size
        ep_rank = expert_parallel_rank(config.ep_size, self.expert_group_name) if config.ep_size > 1 else 0
        placement = make_placement(config.placement, config.expert_sizes, config.ep_size)
        self.deepspeed_moe = HMoEBlock(hidden_size, config, placement, ep_rank, self.expert_group_name)
        if config.ep_size > 1:
            self.deepspeed_moe._set_ep_group(groups._get_expert_parallel_group(self.expert_group_name))

    @property
    def expert_sizes(self) -> list[int]:
        return list(self.config.expert_sizes)

    @property
    def placement(self) -> ExpertPlacement:
        return self.deepspeed_moe.placement

    @property
    def last_stats(self) -> RoutingStats | None:
        return self.deepspeed_moe.last_stats

    @property
    def gate(self) -> Router:
        return self.deepspeed_moe.gate

    @property
    def local_expert_ids(self) -> tuple[int, ...]:
        return self.deepspeed_moe.local_expert_ids

    def local_expert_weights(self) -> dict[int, dict[str, torch.Tensor]]:
        """See :meth:`HMoEComputeMixin.local_expert_weights`."""
        return self.deepspeed_moe.local_expert_weights()

    def load_local_expert_weights(self, weights: dict[int, dict[str, torch.Tensor]]) -> None:
        """See :meth:`HMoEComputeMixin.load_local_expert_weights`."""
        self.deepspeed_moe.load_local_expert_weights(weights)

    def init_expert_weights(self, std: float, seed: int) -> None:
        """See :meth:`HMoEComputeMixin.init_expert_weights`."""
        self.deepspeed_moe.init_expert_weights(std, seed)

    def forward(
        self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(output, l_aux, exp_counts)`` as DeepSpeed's ``MoE.forward``.

        ``l_aux`` is the coefficient-weighted sum of the enabled auxiliary
        losses; each term, unweighted, is in ``self.last_stats.losses``.
        """
        if used_token is not None:
            raise ValueError(
                "used_token is not supported by HMoE: every token is routed; exclude padding from the LM loss "
                "with labels=-100 instead"
            )
        return self.deepspeed_moe(hidden_states)


def build_moe_layer(hidden_size: int, config: HMoELayerConfig) -> nn.Module:
    """The one place models build MoE layers: picks the DeepSpeed front-end from ``config.frontend``.

    Both front-ends return ``(output, l_aux, exp_counts)`` and expose
    ``last_stats``, ``config``, ``placement`` and ``expert_sizes``.
    """
    if config.frontend is MoEFrontend.AUTOEP:
        from .layer_autoep import HMoEAutoEP

        return HMoEAutoEP(hidden_size, config=config)
    return HMoE(hidden_size, config=config)
