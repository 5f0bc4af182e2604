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

from typing import Any, Sequence

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from .compat import check_deepspeed_version
from .config import HMoELayerConfig, MoEFrontend
from .expert_groups import expert_parallel_group, expert_parallel_rank
from .experts import HeteroExperts
from .layer_autoep import HMoEAutoEP
from .moe_core import MoECore, Router, RoutingStats
from .placement import ExpertPlacement, make_placement


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
    ) -> None:
        nn.Module.__init__(self)
        local_sizes = [config.expert_sizes[e] for e in placement.local_experts(ep_rank)]
        experts = HeteroExperts(hidden_size, local_sizes, config.activation, expert_group_name, config.expert_compute)
        MoECore.__init__(self, hidden_size, config, placement, ep_rank, experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._moe_forward(x)


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
        with hmoe_ds.collect_routing_stats() as stats:
            out, l_aux, exp_counts = layer(x)    # as DeepSpeed's MoE
        stats[0].activated_expert_params_per_token

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
            self.deepspeed_moe._set_ep_group(expert_parallel_group(self.expert_group_name))

    @property
    def moe_core(self) -> MoECore:
        """The router, local experts and placement (:class:`~hmoe_ds.moe_core.MoELayer` protocol)."""
        return self.deepspeed_moe

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
        """
        if used_token is not None:
            raise ValueError(
                "used_token is not supported by HMoE: every token is routed; exclude padding from the LM loss "
                "with labels=-100 instead"
            )
        return self.deepspeed_moe(hidden_states)


def build_moe_layer(hidden_size: int, config: HMoELayerConfig) -> nn.Module:
    """The one place models build MoE layers: picks the DeepSpeed front-end from ``config.frontend``.

    Both front-ends return ``(output, l_aux, exp_counts)`` and satisfy
    :class:`~hmoe_ds.moe_core.MoELayer`.
    """
    if config.frontend is MoEFrontend.AUTOEP:
        return HMoEAutoEP(hidden_size, config=config)
    return HMoE(hidden_size, config=config)


# Router and RoutingStats lived here before the shared core moved to moe_core; the old import path still works.
__all__ = ["HMoE", "HMoEBlock", "Router", "RoutingStats", "build_moe_layer"]
