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

The experts are HMoE's built-in FFNs (``expert_sizes``), or the user's own
modules (``expert=`` a template copied per expert, or a factory ``h -> module``
with ``expert_sizes``), whose parameters are then packed the same way
(:class:`~hmoe_ds.experts.PackedModuleExperts`) and whose ``forward`` runs
one expert after another on views of the packs. DeepSpeed's own MoE has no
ZeRO-3 at all (0.19.8 refuses it at ``deepspeed.initialize``), so user
experts under ZeRO-3 are beyond DeepSpeed: :class:`hmoe_ds.HMoE` built inside
``deepspeed.zero.Init`` returns this layer.

What DeepSpeed sees: ``num_experts == ep_size`` packed experts, one local
expert per EP rank, contiguous placement of those packs
(:data:`ENGINE_ATTRIBUTES` lists each attribute and what the engine does
with it). The *logical* experts, their sizes and placement are in
``self.config`` (``config.num_experts``) and ``self.placement``, which is
what hmoe-ds's own code reads (:class:`~hmoe_ds.moe_core.MoELayer`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Callable, Iterator, Sequence

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
from .config import ExpertCompute, HMoELayerConfig, MoEFrontend
from .expert_groups import expert_data_parallel_group, expert_parallel_group, expert_parallel_rank
from .experts import PackedHeteroExperts, PackedModuleExperts, packed_rows
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

    Same ``forward`` contract as :class:`hmoe_ds.HMoE`; build it with
    ``build_moe_layer(hidden_size, HMoELayerConfig(..., frontend="autoep"))``
    (``expert=`` for the user's own experts), or as ``HMoE(...)`` inside
    ``deepspeed.zero.Init``. The process group must exist before construction
    (``deepspeed.init_distributed()``), even with ``ep_size=1``, because
    DeepSpeed's expert groups are created here.

    Args:
        hidden_size: model width D.
        config: the layer configuration; ``frontend`` must be ``autoep``.
        expert: ``None`` for HMoE's built-in FFN experts of ``config.expert_sizes``;
            an ``nn.Module`` template copied once per expert (``config.expert_sizes``
            then only weighs the placement; DeepSpeed-style calls of
            :class:`hmoe_ds.HMoE` set them to the template's parameter count);
            or a factory ``h -> nn.Module`` called with each of
            ``config.expert_sizes``. User experts are built outside
            ``deepspeed.zero.Init`` (each rank builds only its own, which differ
            in shape across EP ranks, so ZeRO-3 could not partition them as
            built), copied into the packs, which ZeRO-3 partitions, and dropped:
            while the layer is built a rank briefly holds its local experts
            twice. A template built inside ``deepspeed.zero.Init`` is gathered
            to be copied (a collective: every rank builds the layer). The
            P-Penalty and the activated-parameter statistics use each expert's
            real parameter count.
    """

    def __init__(self, hidden_size: int, *, config: HMoELayerConfig,
                 expert: nn.Module | Callable[[int], nn.Module] | None = None) -> None:
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
        expert_params = None
        if expert is None:
            local_sizes = [config.expert_sizes[e] for e in placement.local_experts(ep_rank)]
            # Every EP rank's pack has the same shape (see PackedHeteroExperts), whatever the placement.
            padded_width = max(sum(config.expert_sizes[e] for e in rank) for rank in placement.rank_experts)
            experts: nn.Module = PackedHeteroExperts(hidden_size, local_sizes, config.activation,
                                                     config.expert_compute, padded_width=padded_width,
                                                     tag_parameter=self._tag_expert_parameter)
        else:
            if config.expert_compute is ExpertCompute.GROUPED:
                raise ValueError("expert_compute='grouped' runs HMoE's built-in FFN experts; the user's own expert "
                                 "modules run one by one: use expert_compute='loop' (or 'auto')")
            config = dataclasses.replace(config, expert_compute=ExpertCompute.LOOP)
            local_modules, shapes = _user_experts(expert, config.expert_sizes, placement.local_experts(ep_rank))
            expert_params = [sum(_numel(shape) for _, shape in named) for named in shapes]
            rows = packed_rows([[shapes[e] for e in rank] for rank in placement.rank_experts], hidden_size)
            experts = PackedModuleExperts(hidden_size, local_modules, rows, tag_parameter=self._tag_expert_parameter)
            del local_modules
        MoECore.__init__(self, hidden_size, config, placement, ep_rank, experts, expert_params=expert_params)
        for param in self.gate.parameters():
            param.allreduce = True
            param.ds_zero_placement_family = "replicated"
        self._set_ep_group(expert_parallel_group(group_name))
        # A shared / residual expert is dense: replicated (ZeRO-3 partitions it over all ranks like the gate).
        dense = None
        if isinstance(expert, nn.Module) and config.use_residual and not config.shared_expert_size:
            dense = expert  # DeepSpeed uses the template itself as the residual MLP
        elif expert is not None and not isinstance(expert, nn.Module) and config.shared_expert_size:
            dense = _checked_expert(expert, config.shared_expert_size)  # replicated: built inside zero.Init
        self.mlp, self.coefficient = build_dense_branch(hidden_size, config, dense)
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


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for n in shape:
        out *= int(n)
    return out


@contextlib.contextmanager
def outside_zero_init() -> Iterator[None]:
    """Build modules as if no ``deepspeed.zero.Init`` were active (their parameters stay whole and local).

    DeepSpeed's own ``shutdown_init_context``/``restore_init_context`` (what
    its engine does when built inside the context); a no-op outside it.
    """
    from deepspeed.runtime.zero import partition_parameters

    if partition_parameters.zero_init_context == 0:
        yield
        return
    partition_parameters.shutdown_init_context()
    try:
        yield
    finally:
        partition_parameters.restore_init_context()


def _checked_expert(factory: Callable[[int], nn.Module], ffn_size: int) -> nn.Module:
    module = factory(ffn_size)
    if not isinstance(module, nn.Module):
        raise TypeError(f"the expert factory returned {type(module).__name__} for size {ffn_size}; "
                        "it must return an nn.Module mapping [tokens, hidden_size] to [tokens, hidden_size]")
    return module


def _user_experts(expert: nn.Module | Callable[[int], nn.Module], sizes: Sequence[int], local: Sequence[int]
                  ) -> tuple[list[nn.Module], list[list[tuple[str, tuple[int, ...]]]]]:
    """``(this rank's expert modules, (name, shape) of every expert's parameters)`` for the packs.

    The modules have ordinary parameters whatever context the layer is built
    in: a template's copies are taken from its gathered values (it may be a
    ZeRO-3 module); a factory is called outside ``deepspeed.zero.Init``, for
    the local experts on the CPU and for every expert's shapes on the meta device.
    """
    if isinstance(expert, nn.Module):
        params = list(expert.parameters())
        gathered: Any = contextlib.nullcontext()
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(params)
        with gathered, outside_zero_init():
            named = [(name, tuple(p.shape)) for name, p in expert.named_parameters()]
            modules = []
            for _ in local:
                memo: dict[int, Any] = {id(p): nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                                        for p in params}
                modules.append(copy.deepcopy(expert, memo))
        return modules, [named] * len(sizes)
    if not callable(expert):
        raise ValueError(f"expert={expert!r}: pass an nn.Module (copied per expert), a factory h -> nn.Module, "
                         "or None for the built-in experts")
    with outside_zero_init():
        modules = [_checked_expert(expert, sizes[e]) for e in local]
        with torch.device("meta"):
            shapes = [[(name, tuple(p.shape)) for name, p in _checked_expert(expert, h).named_parameters()]
                      for h in sizes]
    return modules, shapes


__all__ = ["HMoEAutoEP", "RoutingStats", "outside_zero_init"]
