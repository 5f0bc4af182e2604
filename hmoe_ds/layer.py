"""The HMoE layer for ZeRO stages 0-2: a drop-in subclass of DeepSpeed's ``MoE``.

``HMoE`` keeps DeepSpeed's contract (``forward -> (output, l_aux,
exp_counts)``, ``set_deepspeed_parallelism()``, expert parameters tagged
``allreduce=False`` with the expert group name and stored under
``deepspeed_moe.experts.deepspeed_experts.<local id>``), so DeepSpeed's engine
builds MoE optimizer groups, reduces expert gradients over the
expert-data-parallel group and writes one checkpoint file per expert, exactly
as for its own layer. It is a thin adapter: the math is the shared
:class:`~hmoe_ds.moe_core.MoECore`, hosted by :class:`HMoEBlock` where
DeepSpeed keeps its ``MOELayer`` (``deepspeed_moe``).

:func:`build_moe_layer` picks this front-end or the ZeRO-3 one
(:mod:`hmoe_ds.layer_autoep`) from the configuration.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any, Callable, Sequence

import torch
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from .compat import check_deepspeed_version
from .config import ExpertCompute, HMoELayerConfig, MoEFrontend
from .expert_groups import expert_parallel_group, expert_parallel_rank
from .experts import HeteroExperts, ModuleExperts
from .layer_autoep import HMoEAutoEP, _checked_expert
from .moe_core import MoECore, Router, RoutingStats, build_dense_branch, mix_dense_branch, parameter_count
from .placement import ExpertPlacement, make_placement
from .tensor_parallel import TensorParallel, check_divisible


class HMoEBlock(MoECore, nn.Module):
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
        expert_modules: Sequence[nn.Module] | None = None,
        expert_params: Sequence[int] | None = None,
        sliced_experts: TensorParallel | None = None,
    ) -> None:
        nn.Module.__init__(self)
        if expert_modules is None:
            part = 1 if sliced_experts is None else sliced_experts.size  # expert TP: this rank's hidden slice
            local_sizes = [config.expert_sizes[e] // part for e in placement.local_experts(ep_rank)]
            experts: nn.Module = HeteroExperts(hidden_size, local_sizes, config.activation, expert_group_name,
                                               config.expert_compute)
        else:
            experts = ModuleExperts(expert_modules, expert_group_name)
        MoECore.__init__(self, hidden_size, config, placement, ep_rank, experts, expert_params=expert_params,
                         sliced_experts=sliced_experts)

    def forward(self, x: torch.Tensor, used_token: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._moe_forward(x, used_token)


class _Placeholder(nn.Module):
    """A one-weight expert: DeepSpeed's constructor deep-copies its template
    expert per local expert before we swap in ours, so keep that copy cheap."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))


class _Unset:
    """Marks a DeepSpeed argument the caller did not pass (its default then depends on the call style)."""

    def __repr__(self) -> str:
        return "<DeepSpeed default>"


_UNSET: Any = _Unset()

#: DeepSpeed MoE arguments whose presence makes a call DeepSpeed-style (DeepSpeed's gate conventions).
_DEEPSPEED_GATE_ARGUMENTS = ("num_experts", "k", "noisy_gate_policy", "drop_tokens", "use_rts",
                             "top2_2nd_expert_sampling")


class HMoE(MoE):
    """Heterogeneous MoE layer, a drop-in replacement for ``deepspeed.moe.layer.MoE``.

    DeepSpeed's constructor, same order and meaning, plus HMoE's options as
    keywords::

        # DeepSpeed's call, unchanged: 8 copies of the user's expert, top-2, DeepSpeed's gate rules
        layer = HMoE(hidden_size=d, expert=MyFFN(d, 4 * d), num_experts=8, ep_size=2, k=2)
        # HMoE: unequal built-in SwiGLU experts, Top-P, P-Penalty
        layer = HMoE(hidden_size=256, expert_sizes=[128, 192, 256, 320],
                     routing="top_p", top_p=0.6, p_penalty_coef=0.1, entropy_coef=0.03)
        # unequal experts of the user's own type: a factory from FFN size to module
        layer = HMoE(hidden_size=d, expert=lambda h: MyFFN(d, h), expert_sizes=[128, 256, 384, 512])
        with hmoe_ds.collect_routing_stats() as stats:
            out, l_aux, exp_counts = layer(x)    # as DeepSpeed's MoE
        stats[0].activated_expert_params_per_token

    Args:
        hidden_size: model width D (input and output of every expert).
        expert: DeepSpeed's template expert (an ``nn.Module``, copied once per
            expert, keeping its parameter names under
            ``deepspeed_moe.experts.deepspeed_experts.<i>``), or a factory
            ``h -> nn.Module`` building an expert of FFN size ``h`` for each of
            ``expert_sizes``. ``None`` with ``expert_sizes``: HMoE's built-in
            SwiGLU experts (grouped GEMMs). A list of ints here is read as
            ``expert_sizes`` (the call style of earlier releases).
        num_experts, ep_size, k, capacity_factor, eval_capacity_factor,
        min_capacity, use_residual, noisy_gate_policy, drop_tokens, use_rts,
        use_tutel, top2_2nd_expert_sampling: as in DeepSpeed's ``MoE``.
            Passing ``expert`` or any of DeepSpeed's gate arguments (``k``,
            ``num_experts``, ``drop_tokens``, ``use_rts``,
            ``noisy_gate_policy``, ``top2_2nd_expert_sampling``) selects
            DeepSpeed's gate conventions and defaults (top-1, capacity factor
            1.0, random token selection, second-expert sampling, ``l_aux`` =
            DeepSpeed's balance loss); otherwise HMoE's (Top-P, dropless,
            P-Penalty). ``use_tutel`` is accepted and changes nothing (a
            kernel choice; HMoE's dispatch is already sparse).
        enable_expert_tensor_parallelism: as in DeepSpeed, with a Megatron-style
            ``mpu`` (``deepspeed.initialize(mpu=...)``, or ``mpu=`` here):
            the expert groups are DeepSpeed's ``_create_expert_data_and_model_parallel``
            ones (expert TP size = TP size, expert-parallel groups of equal TP
            rank) and every TP rank computes every token. The user's expert
            modules do their own TP, as in DeepSpeed (the factory gets the whole
            FFN size). HMoE's built-in SwiGLU experts are split by HMoE: each
            TP rank holds 1/tp of every expert's hidden units (exact: hidden
            units are independent; sizes must be multiples of the TP size) and
            the partial outputs are summed over the TP group
            (:mod:`hmoe_ds.tensor_parallel`); the mpu must then be known when
            the layer is built. Statistics and the P-Penalty count whole experts.
            Without it, a TP > 1 mpu makes each TP rank compute only its share
            of the duplicated tokens, as DeepSpeed's ``drop_tokens`` does.
        expert_sizes: FFN hidden size of each expert (HMoE paper, Sec. 3.1).
        config: a full :class:`HMoELayerConfig` instead of keyword options.
        mpu: a Megatron-style model-parallel unit, as given to
            ``deepspeed.initialize(mpu=...)``; registered as
            ``deepspeed.utils.groups.mpu`` if none is. Default: the registered one.
        **options: any other :class:`HMoELayerConfig` field (``routing``,
            ``top_p``, loss coefficients, ``placement``,
            ``shared_expert_size``, ...).

    With ``ep_size > 1`` the process group must exist (``deepspeed.init_distributed()``)
    before the layer is built: each rank builds only the experts the placement
    gives it, and those differ in size.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """Built for ZeRO-3 (inside ``deepspeed.zero.Init``, or with ``frontend="autoep"``), ``HMoE(...)`` is
        the ZeRO-3 layer, :class:`~hmoe_ds.layer_autoep.HMoEAutoEP`, with the same experts and options.

        DeepSpeed's engine refuses every ``deepspeed.moe.layer.MoE`` instance
        under ZeRO-3, so that layer cannot be an ``HMoE`` (nor a DeepSpeed
        ``MoE``): ``isinstance(layer, HMoE)`` is False there, while the
        forward contract, the routing, the losses and the experts (the
        user's modules included) are the same. DeepSpeed's own MoE has no
        ZeRO-3 at all; this is beyond it.
        """
        if cls is HMoE and (args or kwargs):
            try:
                bound = _INIT_SIGNATURE.bind(None, *args, **kwargs)
            except TypeError:
                return super().__new__(cls)  # __init__ reports the bad call
            bound.apply_defaults()
            a = dict(bound.arguments)
            options = dict(a["options"])
            config = a.get("config")
            autoep = (str(options.get("frontend", "moe")) == str(MoEFrontend.AUTOEP)
                      or (isinstance(config, HMoELayerConfig) and config.frontend is MoEFrontend.AUTOEP))
            if autoep or _building_for_zero3():
                return _zero3_layer(a, options)
        return super().__new__(cls)

    def __init__(
        self,
        hidden_size: int,
        expert: nn.Module | Callable[[int], nn.Module] | Sequence[int] | None = None,
        num_experts: int = _UNSET,
        ep_size: int = _UNSET,
        k: int = _UNSET,
        capacity_factor: float = _UNSET,
        eval_capacity_factor: float = _UNSET,
        min_capacity: int = _UNSET,
        use_residual: bool = _UNSET,
        noisy_gate_policy: str | None = _UNSET,
        drop_tokens: bool = _UNSET,
        use_rts: bool = _UNSET,
        use_tutel: bool = False,
        enable_expert_tensor_parallelism: bool = False,
        top2_2nd_expert_sampling: bool = _UNSET,
        *,
        expert_sizes: Sequence[int] | None = None,
        config: HMoELayerConfig | None = None,
        mpu: Any = None,
        **options: Any,
    ) -> None:
        config, template, factory = _resolve_arguments(
            hidden_size, expert, dict(num_experts=num_experts, ep_size=ep_size, k=k, capacity_factor=capacity_factor,
                                      eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity,
                                      use_residual=use_residual, noisy_gate_policy=noisy_gate_policy,
                                      drop_tokens=drop_tokens, use_rts=use_rts,
                                      top2_2nd_expert_sampling=top2_2nd_expert_sampling),
            enable_expert_tensor_parallelism, expert_sizes, config, options)
        if config.frontend is not MoEFrontend.MOE or _building_for_zero3():
            where = (f"frontend={str(config.frontend)!r}" if config.frontend is not MoEFrontend.MOE
                     else "inside deepspeed.zero.Init (ZeRO stage 3)")
            # HMoE itself returns the ZeRO-3 layer from __new__ in these cases; only subclasses get here.
            raise ValueError(
                f"{type(self).__name__} (a subclass of HMoE, the frontend='moe' layer for ZeRO 0-2) was built {where}: "
                "DeepSpeed 0.19.8 refuses deepspeed.moe.layer.MoE subclasses under ZeRO-3. Build hmoe_ds.HMoE "
                "itself (it returns the ZeRO-3 layer there) or hmoe_ds.build_moe_layer(hidden_size, "
                "HMoELayerConfig(..., frontend='autoep'), expert=...)")
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
        self.use_tutel = use_tutel
        self.use_residual = config.use_residual
        self.enable_expert_tensor_parallelism = enable_expert_tensor_parallelism
        if mpu is not None and groups.mpu is None:
            groups.mpu = mpu  # as deepspeed.initialize(mpu=...) does; DeepSpeed's group helpers read it there
        mpu = mpu if mpu is not None else groups.mpu
        tp = TensorParallel.from_mpu(mpu)
        sliced = None
        if enable_expert_tensor_parallelism and template is None and factory is None:
            if mpu is None:
                raise ValueError(
                    "enable_expert_tensor_parallelism=True with HMoE's built-in experts splits each expert over the "
                    "tensor-parallel group, which must be known when the layer is built: pass mpu=<your mpu> (or set "
                    "deepspeed.utils.groups.mpu) before building it, and the same mpu to deepspeed.initialize")
            if tp is not None:
                check_divisible(config.expert_sizes, tp.size)
                sliced = tp
        # Which experts a rank holds depends on its EP rank; copies of one template do not, so for them
        # (as in DeepSpeed) the groups may wait for set_deepspeed_parallelism, when the mpu is registered.
        self._ep_rank_deferred = (config.ep_size > 1 and enable_expert_tensor_parallelism and mpu is None)
        if self._ep_rank_deferred and template is None:
            raise ValueError(
                "enable_expert_tensor_parallelism=True with ep_size > 1 and experts of unequal sizes (a factory) "
                "needs the expert groups, hence the mpu, when the layer is built: pass mpu=<your mpu> (or set "
                "deepspeed.utils.groups.mpu) first")
        ep_rank = 0
        if config.ep_size > 1 and not self._ep_rank_deferred:
            ep_rank = expert_parallel_rank(config.ep_size, self.expert_group_name,
                                           tensor_parallel_mpu=mpu if enable_expert_tensor_parallelism else None)
        placement = make_placement(config.placement, config.expert_sizes, config.ep_size)
        local = placement.local_experts(ep_rank)
        expert_modules, expert_params = None, None
        if template is not None:
            expert_modules = [copy.deepcopy(template) for _ in local]
            expert_params = [parameter_count(template)] * config.num_experts
        elif factory is not None:
            expert_modules = [_checked_expert(factory, config.expert_sizes[e]) for e in local]
            with torch.device("meta"):
                expert_params = [parameter_count(_checked_expert(factory, h)) for h in config.expert_sizes]
        self.deepspeed_moe = HMoEBlock(hidden_size, config, placement, ep_rank, self.expert_group_name,
                                       expert_modules=expert_modules, expert_params=expert_params,
                                       sliced_experts=sliced)
        if config.ep_size > 1 and not self._ep_rank_deferred:
            self.deepspeed_moe._set_ep_group(expert_parallel_group(self.expert_group_name))
        self.deepspeed_moe.configure_tensor_parallel(tp, enable_expert_tensor_parallelism)
        # The dense branch sits where DeepSpeed's Residual MoE keeps it (``mlp``, ``coefficient``).
        dense = None
        if template is not None and config.use_residual and not config.shared_expert_size:
            dense = template  # DeepSpeed uses the template itself as the residual MLP
        elif factory is not None and config.shared_expert_size:
            dense = _checked_expert(factory, config.shared_expert_size)
        self.mlp, self.coefficient = build_dense_branch(hidden_size, config, dense)
        if self.mlp is not None:
            self.deepspeed_moe.always_active_params = parameter_count(self.mlp)

    @property
    def moe_core(self) -> MoECore:
        """The router, local experts and placement (:class:`~hmoe_ds.moe_core.MoELayer` protocol)."""
        return self.deepspeed_moe

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        """DeepSpeed's group creation (``set_deepspeed_parallelism`` calls it), then HMoE's tensor parallelism.

        DeepSpeed creates the expert groups here if they do not exist yet, with
        ``_create_expert_data_and_model_parallel`` when an ``mpu`` is registered
        and ``enable_expert_tensor_parallelism`` is set, and binds the
        expert-parallel group. HMoE then takes its EP rank if the groups waited
        for this call (template experts under expert TP) and binds the
        registered mpu's TP group to its token exchange.
        """
        super()._create_process_groups(use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        if self._ep_rank_deferred:
            self.deepspeed_moe._bind_ep_rank(groups._get_expert_parallel_rank(self.expert_group_name))
            self._ep_rank_deferred = False
        self.deepspeed_moe.configure_tensor_parallel(TensorParallel.from_mpu(groups.mpu),
                                                     self.enable_expert_tensor_parallelism)

    @property
    def expert_sizes(self) -> list[int]:
        return list(self.config.expert_sizes)

    @property
    def placement(self) -> ExpertPlacement:
        return self.deepspeed_moe.placement

    @property
    def last_stats(self) -> RoutingStats | None:
        """Deprecated: use :func:`hmoe_ds.collect_routing_stats` around the forward."""
        return self.deepspeed_moe.last_stats

    def forward(
        self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(output, l_aux, exp_counts)`` as DeepSpeed's ``MoE.forward``.

        ``l_aux`` is the coefficient-weighted sum of the enabled auxiliary
        losses; each term, unweighted, is in the :class:`RoutingStats` that
        :func:`hmoe_ds.collect_routing_stats` receives (``.losses``).
        ``used_token`` (0/1 per token) routes only the tokens marked 1.
        """
        output, l_aux, exp_counts = self.deepspeed_moe(hidden_states, used_token)
        if self.mlp is not None:
            output = mix_dense_branch(hidden_states, output, self.mlp, self.coefficient)
        return output, l_aux, exp_counts


_INIT_SIGNATURE = inspect.signature(HMoE.__init__)


def _building_for_zero3() -> bool:
    """Whether modules are being built inside ``deepspeed.zero.Init`` (ZeRO-3 partitions them on creation)."""
    from deepspeed.runtime.zero import partition_parameters

    return partition_parameters.zero_init_context > 0


def _resolve_arguments(hidden_size: int, expert: Any, deepspeed_args: dict[str, Any],
                       enable_expert_tensor_parallelism: Any, expert_sizes: Sequence[int] | None,
                       config: HMoELayerConfig | None, options: dict[str, Any]
                       ) -> tuple[HMoELayerConfig, nn.Module | None, Callable[[int], nn.Module] | None]:
    """``(config, template, factory)`` of an :class:`HMoE` constructor call, checked (``config`` validated)."""
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
        raise ValueError(f"hidden_size={hidden_size!r}: must be a positive int")
    if not isinstance(enable_expert_tensor_parallelism, bool):
        raise ValueError(f"enable_expert_tensor_parallelism={enable_expert_tensor_parallelism!r}: must be True "
                         "or False")
    if isinstance(expert, Sequence) and not isinstance(expert, (str, bytes)):
        if expert_sizes is not None:
            raise ValueError("expert_sizes given twice: as the second positional argument and as expert_sizes=")
        expert_sizes, expert = list(expert), None
    if expert is not None and not callable(expert):
        raise ValueError(f"expert={expert!r}: pass an nn.Module (copied per expert), a factory "
                         "h -> nn.Module (with expert_sizes), or None for the built-in SwiGLU experts")
    deepspeed_args = {name: value for name, value in deepspeed_args.items() if value is not _UNSET}
    template = expert if isinstance(expert, nn.Module) else None
    factory = expert if expert is not None and template is None else None
    if config is None:
        config = _config_from_arguments(hidden_size, template, factory, expert_sizes, deepspeed_args, dict(options))
    elif expert_sizes is not None or options or deepspeed_args:
        raise ValueError("pass either config=HMoELayerConfig(...) or expert_sizes/options, not both")
    elif expert is not None:  # the user's experts with a full configuration: they run one by one
        if config.expert_compute is ExpertCompute.GROUPED:
            raise ValueError("expert_compute='grouped' runs HMoE's built-in FFN experts; the user's own expert "
                             "modules run one by one: use expert_compute='loop' (or 'auto')")
        config = dataclasses.replace(config, expert_compute=ExpertCompute.LOOP)
    check_deepspeed_version()
    config.validate()
    return config, template, factory


def _zero3_layer(arguments: dict[str, Any], options: dict[str, Any]) -> HMoEAutoEP:
    """The ZeRO-3 layer an ``HMoE(...)`` call stands for (see :meth:`HMoE.__new__`)."""
    names = ("num_experts", "ep_size", "k", "capacity_factor", "eval_capacity_factor", "min_capacity",
             "use_residual", "noisy_gate_policy", "drop_tokens", "use_rts", "top2_2nd_expert_sampling")
    config, template, factory = _resolve_arguments(
        arguments["hidden_size"], arguments.get("expert"), {n: arguments.get(n, _UNSET) for n in names},
        arguments.get("enable_expert_tensor_parallelism", False), arguments.get("expert_sizes"),
        arguments.get("config"), options)
    tp = TensorParallel.from_mpu(arguments.get("mpu") if arguments.get("mpu") is not None else groups.mpu)
    if arguments.get("enable_expert_tensor_parallelism") or tp is not None:
        raise ValueError("HMoE's ZeRO-3 layer (built inside deepspeed.zero.Init or with frontend='autoep') has no "
                         "tensor parallelism (DeepSpeed's AutoEP folding is not supported): train tensor-parallel "
                         "HMoE layers with ZeRO stage 1 or 2")
    if config.frontend is not MoEFrontend.AUTOEP:
        config = dataclasses.replace(config, frontend=MoEFrontend.AUTOEP)
        config.validate()
    return HMoEAutoEP(arguments["hidden_size"], config=config, expert=template if template is not None else factory)


def _config_from_arguments(hidden_size: int, template: nn.Module | None, factory: Callable[[int], nn.Module] | None,
                           expert_sizes: Sequence[int] | None, deepspeed_args: dict[str, Any],
                           options: dict[str, Any]) -> HMoELayerConfig:
    """The layer configuration of a DeepSpeed-style or HMoE-style constructor call (see :class:`HMoE`)."""
    if template is not None:
        if expert_sizes is not None:
            raise ValueError("expert=<module> is copied into equal experts; for unequal experts pass expert as a "
                             "factory (e.g. expert=lambda h: MyFFN(d, h)) with expert_sizes, or leave expert out "
                             "for the built-in SwiGLU experts")
        num_experts = deepspeed_args.get("num_experts", 1)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts={num_experts!r}: must be an int >= 1")
        # Equal experts; "sizes" in parameters, which is what placement and the P-Penalty weigh.
        sizes = [parameter_count(template)] * num_experts
    elif expert_sizes is None:
        what = "a factory expert needs" if factory is not None else "HMoE needs"
        raise ValueError(f"{what} expert_sizes (one FFN hidden size per expert), or pass expert=<module> and "
                         "num_experts as to DeepSpeed's MoE, or config=HMoELayerConfig(...)")
    else:
        sizes = list(expert_sizes)
        if "num_experts" in deepspeed_args and deepspeed_args["num_experts"] != len(sizes):
            raise ValueError(f"num_experts={deepspeed_args['num_experts']} but expert_sizes has {len(sizes)} entries")
    values: dict[str, Any] = {}
    for name in ("ep_size", "capacity_factor", "eval_capacity_factor", "min_capacity", "noisy_gate_policy",
                 "use_rts", "top2_2nd_expert_sampling", "use_residual"):
        if name in deepspeed_args and name in options:
            raise ValueError(f"{name} given twice")
    if "k" in deepspeed_args and "top_k" in options:
        raise ValueError("pass k (DeepSpeed's name) or top_k, not both")
    deepspeed_style = template is not None or factory is not None or any(
        name in deepspeed_args for name in _DEEPSPEED_GATE_ARGUMENTS)
    if deepspeed_style:
        k = deepspeed_args.get("k", options.pop("top_k", 1))
        routing = str(options.get("routing", "top_k"))
        deepspeed_gate = routing == "top_k" and str(options.get("gate_convention", "deepspeed")) == "deepspeed"
        values.update(routing="top_k", top_k=k, renormalize_gates=isinstance(k, int) and k > 1,
                      load_balance_coef=1.0, p_penalty_coef=0.0, capacity_factor=1.0, eval_capacity_factor=1.0,
                      min_capacity=4)
        if deepspeed_gate:
            values.update(gate_convention="deepspeed", use_rts=True, top2_2nd_expert_sampling=True)
        if template is not None or factory is not None:
            values["expert_compute"] = "loop"  # user modules run one by one
    values.update({name: value for name, value in deepspeed_args.items()
                   if name not in ("num_experts", "k", "drop_tokens")})
    if deepspeed_args.get("drop_tokens", True) is False:
        values.update(capacity_factor=None, eval_capacity_factor=None)
    elif "drop_tokens" in deepspeed_args and deepspeed_args["drop_tokens"] is not True:
        raise ValueError(f"drop_tokens={deepspeed_args['drop_tokens']!r}: must be True or False")
    values.update(options)
    return HMoELayerConfig(expert_sizes=sizes, **values)


def build_moe_layer(hidden_size: int, config: HMoELayerConfig,
                    expert: nn.Module | Callable[[int], nn.Module] | None = None) -> nn.Module:
    """The one place models build MoE layers: picks the DeepSpeed front-end from ``config.frontend``.

    Both front-ends return ``(output, l_aux, exp_counts)`` and satisfy
    :class:`~hmoe_ds.moe_core.MoELayer`. ``expert`` gives the user's own
    experts, on either front-end: an ``nn.Module`` template copied once per
    expert (``len(config.expert_sizes)`` experts), or a factory
    ``h -> nn.Module`` called with each of ``config.expert_sizes``; ``None``
    builds HMoE's built-in FFN experts. With user experts the configuration's
    routing and losses are used as given (no DeepSpeed-style defaults) and the
    experts run one by one (``expert_compute="loop"``).
    """
    if config.frontend is MoEFrontend.AUTOEP:
        return HMoEAutoEP(hidden_size, config=config, expert=expert)
    return HMoE(hidden_size, expert, config=config)


# Router and RoutingStats lived here before the shared core moved to moe_core; the old import path still works.
__all__ = ["HMoE", "HMoEBlock", "Router", "RoutingStats", "build_moe_layer"]
