"""The HMoE causal LM that hmoe-ds trains: the standalone HF model with DeepSpeed's MoE layer in it.

The HMoE paper (Wang et al., arXiv 2408.10681) trains LLaMA decoders whose FFN
blocks are heterogeneous MoE layers. The model itself (embeddings, RMSNorm,
rotary attention with a KV cache, the dense SwiGLU, residual wiring, masks, the
LM head) is defined once, in :mod:`hmoe_ds.hf.modeling_hmoe`, a file that
imports only torch and transformers and is copied into every export. The
classes here subclass it and change one thing: each MoE block is
:func:`hmoe_ds.layer.build_moe_layer`'s DeepSpeed layer (``mlp``, an
:class:`~hmoe_ds.HMoE` or ``HMoEAutoEP``) instead of the standalone
``block_sparse_moe``, so the inference model and the training model cannot
drift apart (``tests/test_hf_model.py`` checks their logits on the same weights).

* :class:`HMoEConfig` - the standalone config; ``moe`` is validated as the
  :class:`~hmoe_ds.config.HMoELayerConfig` fields shared by every MoE layer.
  Defined in :mod:`hmoe_ds.model_config` (with :func:`debug_config` and
  :func:`largest_layer_params_per_rank`), which needs no modeling code, and
  re-exported here.
* :class:`HMoEModel` - the standalone model's blocks, returning the MoE layers'
  summed weighted aux loss and per-layer :class:`~hmoe_ds.moe_core.RoutingStats`.
* :class:`HMoEForCausalLM` - adds the LM head and returns its own loss
  (LM loss + the layers' coefficient-weighted aux losses), the unweighted aux
  terms and the routing stats for logging. ``from_pretrained`` reads exports
  written with Hugging Face's MoE weight names and older ones with
  DeepSpeed's (:data:`hmoe_ds.naming.EXPORT_TO_TRAINING`).
  Routing statistics come from :func:`hmoe_ds.moe_core.collect_routing_stats`.

Both classes are registered with ``AutoConfig`` / ``AutoModelForCausalLM``
when this module is imported.

Shape suffixes: B batch, T sequence length, D hidden_size, V vocab size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import ModelOutput

from hmoe_ds.config import HMoELayerConfig, RoutingMethod
from hmoe_ds.experts import HeteroExperts
from hmoe_ds.hf import modeling_hmoe
from hmoe_ds.hf.configuration_hmoe import DEFAULT_MOE
from hmoe_ds.layer import build_moe_layer
from hmoe_ds.model_config import HMoEConfig, debug_config, dense_branch_params, largest_layer_params_per_rank
from hmoe_ds.moe_core import MoELayer, RoutingStats, collect_routing_stats
from hmoe_ds.sizes import expected_activated_expert_params, expert_param_count, router_param_count

__all__ = [
    "DEFAULT_MOE",
    "HMoECausalLMOutput",
    "HMoEConfig",
    "HMoEForCausalLM",
    "HMoEModel",
    "HMoEModelOutput",
    "HMoEPreTrainedModel",
    "debug_config",
    "largest_layer_params_per_rank",
    "parameter_summary",
]


class HMoEDecoderLayer(modeling_hmoe.HMoEDecoderLayer):
    """The standalone block with DeepSpeed's MoE layer as ``mlp``; reports the layer's weighted aux loss."""

    def build_moe(self, config: HMoEConfig) -> None:
        self.mlp = build_moe_layer(config.hidden_size, config.moe_layer_config(self.layer_idx))

    def moe_forward(self, h_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y_BTD, l_aux, _exp_counts = self.mlp(h_BTD)
        return y_BTD, l_aux


@dataclass
class HMoEModelOutput(ModelOutput):
    """``last_hidden_state`` [B, T, D]; ``aux_loss`` sum of the MoE layers' weighted l_aux; per-layer stats."""

    last_hidden_state: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    routing_stats: list[RoutingStats] | None = None
    cache: Cache | None = None


@dataclass
class HMoECausalLMOutput(ModelOutput):
    """Output of :meth:`HMoEForCausalLM.forward`.

    ``loss`` = ``lm_loss`` + ``aux_loss`` (only with labels); ``aux_loss`` is the
    sum of every MoE layer's coefficient-weighted l_aux (0 for a dense model);
    ``aux_losses`` holds the unweighted terms (load_balance, p_penalty, entropy,
    z_loss), each averaged over MoE layers, detached, for logging;
    ``routing_stats`` has one :class:`RoutingStats` per MoE layer, in layer order;
    ``cache`` the KV cache when ``use_cache`` (generation).
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None
    routing_stats: list[RoutingStats] | None = None
    cache: Cache | None = None


class HMoEPreTrainedModel(modeling_hmoe.HMoEPreTrainedModel):
    """The standalone model's HF plumbing, plus DeepSpeed's expert tags and per-expert initialisation."""

    config_class = HMoEConfig
    config: HMoEConfig

    def _init_weights(self, module: nn.Module) -> None:
        """As the standalone model, but experts are left out.

        Expert matrices (tagged ``allreduce=False``) are drawn per logical expert
        by :meth:`initialize_weights`; drawing them here as well would advance
        the global RNG by an amount that depends on how many experts this rank
        holds, and so change every dense weight initialised after them.
        """
        if isinstance(module, nn.Linear) and getattr(module.weight, "allreduce", True) is False:
            return
        super()._init_weights(module)

    def initialize_weights(self) -> None:
        """HF's initialisation, then experts drawn per logical expert.

        Each expert's weights are seeded by (layer index, logical expert id), so
        the initial model does not depend on EP size, placement or the ZeRO
        front-end (module list or packed). Done here rather than in
        ``_init_weights`` because HF skips modules without direct parameters in
        custom-code models, and expert containers have none. Loaded weights are
        left alone (``init_expert_weights`` honours ``_is_hf_initialized``).
        """
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, HMoEDecoderLayer) and module.is_moe:
                module.mlp.moe_core.init_expert_weights(self.config.initializer_range, seed=module.layer_idx)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained`` for exports of any hmoe-ds version, experts tagged for DeepSpeed.

        Weights saved with Hugging Face's MoE names (``block_sparse_moe``, what
        ``run/export.py`` writes) are renamed to this model's DeepSpeed layout
        (:data:`hmoe_ds.naming.EXPORT_TO_TRAINING`); older exports, written in
        that layout, load as they are. Loading replaces parameter objects, which
        drops the ``allreduce=False`` and ``group_name`` attributes by which
        DeepSpeed recognises expert parameters (``deepspeed.moe.utils.is_moe_param``);
        they are set again here.
        """
        from hmoe_ds.naming import EXPORT_TO_TRAINING

        kwargs.setdefault("key_mapping", dict(EXPORT_TO_TRAINING))
        result = super().from_pretrained(*args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result  # output_loading_info=True
        for module in model.modules():
            if isinstance(module, HeteroExperts):
                module.tag_expert_parameters()
        return result


class HMoEModel(HMoEPreTrainedModel, modeling_hmoe.HMoEModel):
    """The standalone model's blocks with DeepSpeed MoE layers; collects aux losses and routing stats."""

    decoder_layer_class = HMoEDecoderLayer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, use_cache: bool | None = None, **unused: Any) -> HMoEModelOutput:
        """``input_ids`` [B, T]; ``attention_mask`` [B, S] with 1 for tokens and 0 for padding (optional).

        See :meth:`hmoe_ds.hf.modeling_hmoe.HMoEModel.run_layers`. With padding,
        pad tokens are still routed by the MoE layers (they count in the aux
        losses and routing stats).
        """
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        with collect_routing_stats() as routing_stats:  # one RoutingStats per MoE layer, in layer order
            hidden_BTD, layer_aux = self.run_layers(input_ids, attention_mask, cache)
        aux_loss = torch.zeros((), device=hidden_BTD.device)
        for l_aux in layer_aux:
            aux_loss = aux_loss + l_aux
        return HMoEModelOutput(last_hidden_state=hidden_BTD, aux_loss=aux_loss, routing_stats=routing_stats,
                               cache=cache)


class HMoEForCausalLM(HMoEPreTrainedModel, modeling_hmoe.HMoEForCausalLM):
    """:class:`HMoEModel` plus an LM head (tied to the embeddings if ``tie_word_embeddings``)."""

    base_model_class = HMoEModel

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, return_dict: bool | None = None,
                cache: Cache | None = None, use_cache: bool | None = None,
                **unused: Any) -> HMoECausalLMOutput | tuple:
        """Logits [B, T, V] and, with ``labels`` [B, T], the training loss.

        Labels are shifted inside (position t predicts labels[t + 1]) as in HF;
        -100 marks positions to ignore. ``loss`` = ``lm_loss`` + ``aux_loss``.
        ``cache``/``use_cache`` as in the standalone model (``generate`` uses them).
        Other HF keyword arguments are accepted and ignored.
        """
        out = self.model(input_ids, attention_mask, cache=cache, use_cache=use_cache)
        logits_BTV = self.lm_head(out.last_hidden_state)
        aux_losses = {}  # loss_values are the detached tensors behind RoutingStats.losses: no host sync here
        if out.routing_stats:
            for name in out.routing_stats[0].loss_values:
                aux_losses[name] = torch.stack([s.loss_values[name] for s in out.routing_stats]).mean()
        loss = lm_loss = None
        if labels is not None:
            lm_loss = F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                      ignore_index=-100)
            loss = lm_loss + out.aux_loss
        result = HMoECausalLMOutput(loss=loss, lm_loss=lm_loss, aux_loss=out.aux_loss, logits=logits_BTV,
                                    aux_losses=aux_losses, routing_stats=out.routing_stats, cache=out.cache)
        return result if return_dict is not False else result.to_tuple()

    def moe_layers(self) -> list[tuple[int, MoELayer]]:
        """``(layer index, MoE layer)`` for every MoE block, in layer order (either front-end)."""
        return [(i, block.mlp) for i, block in enumerate(self.model.layers) if block.is_moe]


# --------------------------------------------------------------------------- parameter accounting


def _uniform_selection_rate(moe: HMoELayerConfig) -> float:
    """Fraction of tokens that pick a given expert when the router is uniform (P_i = 1/E)."""
    n = moe.num_experts
    if moe.routing == RoutingMethod.TOP_K:
        return moe.top_k / n
    # Top-P keeps the shortest prefix reaching p (Eq. 9): ceil(p * E) experts, 1e-9 absorbs float error.
    return min(n, max(1, math.ceil(moe.top_p * n - 1e-9))) / n


def _full_numel(param: nn.Parameter) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def parameter_summary(model_or_config: nn.Module | HMoEConfig) -> dict[str, int | float]:
    """Parameter counts: ``total_params``, ``expert_params``, ``non_expert_params``, ``activated_params_per_token``.

    From a model the counts are of the parameters this process holds (expert
    parameters are those DeepSpeed marks as MoE parameters; with ep_size > 1
    only the local experts); from a config they are computed analytically for
    the whole model. ``activated_params_per_token`` is an a-priori estimate: all
    non-expert parameters (embeddings and LM head included) plus, per MoE layer,
    the expert parameters a uniform router would activate (Top-K: k experts;
    Top-P: ceil(p * E)). Measured values come from ``RoutingStats``.
    """
    config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    d, moe = config.hidden_size, config.moe_layer_config()
    num_moe = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    experts_per_layer = sum(expert_param_count(d, h, moe.activation.gated) for h in moe.expert_sizes)
    if isinstance(model_or_config, nn.Module):
        from deepspeed.moe.utils import is_moe_param

        params = list(model_or_config.parameters())  # tied weights appear once
        # Under ZeRO-3 a partitioned parameter's tensor is empty (or still gathered after a checkpoint
        # load); ds_numel is its full size either way.
        total = sum(_full_numel(p) for p in params)
        expert = sum(_full_numel(p) for p in params if is_moe_param(p))
    else:
        kv_dim = config.num_key_value_heads * config.head_dim
        total = (config.vocab_size * d * (1 if config.tie_word_embeddings else 2) + d  # embeddings, head, norm
                 + config.num_hidden_layers * (2 * d * d + 2 * d * kv_dim + 2 * d)  # attention, two norms
                 + (config.num_hidden_layers - num_moe) * 3 * d * config.dense_intermediate_size
                 + num_moe * (experts_per_layer + router_param_count(d, moe.num_experts) + dense_branch_params(d, moe)))
        expert = num_moe * experts_per_layer
    rates = [_uniform_selection_rate(moe)] * moe.num_experts
    activated = total - expert + num_moe * expected_activated_expert_params(d, moe.expert_sizes, rates,
                                                                             moe.activation.gated)
    return {"total_params": total, "expert_params": expert, "non_expert_params": total - expert,
            "activated_params_per_token": float(activated)}


# --------------------------------------------------------------------------- the logical model


def logical_config(model_config: Any) -> Any:
    """The parallelism-free twin of a training config: ``ep_size=1``, ``frontend="moe"``, contiguous placement.

    Parameter names and shapes of this model are the checkpoint-independent
    ("logical") layout that export and re-sharding use.
    """
    data = model_config.to_dict()
    data["moe"] = {**data["moe"], "ep_size": 1, "frontend": "moe", "placement": "contiguous"}
    data["expert_placements"] = None
    data["architectures"] = ["HMoEForCausalLM"]
    return HMoEConfig.from_dict(data)


def logical_parameter_shapes(model_config: Any) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the logical model's parameters (tied weights once), built on the meta device."""
    with torch.device("meta"):
        model = HMoEForCausalLM(logical_config(model_config))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


AutoConfig.register(HMoEConfig.model_type, HMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(HMoEConfig, HMoEForCausalLM, exist_ok=True)
