"""The HMoE layer for ZeRO stage 3: the same math on DeepSpeed's AutoEP base class.

DeepSpeed 0.19.8 refuses ``deepspeed.moe.layer.MoE`` (and subclasses) under
ZeRO-3, and partitions expert parameters over the expert-data-parallel group
only on ``AutoEPMoELayer`` instances whose parameters carry its placement tags.
:class:`HMoEAutoEP` is such an instance: it skips
AutoEP's HF-module-replacing constructor (``nn.Module.__init__`` instead),
sets the attributes the engine reads, and presents each rank's unequal experts
as ONE packed expert per EP rank (:class:`~hmoe_ds.experts.PackedHeteroExperts`).
Routing, losses, dispatch, exchange and expert math are the shared
:class:`~hmoe_ds.moe_core.MoECore`; no DeepSpeed guard is patched.

What DeepSpeed sees: ``num_experts == ep_size`` packed experts, one local
expert per EP rank, contiguous placement of those packs
(:data:`ENGINE_ATTRIBUTES` lists each attribute and what the engine does
with it). The *logical* experts, their sizes and placement are in
``self.config`` (``config.num_experts``) and ``self.placement``, which is
what hmoe-ds's own code reads (:class:`~hmoe_ds.moe_core.MoELayer`).
"""

from __future__ import annotations

from typing import Any

import torch
from deepspeed.checkpoint.autoep_affine import autoep_placement_to_affine_map, legacy_uniform_autoep_placement_descriptor
from deepspeed.checkpoint.constants import (
    AFFINE_MAP,
    AUTOEP_EXPERT_PLACEMENT,
    AUTOEP_PARAM_EP_RANK,
    AUTOEP_PARAM_LOCAL_EXPERTS,
    AUTOEP_PARAM_LOGICAL_SHAPE,
    DS_AUTOEP_UC_META,
)
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
from torch import nn

from .compat import check_deepspeed_version
from .config import HMoELayerConfig, MoEFrontend
from .expert_groups import expert_data_parallel_group, expert_parallel_group, expert_parallel_rank
from .experts import PackedHeteroExperts
from .moe_core import MoECore, RoutingStats, build_dense_branch, mix_dense_branch, parameter_count
from .placement import make_placement

#: The attributes DeepSpeed 0.19.8's engine reads from an ``AutoEPMoELayer``, and what it does with
#: each (functions of ``deepspeed/runtime/engine.py``). ``tests/test_layer_autoep.py`` checks the engine
#: still reads every one, so an attribute that stops mattering is noticed, not carried forever.
ENGINE_ATTRIBUTES: dict[str, str] = {
    "num_experts": "_configure_distributed_model: marks the model as MoE (packs, one per EP rank)",
    "wall_clock_breakdown": "_configure_distributed_model: set when the user enables timers",
    "ep_size": "_save_moe_checkpoint: the expert-parallel size recorded with each expert file",
    "ep_rank": "_validate_autoep_zero3_partitioned_metadata: which packs this rank holds",
    "expert_placement_descriptor": "_save_moe_checkpoint / ZeRO-3 metadata: pack placement over EP ranks",
    "ep_group_name": "_save_moe_checkpoint / load_moe_state_dict: the expert group of the packs",
    "expert_group_name": "_save_moe_checkpoint / load_moe_state_dict: the same group, under MoE's name",
    "num_local_experts": "_save_moe_checkpoint / load_moe_state_dict: packs per rank (always 1)",
}


class HMoEAutoEP(MoECore, AutoEPMoELayer):
    """Heterogeneous MoE layer that DeepSpeed partitions under ZeRO-3 (and trains under 0-2).

    Same constructor and ``forward`` contract as :class:`hmoe_ds.HMoE`; build it
    with ``build_moe_layer(hidden_size, HMoELayerConfig(..., frontend="autoep"))``.
    The process group must exist before construction (``deepspeed.init_distributed()``),
    even with ``ep_size=1``, because DeepSpeed's expert groups are created here.
    """

    def __init__(self, hidden_size: int, *, config: HMoELayerConfig) -> None:
        # AutoEPMoELayer.__init__ converts an existing HF MoE block; we build our own.
        nn.Module.__init__(self)
        check_deepspeed_version()
        config.validate()
        if config.frontend is not MoEFrontend.AUTOEP:
            raise ValueError(f"HMoEAutoEP needs frontend='autoep'; got {str(config.frontend)!r}")
        ep_size = config.ep_size
        group_name = f"ep_size_{ep_size}"
        ep_rank = expert_parallel_rank(ep_size, group_name)
        placement = make_placement(config.placement, config.expert_sizes, ep_size)
        # The attributes DeepSpeed's engine reads from AutoEP layers (ENGINE_ATTRIBUTES says what for).
        # num_experts is DeepSpeed's count of packs; the HMoE expert count is config.num_experts.
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.ep_group_name = group_name
        self.expert_group_name = group_name
        self.num_experts = ep_size
        self.num_local_experts = 1
        self.expert_placement_descriptor = legacy_uniform_autoep_placement_descriptor(ep_size, 1, ep_size)
        self.wall_clock_breakdown = False
        local_sizes = [config.expert_sizes[e] for e in placement.local_experts(ep_rank)]
        # Every EP rank's pack has the same shape (see PackedHeteroExperts), whatever the placement.
        padded_width = max(sum(config.expert_sizes[e] for e in rank) for rank in placement.rank_experts)
        experts = PackedHeteroExperts(hidden_size, local_sizes, config.activation, config.expert_compute,
                                      padded_width=padded_width, tag_parameter=self._tag_expert_parameter)
        MoECore.__init__(self, hidden_size, config, placement, ep_rank, experts)
        for param in self.gate.parameters():
            param.allreduce = True
            param.ds_zero_placement_family = "replicated"
        self._set_ep_group(expert_parallel_group(group_name))
        # A shared / residual expert is dense: replicated (ZeRO-3 partitions it over all ranks like the gate).
        self.mlp, self.coefficient = build_dense_branch(hidden_size, config)
        if self.mlp is not None:
            self.always_active_params = parameter_count(self.mlp)

    def _tag_expert_parameter(self, param: nn.Parameter) -> None:
        """The tags AutoEP sets: expert-data-parallel reduction and ZeRO-3 partition group.

        Called by :class:`PackedHeteroExperts` before its constructor returns, so
        that under ``deepspeed.zero.Init`` each pack is partitioned over its
        expert-data-parallel group (``ds_zero_partition_process_group``), which
        is what the engine later checks, instead of over every rank.
        """
        param.allreduce = False
        param.group_name = self.ep_group_name
        param.ds_zero_placement_family = "autoep_expert"
        param.ds_zero_partition_group_name = self.ep_group_name
        param.ds_zero_partition_process_group = expert_data_parallel_group(self.ep_group_name)
        logical_shape = [self.num_experts, *param.shape[1:]]
        affine_map = autoep_placement_to_affine_map(self.expert_placement_descriptor, logical_shape)
        setattr(
            param,
            DS_AUTOEP_UC_META,
            {
                AUTOEP_EXPERT_PLACEMENT: self.expert_placement_descriptor,
                AFFINE_MAP: affine_map.to_dict(),
                AUTOEP_PARAM_LOGICAL_SHAPE: logical_shape,
                AUTOEP_PARAM_EP_RANK: self.ep_rank,
                AUTOEP_PARAM_LOCAL_EXPERTS: [self.ep_rank],
            },
        )

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False,
                                  folding_group_handles: Any = None) -> None:
        """Called by the engine; the groups already exist (created at construction)."""
        if folding_group_handles is not None:
            raise ValueError("HMoE does not support AutoEP tensor-parallel folding; set tensor_parallel.autotp_size=1")
        self._set_ep_group(expert_parallel_group(self.ep_group_name))

    @property
    def expert_sizes(self) -> list[int]:
        return list(self.config.expert_sizes)

    def forward(self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None  # type: ignore[override]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(output, l_aux, exp_counts)``, exactly as :meth:`hmoe_ds.HMoE.forward`."""
        output, l_aux, exp_counts = self._moe_forward(hidden_states, used_token)
        if self.mlp is not None:
            output = mix_dense_branch(hidden_states, output, self.mlp, self.coefficient)
        return output, l_aux, exp_counts


__all__ = ["HMoEAutoEP", "RoutingStats"]
