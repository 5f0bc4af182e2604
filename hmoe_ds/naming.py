"""Logical names: the parameter layout of a model independent of how it is parallelised.

The *logical* model of a training config is the same config with ``ep_size=1``,
``frontend="moe"`` and contiguous placement (:func:`hmoe_ds.modeling.logical_config`): every
expert is a module ``<layer>.deepspeed_moe.experts.deepspeed_experts.<id>``
with ``w1/w2/w3`` ``nn.Linear`` weights, and the router is
``<layer>.deepspeed_moe.gate.wg``. Checkpoint shards, re-sharding and
initialisation all speak this layout, so a model trained under any ZeRO
stage, EP size, placement or front-end maps to the same names. This module
owns that mapping (:func:`logical_dense_key`, :func:`logical_expert_key`) and
the per-layer records a checkpoint keeps to invert it (:func:`moe_layer_records`).

It also owns the one mapping between logical names and the names of an export,
which follow Hugging Face's MoE convention (Mixtral's ``block_sparse_moe.gate`` and
``block_sparse_moe.experts.{i}.w1/w2/w3``): :data:`EXPORT_TO_TRAINING`,
:data:`TRAINING_TO_EXPORT`, :func:`export_key`, :func:`logical_key_from_export`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

# Fields that fix parameter shapes or expert layout: a checkpoint only fits a model that agrees on all.
STRUCTURE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "dense_intermediate_size", "moe_layer_frequency", "tie_word_embeddings")
MOE_STRUCTURE_FIELDS = ("expert_sizes", "activation")


def moe_layers(module: torch.nn.Module) -> list[tuple[int, str, Any]]:
    """``(layer index, module name, layer)`` of every MoE layer of ``module``.

    An ``HMoEForCausalLM`` lists its own (``moe_layers()``); in any other
    model, every submodule with a ``moe_core`` (either front-end, the
    :class:`~hmoe_ds.moe_core.MoELayer` protocol) is one, numbered in module order.
    """
    names = {id(m): name for name, m in module.named_modules()}
    if hasattr(module, "moe_layers"):
        return [(i, names[id(layer)], layer) for i, layer in module.moe_layers()]
    found: list[tuple[int, str, Any]] = []
    for name, sub in module.named_modules():
        if any(name.startswith(f"{outer}.") for _, outer, _ in found):
            continue  # HMoE's deepspeed_moe (the core) inside a layer already found
        if hasattr(sub, "moe_core") and hasattr(sub, "config"):
            found.append((len(found), name, sub))
    return found


def moe_layer_records(module: torch.nn.Module) -> list[dict[str, Any]]:
    """What a checkpoint must record per MoE layer to be mapped back to logical experts."""
    records = []
    for index, name, layer in moe_layers(module):
        cfg = layer.config
        records.append({
            "layer": index,
            "module": name,
            "num_experts": cfg.num_experts,
            "expert_sizes": list(cfg.expert_sizes),
            "activation": str(cfg.activation),
            "ep_size": cfg.ep_size,
            "frontend": str(cfg.frontend),
            "placement": layer.placement.to_dict(),
        })
    return records


def expected_moe_layer_records(model_config: Any) -> list[dict[str, Any]]:
    """:func:`moe_layer_records` of the model ``model_config`` would build, without building it."""
    from .placement import make_placement

    records = []
    for index in range(model_config.num_hidden_layers):
        if not model_config.is_moe_layer(index):
            continue
        cfg = model_config.moe_layer_config(index)
        records.append({
            "layer": index,
            "module": f"model.layers.{index}.mlp",
            "num_experts": cfg.num_experts,
            "expert_sizes": list(cfg.expert_sizes),
            "activation": str(cfg.activation),
            "ep_size": cfg.ep_size,
            "frontend": str(cfg.frontend),
            "placement": make_placement(cfg.placement, cfg.expert_sizes, cfg.ep_size).to_dict(),
        })
    return records


def logical_expert_key(prefix: str, expert: int, weight: str) -> str:
    """Logical name of expert ``expert``'s ``weight`` (w1/w2/w3) in the MoE layer module ``prefix``."""
    return logical_expert_param_key(prefix, expert, f"{weight}.weight")


def logical_expert_param_key(prefix: str, expert: int, name: str) -> str:
    """Logical name of parameter ``name`` of expert ``expert`` in the MoE layer module ``prefix``.

    ``name`` is the parameter's name inside the expert module: ``w1.weight``
    for the built-in FFN, the user's own name (``0.weight``, ``fc1.bias``)
    for the user's expert modules, whichever front-end stores them.
    """
    return f"{prefix}.deepspeed_moe.experts.deepspeed_experts.{expert}.{name}"


def logical_dense_key(name: str, moe_prefixes: list[str]) -> str:
    """Logical name of a non-expert parameter: the gate moves under ``deepspeed_moe`` (AutoEP has it at the top).

    A shared or residual expert (``mlp``, ``coefficient``) sits on the layer
    itself in both front-ends, as in DeepSpeed's Residual MoE, so it keeps its name.
    """
    for prefix in moe_prefixes:
        if name.startswith(prefix + ".gate."):
            return f"{prefix}.deepspeed_moe.{name[len(prefix) + 1:]}"
    return name


def expert_weight_names(layer: Any) -> tuple[str, ...]:
    return ("w1", "w2", "w3") if layer.config.activation.gated else ("w1", "w2")


# --------------------------------------------------------------------------- export (Hugging Face) names
#
# The one place where the logical (training) names above meet the names of an export. Exports follow
# Hugging Face's MoE convention (Mixtral): the MoE block of layer l is ``model.layers.{l}.block_sparse_moe``
# with the router at ``.gate.weight`` [E, D] and expert i at ``.experts.{i}.w1/w2/w3.weight`` (w1 the gate
# projection [h_i, D], w3 the up projection [h_i, D], w2 the down projection [D, h_i]). Attention, norms,
# embeddings, the LM head and dense layers (``mlp.gate_proj/up_proj/down_proj``) have LLaMA's names in both.
# A shared expert (``shared_expert_size``) is ``.shared_expert.w1/w2/w3`` and a Residual-MoE coefficient
# ``.residual_coefficient`` in the export, ``mlp.mlp`` and ``mlp.coefficient`` in training (DeepSpeed's names).
# Exports written before this convention used the logical names; both load (the patterns below only
# match the new names).

#: ``{regex: replacement}`` turning an export name into the logical name, also passed to
#: ``from_pretrained(key_mapping=...)`` (whose renaming replaces the matched part of a name with the
#: replacement, and knows at most ``\1``: hence patterns on the distinctive middle of the names).
EXPORT_TO_TRAINING: dict[str, str] = {
    r"\.block_sparse_moe\.gate\.weight$": ".mlp.deepspeed_moe.gate.wg.weight",
    r"\.block_sparse_moe\.experts\.": ".mlp.deepspeed_moe.experts.deepspeed_experts.",
    r"\.block_sparse_moe\.shared_expert\.": ".mlp.mlp.",
    r"\.block_sparse_moe\.residual_coefficient\.": ".mlp.coefficient.",
}
#: The inverse of :data:`EXPORT_TO_TRAINING`: logical name -> export name.
TRAINING_TO_EXPORT: dict[str, str] = {
    r"\.mlp\.deepspeed_moe\.gate\.wg\.weight$": ".block_sparse_moe.gate.weight",
    r"\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.": ".block_sparse_moe.experts.",
    r"\.mlp\.mlp\.": ".block_sparse_moe.shared_expert.",
    r"\.mlp\.coefficient\.": ".block_sparse_moe.residual_coefficient.",
}


def _rename(name: str, patterns: dict[str, str]) -> str:
    for pattern, replacement in patterns.items():
        match = re.search(pattern, name)
        if match:  # as transformers' key_mapping does: the matched part replaced, literally
            return name[:match.start()] + replacement + name[match.end():]
    return name


def export_key(logical_name: str) -> str:
    """The name a logical parameter has in an export (Hugging Face / Mixtral convention)."""
    return _rename(logical_name, TRAINING_TO_EXPORT)


def logical_key_from_export(export_name: str) -> str:
    """The logical name of a tensor in an export; names of older exports (already logical) are returned as is."""
    return _rename(export_name, EXPORT_TO_TRAINING)
