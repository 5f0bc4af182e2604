"""The HMoE layer core that every DeepSpeed front-end runs.

Shape legend: T tokens, D width, E experts, A kept assignments, R rows
received by this rank's experts.

One forward of an HMoE layer is router -> auxiliary losses -> dispatch plan
-> token exchange -> experts -> scatter back to tokens (at ``ep_size`` 1 on the
per-expert loop, with no exchange in between, the experts gather their tokens and
scatter back themselves: :class:`~hmoe_ds.experts.TokenRoute`). That math lives here
once, in :class:`MoECore`, and depends on no DeepSpeed base class. The two
front-ends (``hmoe_ds.layer.HMoE`` for ZeRO 0-2 and
``hmoe_ds.layer_autoep.HMoEAutoEP`` for any stage including 3) are thin
adapters that only present the parameters to DeepSpeed the way its engine
expects; both import this module and neither imports the other.

Code outside the layer (the model, checkpoints, metrics) talks to either
front-end through the :class:`MoELayer` protocol, and receives each forward's
:class:`RoutingStats` through :func:`collect_routing_stats`.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from . import losses as L
from .config import DEEPSPEED_JITTER_EPS, GateConvention, HMoELayerConfig, NoisyGatePolicy
from .dispatch import LocalExchange, TokenExchange, AllToAllExchange, expert_capacity, plan_dispatch, scatter_to_tokens
from .experts import FFNExpert, TokenRoute, expert_compute_order
from .partitioned import full_numel, write_full
from .placement import ExpertPlacement
from .routing import RouterOutput, multiplicative_jitter, route, route_deepspeed
from .sizes import expert_param_count
from .tensor_parallel import DuplicateTokenExchange, ExpertTensorParallelExchange, TensorParallel, all_gather_hidden


@dataclass
class RoutingStats:
    """Detached routing statistics of one forward pass of one layer.

    Tensors stay on the compute device; the float properties synchronise only
    when read, so logging every n steps costs nothing in between.
    """

    num_tokens: int
    assignments_per_expert: torch.Tensor  # [E] long: kept (token, expert) assignments per logical expert
    selected_per_expert: torch.Tensor  # [E] long: assignments chosen by the router, before any drop
    dropped: torch.Tensor  # 0-dim long
    loss_values: dict[str, torch.Tensor]  # unweighted, detached
    expert_sizes: tuple[int, ...]
    expert_params: tuple[int, ...] = field(repr=False, default=())
    #: Parameters every token activates besides the routed experts (a shared or residual expert).
    always_active_params: int = 0

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """Deprecated name of :attr:`assignments_per_expert` (it counts assignments, not distinct tokens)."""
        warnings.warn("RoutingStats.tokens_per_expert is deprecated; use assignments_per_expert",
                      DeprecationWarning, stacklevel=2)
        return self.assignments_per_expert

    @property
    def experts_per_token(self) -> float:
        """Mean number of experts the router chose per token (k for Top-K)."""
        return float(self.selected_per_expert.sum()) / max(self.num_tokens, 1)

    @property
    def dropped_assignments(self) -> int:
        return int(self.dropped)

    @property
    def activated_expert_params_per_token(self) -> float:
        """``sum_i count_i * params_i / T`` (paper, Table 1), plus a shared expert's parameters if any."""
        params = torch.tensor(self.expert_params, dtype=torch.float64)
        routed = float((self.assignments_per_expert.double().cpu() * params).sum()) / max(self.num_tokens, 1)
        return routed + self.always_active_params

    @property
    def losses(self) -> dict[str, float]:
        return {name: float(value) for name, value in self.loss_values.items()}


# ----------------------------------------------------------------------------- routing statistics collector

_ACTIVE_COLLECTORS: contextvars.ContextVar[tuple[list[RoutingStats], ...]] = contextvars.ContextVar(
    "hmoe_routing_stats_collectors", default=())


@contextlib.contextmanager
def collect_routing_stats() -> Iterator[list[RoutingStats]]:
    """Collect the :class:`RoutingStats` of every MoE layer forward run inside the block, in call order.

    Example::

        with collect_routing_stats() as stats:
            out, l_aux, exp_counts = layer(x)   # DeepSpeed's return contract, unchanged
        stats[0].activated_expert_params_per_token

    DeepSpeed's MoE forward returns exactly ``(output, l_aux, exp_counts)``,
    and ZeRO-3's hooks rebuild that tuple, so the statistics cannot ride on it;
    they go to the collectors active in the caller's context instead (nested
    blocks each receive them). Recomputation under activation checkpointing
    runs in the backward pass, outside the block, so it adds nothing.
    """
    collected: list[RoutingStats] = []
    token = _ACTIVE_COLLECTORS.set(_ACTIVE_COLLECTORS.get() + (collected,))
    try:
        yield collected
    finally:
        _ACTIVE_COLLECTORS.reset(token)


def _publish(stats: RoutingStats) -> None:
    for collected in _ACTIVE_COLLECTORS.get():
        collected.append(stats)


# ----------------------------------------------------------------------------- the layer protocol


@runtime_checkable
class MoELayer(Protocol):
    """What the model, checkpoint, initialisation and metrics code may use of an HMoE layer.

    Both front-ends satisfy it. ``config`` holds the *logical* layer (its
    ``num_experts`` is the number of HMoE experts, whatever DeepSpeed is told);
    ``moe_core`` is the :class:`MoECore` holding the router, the local experts
    and the placement.
    """

    config: HMoELayerConfig

    @property
    def moe_core(self) -> "MoECore": ...

    @property
    def expert_sizes(self) -> list[int]: ...

    @property
    def placement(self) -> ExpertPlacement: ...

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class Router(nn.Module):
    """The router's projection W_r (no bias), named ``wg`` like DeepSpeed's ``TopKGate``."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        # fp32 logits whatever the model dtype: softmax and Top-P cumsums need it.
        return F.linear(x_TD.float(), self.wg.weight.float())


class MoECore:
    """Router -> losses -> dispatch -> exchange -> experts -> scatter back (HMoE paper, Eqs. 1-4).

    A mixin for an ``nn.Module`` host: the host owns the parameters under the
    names its DeepSpeed base class expects (``gate`` and ``experts`` as direct
    children), this class owns the math. DeepSpeed decides where the children
    must sit: its ``MoE`` keeps them one level down (``deepspeed_moe``), its
    AutoEP engine code reads ``<layer>.experts`` directly, so a composed child
    module would break one of the two.

    Hosts call ``nn.Module.__init__`` and then :meth:`MoECore.__init__`
    explicitly rather than through ``super()``: AutoEP's own constructor
    converts an existing Hugging Face block and must never run.
    """

    hidden_size: int
    config: HMoELayerConfig
    placement: ExpertPlacement
    gate: Router
    experts: nn.Module

    def __init__(
        self,
        hidden_size: int,
        config: HMoELayerConfig,
        placement: ExpertPlacement,
        ep_rank: int,
        experts: nn.Module,
        expert_params: Sequence[int] | None = None,
        sliced_experts: TensorParallel | None = None,
    ) -> None:
        if not isinstance(self, nn.Module) or "_modules" not in self.__dict__:
            raise TypeError("MoECore is a mixin: the host must be an nn.Module whose nn.Module.__init__ already ran")
        self.hidden_size = hidden_size
        self.config = config
        self.placement = placement
        self.moe_ep_rank = ep_rank
        self.local_expert_ids = placement.local_experts(ep_rank)
        self.gate = Router(hidden_size, config.num_experts)
        # ``experts`` is called as a module (``experts(x, counts)``), never through
        # a method: ZeRO-3 gathers a module's parameters in its forward hooks.
        self.experts = experts
        # Expert tensor parallelism of the built-in experts: each holds 1/tp of its hidden units
        # (fixed at construction; see hmoe_ds.tensor_parallel).
        self.sliced_experts = sliced_experts
        own = [self.computed_size(config.expert_sizes[e]) for e in self.local_expert_ids]
        if list(experts.compute_order) != expert_compute_order(config.expert_compute, hidden_size, own):
            raise ValueError("the experts module's compute order differs from the layer's dispatch order")
        # Small constants built lazily on the compute device from Python data, not
        # buffers: HF loading builds modules on the meta device and leaves
        # non-persistent buffers uninitialised.
        self._constants: dict[tuple[str, torch.device], torch.Tensor] = {}
        # Built-in FFNs: parameters from the widths. User modules: counted by the front-end, and the
        # P-Penalty weighs them (Eq. 4 wants each expert's real size).
        self.builtin_experts = expert_params is None
        self.expert_params = tuple(expert_params) if expert_params is not None else tuple(
            expert_param_count(hidden_size, h, gated=config.activation.gated) for h in config.expert_sizes
        )
        self.always_active_params = 0
        self.ep_group: Any = None
        self.tensor_parallel: TensorParallel | None = sliced_experts
        self.expert_tensor_parallel = sliced_experts is not None
        self.exchange: TokenExchange = LocalExchange()
        self._install_exchange()
        self.l_aux: torch.Tensor | None = None
        self.exp_counts: torch.Tensor | None = None
        self._last_stats: RoutingStats | None = None

    @property
    def moe_core(self) -> "MoECore":
        return self

    @property
    def last_stats(self) -> RoutingStats | None:
        """Deprecated: the statistics of the latest forward. Use :func:`collect_routing_stats`."""
        warnings.warn("last_stats is deprecated; wrap the forward in hmoe_ds.collect_routing_stats()",
                      DeprecationWarning, stacklevel=2)
        return self._last_stats

    # ------------------------------------------------------------------ expert weights by logical id

    def local_expert_weights(self) -> dict[int, dict[str, torch.Tensor]]:
        """This rank's experts by *logical* id: ``{e: {"w1": [h_e, D], "w2": [D, h_e], "w3": ...}}``.

        Detached copies, in ``nn.Linear`` layout whatever the front-end's storage
        (module list or packed). Under ZeRO-3 gather the parameters first
        (``deepspeed.zero.GatheredParameters``). Under expert tensor parallelism
        the whole experts are all-gathered from the TP group's hidden slices (a
        collective: every rank of the TP group must call it).
        """
        self._require_builtin_experts("local_expert_weights")
        out = {}
        tp = self.sliced_experts
        for logical, (w1, w2, w3) in zip(self.local_expert_ids, self.experts.per_expert_weights()):
            if tp is not None:
                w1, w2 = all_gather_hidden(w1.detach(), tp, 0), all_gather_hidden(w2.detach(), tp, 1)
                w3 = all_gather_hidden(w3.detach(), tp, 0) if w3 is not None else None
            out[logical] = {"w1": w1.detach().clone(), "w2": w2.detach().clone()}
            if w3 is not None:
                out[logical]["w3"] = w3.detach().clone()
        return out

    def local_expert_parameters(self) -> dict[int, dict[str, torch.Tensor]]:
        """This rank's experts by *logical* id, each as ``{parameter name in the expert module: detached copy}``.

        The names are the logical model's, whatever the storage: ``w1.weight``
        ... for the built-in FFN, the user's own names (``0.weight``,
        ``fc1.bias``, ...) for the user's modules, also when the ZeRO-3
        front-end packs them. Under ZeRO-3 gather the parameters first
        (``deepspeed.zero.GatheredParameters``).
        """
        if self.builtin_experts:
            return {e: {f"{w}.weight": v for w, v in weights.items()}
                    for e, weights in self.local_expert_weights().items()}
        experts = self.experts
        if hasattr(experts, "expert_parameters"):  # packed (ZeRO-3 front-end)
            per_slot = experts.expert_parameters()
        else:  # ModuleExperts
            per_slot = [dict(module.named_parameters()) for module in experts.deepspeed_experts]
        return {logical: {name: value.detach().clone() for name, value in named.items()}
                for logical, named in zip(self.local_expert_ids, per_slot)}

    @torch.no_grad()
    def load_local_expert_parameters(self, values: dict[int, dict[str, torch.Tensor]]) -> None:
        """Copy logical experts' parameters (as from :meth:`local_expert_parameters`) into this rank's experts.

        ``values`` may hold every logical expert; only the local ones are read.
        Names and shapes are checked; ZeRO-3-partitioned storage is written
        partition by partition, never gathered.
        """
        for logical in self.local_expert_ids:
            if logical not in values:
                raise KeyError(f"no parameters for logical expert {logical} (have {sorted(values)})")
        if self.builtin_experts:
            weights = {}
            for logical in self.local_expert_ids:
                names = self.expert_weight_shapes(logical)
                weights[logical] = {w: values[logical][f"{w}.weight"] for w in names}
            self.load_local_expert_weights(weights)
            return
        experts = self.experts
        per_slot = [values[logical] for logical in self.local_expert_ids]
        if hasattr(experts, "expert_parameters"):
            for param, value in experts.full_values(per_slot):
                write_full(param, value)
            return
        for logical, module, named in zip(self.local_expert_ids, experts.deepspeed_experts, per_slot):
            own = dict(module.named_parameters())
            if set(own) != set(named):
                raise ValueError(f"expert {logical}: got parameters {sorted(named)}, the module has {sorted(own)}")
            for name, param in own.items():
                write_full(param, named[name])

    def computed_size(self, ffn_size: int) -> int:
        """Hidden units of an expert of FFN size ``ffn_size`` that this rank computes (1/tp of them under expert TP)."""
        return ffn_size if self.sliced_experts is None else ffn_size // self.sliced_experts.size

    def expert_weight_shapes(self, logical: int) -> dict[str, tuple[int, ...]]:
        """``{"w1": [h, D], "w2": [D, h], ("w3": [h, D])}`` of logical expert ``logical`` (whole, also under expert TP)."""
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
        self._require_builtin_experts("init_expert_weights")
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
        (:func:`hmoe_ds.partitioned.write_full`), never gathered. Under expert
        tensor parallelism the weights are whole experts and each rank keeps its
        hidden slice, so runs with and without TP start from the same experts.
        """
        self._require_builtin_experts("load_local_expert_weights")
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
            if self.sliced_experts is not None:
                rows = self.sliced_experts.hidden_slice(self.config.expert_sizes[logical])
                values = [v[:, rows] if name == "w2" else v[rows]
                          for name, v in zip(self.expert_weight_shapes(logical), values)]
            per_expert.append((values[0], values[1], values[2] if len(values) > 2 else None))
        for param, value in self.experts.full_values(per_expert):
            write_full(param, value)

    def _require_builtin_experts(self, what: str) -> None:
        if not self.builtin_experts:
            raise TypeError(f"{what} works on HMoE's built-in FFN experts (w1/w2/w3); this layer runs the user's "
                            "own expert modules: read or load them through the module's state_dict")

    # ------------------------------------------------------------------ set-up helpers

    def _constant(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._constants:
            if name == "slot_to_expert":
                value = torch.tensor(self._compute_slot_order(), dtype=torch.long, device=device)
            else:
                cfg = self.config
                sizes = cfg.expert_sizes if self.builtin_experts else self.expert_params
                value = L.normalized_expert_sizes(sizes, cfg.size_normalization, device=device)
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
            sizes = [self.computed_size(cfg.expert_sizes[e]) for e in local]
            order += [local[j] for j in expert_compute_order(cfg.expert_compute, self.hidden_size, sizes)]
        return order

    def _set_ep_group(self, ep_group: Any) -> None:
        """Bind the expert-parallel process group (DeepSpeed calls this on set-up)."""
        self.ep_group = ep_group
        self._install_exchange()

    def _bind_ep_rank(self, ep_rank: int) -> None:
        """Hold the experts of EP rank ``ep_rank``: for layers whose experts do not depend on it (copies of one
        template) and whose expert groups DeepSpeed creates only in ``set_deepspeed_parallelism``."""
        local = self.placement.local_experts(ep_rank)
        if len(local) != len(self.local_expert_ids):
            raise ValueError(f"EP rank {ep_rank} holds {len(local)} experts, this layer was built with "
                             f"{len(self.local_expert_ids)}")
        self.moe_ep_rank = ep_rank
        self.local_expert_ids = local

    def configure_tensor_parallel(self, tp: TensorParallel | None, expert_tensor_parallel: bool) -> None:
        """Bind the tensor-parallel group (``None`` for TP 1) and DeepSpeed's ``enable_expert_tensor_parallelism``.

        What the exchange then does is in :mod:`hmoe_ds.tensor_parallel`:
        sliced built-in experts sum their partial outputs over the TP group;
        the user's modules under expert TP see every token (they do their own
        TP, as in DeepSpeed); whole experts under TP > 1 compute each
        duplicated token once per TP group.
        """
        sliced = self.sliced_experts
        if sliced is not None and (tp is None or (tp.size, tp.rank) != (sliced.size, sliced.rank)
                                   or not expert_tensor_parallel):
            now = "no tensor parallelism" if tp is None else f"TP size {tp.size}, rank {tp.rank}"
            raise ValueError(f"this layer's experts were built as hidden slices for TP size {sliced.size}, rank "
                             f"{sliced.rank}, but the registered mpu now gives {now}: register the same mpu before "
                             "building the layer and in deepspeed.initialize(mpu=...)")
        self.tensor_parallel = tp
        self.expert_tensor_parallel = expert_tensor_parallel
        self._install_exchange()

    def _install_exchange(self) -> None:
        base: TokenExchange = LocalExchange()
        if self.placement.ep_size > 1 and self.ep_group is not None:
            base = AllToAllExchange(self.ep_group, self.placement.ep_size, self.placement.num_local_experts)
        tp = self.tensor_parallel
        if tp is not None and self.sliced_experts is not None:
            base = ExpertTensorParallelExchange(base, tp)
        elif tp is not None and not self.expert_tensor_parallel:
            base = DuplicateTokenExchange(base, tp)
        self.exchange = base

    # ------------------------------------------------------------------ the forward math

    def _aux_losses(self, router: RouterOutput):
        cfg = self.config
        router_logits_TE, probs_TE, mask_TE = router.logits_TE, router.probs_TE, router.mask_TE
        balance_mask_TE = router.balance_mask_TE if router.balance_mask_TE is not None else mask_TE
        terms = {
            "load_balance": (cfg.load_balance_coef, lambda: router.balance_scale * L.load_balance_loss(
                probs_TE=probs_TE, mask_TE=balance_mask_TE)),
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

    def _check_input(self, x: torch.Tensor) -> None:
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

    def _route(self, x_TD: torch.Tensor, used_token: torch.Tensor | None) -> RouterOutput:
        cfg = self.config
        jitter_eps = cfg.jitter_eps or (DEEPSPEED_JITTER_EPS if cfg.noisy_gate_policy is NoisyGatePolicy.JITTER else 0.0)
        router_in_TD = multiplicative_jitter(x_TD.float(), jitter_eps) if self.training else x_TD
        logits_TE = self.gate(router_in_TD)
        if cfg.gate_convention is GateConvention.DEEPSPEED:
            return route_deepspeed(
                logits_TE, top_k=cfg.top_k, training=self.training,
                noisy_gate_policy=None if cfg.noisy_gate_policy is None else str(cfg.noisy_gate_policy),
                use_rts=cfg.use_rts, second_expert_sampling=cfg.top2_2nd_expert_sampling,
                used_token_T=used_token,
            )
        router = route(logits_TE, method=cfg.routing, top_k=cfg.top_k, top_p=cfg.top_p,
                       renormalize=cfg.renormalize_gates)
        if used_token is not None:
            keep_T1 = used_token.reshape(-1, 1).to(torch.bool)
            router = RouterOutput(logits_TE=router.logits_TE, probs_TE=router.probs_TE,
                                  mask_TE=router.mask_TE & keep_T1, weights_TE=router.weights_TE * keep_T1)
        return router

    #: Whether the built-in experts on the per-expert loop gather their rows and add their gated outputs
    #: back themselves when no exchange stands between (``ep_size == 1``, no expert tensor parallelism).
    #: The same numbers either way (``tests/test_experts.py``); False (for tests and measurements) runs the
    #: separate gather -> experts -> :func:`~hmoe_ds.dispatch.scatter_to_tokens`.
    experts_route_tokens: bool = True

    def _experts_route_tokens(self, x_TD: torch.Tensor) -> bool:
        return (self.experts_route_tokens and type(self.exchange) is LocalExchange
                and getattr(self.experts, "supports_token_route", False)
                and not self.experts.runs_grouped(x_TD.device, x_TD.dtype))

    def _moe_forward(self, x: torch.Tensor, used_token: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(output, l_aux, exp_counts)``; the :class:`RoutingStats` go to :func:`collect_routing_stats`.

        ``used_token`` (one 0/1 per token, as DeepSpeed's) routes only the
        tokens marked 1; the others get a zero MoE output and count nowhere.
        """
        self._check_input(x)
        if self.placement.ep_size > 1 and self.ep_group is None:
            raise RuntimeError(f"this layer has ep_size={self.placement.ep_size} but no expert-parallel group yet: "
                               "call layer.set_deepspeed_parallelism() (deepspeed.initialize does) before the forward")
        cfg = self.config
        x_TD = x.reshape(-1, self.hidden_size)
        num_tokens = x_TD.shape[0]
        if used_token is not None and used_token.numel() != num_tokens:
            raise ValueError(f"used_token has {used_token.numel()} entries for {num_tokens} tokens; "
                             "pass one 0/1 value per token (the input's shape without the last dimension)")
        router = self._route(x_TD, used_token)
        l_aux, loss_values = self._aux_losses(router)

        selected_E = router.mask_TE.sum(dim=0)
        deepspeed_gate = cfg.gate_convention is GateConvention.DEEPSPEED
        capacity = None
        if cfg.capacity_factor is not None:
            # DeepSpeed sizes capacity from every token (k per token), padding included.
            capacity = self._capacity(num_tokens * cfg.top_k if deepspeed_gate else int(selected_E.sum()))
        plan = plan_dispatch(router, capacity=capacity, slot_to_expert_S=self._constant("slot_to_expert", x.device))
        if self._experts_route_tokens(x_TD):
            # Nothing between the gather and the experts, nor between them and the scatter-add: the built-in
            # loop does all three per expert, with no [assignments, D] buffer (experts.TokenRoute).
            route = TokenRoute(token_idx_A=plan.token_idx_A, gate_A=plan.gate_A)
            out = self.experts(x_TD, plan.counts, route=route).to(x.dtype).reshape(x.shape)
        else:
            x_AD = x_TD.index_select(0, plan.token_idx_A)
            x_RD, local_counts, context = self.exchange.to_experts(x_AD, plan.counts)
            # The gradient reaching y_RD comes fresh from scatter_to_tokens or the all-to-all and has no other
            # reader, so the built-in experts may write their input gradient into it (one [rows, D] buffer less).
            scratch = ({"output_grad_is_scratch": True}
                       if getattr(self.experts, "supports_scratch_output_grad", False) else {})
            y_RD = self.experts(x_RD, local_counts, **scratch)
            y_AD = self.exchange.from_experts(y_RD, context)
            out = scatter_to_tokens(y_AD, plan, num_tokens).reshape(x.shape)

        self.l_aux = l_aux
        # DeepSpeed's exp_counts are the router's choices before any drop; HMoE's, the computed assignments.
        self.exp_counts = (selected_E if deepspeed_gate else plan.kept_per_expert_E).detach()
        stats = RoutingStats(
            num_tokens=num_tokens,
            assignments_per_expert=plan.kept_per_expert_E.detach(),
            selected_per_expert=selected_E.detach(),
            dropped=plan.num_dropped.detach(),
            loss_values=loss_values,
            expert_sizes=tuple(cfg.expert_sizes),
            expert_params=self.expert_params,
            always_active_params=self.always_active_params,
        )
        self._last_stats = stats
        _publish(stats)
        return out, l_aux, self.exp_counts


def parameter_count(module: nn.Module) -> int:
    """Number of parameters of ``module`` (an expert, a shared expert); whole, also when ZeRO-3 partitioned them."""
    return sum(full_numel(p) for p in module.parameters())


def build_dense_branch(hidden_size: int, config: HMoELayerConfig,
                       mlp: nn.Module | None = None) -> tuple[nn.Module | None, nn.Module | None]:
    """``(mlp, coefficient)`` of a layer's dense branch, as both front-ends hold it (DeepSpeed's names).

    ``mlp`` is the dense expert a front-end already has (DeepSpeed's template
    module, or the user's factory at ``shared_expert_size``); without one,
    ``shared_expert_size`` builds the built-in FFN. ``coefficient`` is the
    Residual-MoE mixing projection when ``use_residual``. ``(None, None)``
    when the layer has no dense branch; see :func:`mix_dense_branch`.
    """
    if mlp is None and config.shared_expert_size:
        mlp = FFNExpert(hidden_size, config.shared_expert_size, config.activation)
    if mlp is None:
        if config.use_residual:
            raise ValueError("use_residual=True needs a dense expert: set shared_expert_size to its FFN size "
                             "(or, with DeepSpeed's constructor, pass expert=<module>)")
        return None, None
    return mlp, (nn.Linear(hidden_size, 2) if config.use_residual else None)


def mix_dense_branch(x: torch.Tensor, moe_out: torch.Tensor, dense: nn.Module,
                     coefficient: nn.Module | None) -> torch.Tensor:
    """Add a dense expert beside the routed ones: a shared expert, or DeepSpeed's Residual MoE.

    Without ``coefficient``: ``moe(x) + dense(x)`` (an always-on shared
    expert, as DeepSeekMoE). With it: ``moe(x) * c_0 + dense(x) * c_1``,
    ``c = softmax(coefficient(x))`` per token (Residual MoE, Rajbhandari et
    al. 2022, as DeepSpeed's ``use_residual``). A tuple output's first item is
    used, as DeepSpeed does for Megatron-style ``(output, bias)`` modules.
    """
    dense_out = dense(x)
    if isinstance(dense_out, tuple):
        dense_out = dense_out[0]
    if coefficient is None:
        return moe_out + dense_out
    coef = F.softmax(coefficient(x), dim=-1)
    return moe_out * coef[..., 0:1] + dense_out * coef[..., 1:]


__all__ = ["MoECore", "MoELayer", "Router", "RoutingStats", "build_dense_branch", "collect_routing_stats",
           "mix_dense_branch", "parameter_count"]
