"""Logical names: the parameter layout of a model independent of how it is parallelised.

The *logical* model of a training config is the same config with ``ep_size=1``,
``frontend="moe"`` and contiguous placement (:func:`logical_config`): every
expert is a module ``<layer>.deepspeed_moe.experts.deepspeed_experts.<id>``
with ``w1/w2/w3`` ``nn.Linear`` weights, and the router is
``<layer>.deepspeed_moe.gate.wg``. Checkpoint shards, exports, re-sharding and
initialisation all speak this layout, so a model trained under any ZeRO
stage, EP size, placement or front-end maps to the same names. This module
owns that mapping (:func:`logical_dense_key`, :func:`logical_expert_key`) and
the per-layer records a checkpoint keeps to invert it (:func:`moe_layer_records`).
"""

from __future__ import annotations

from typing import Any

import torch

# Fields that fix parameter shapes or expert layout: a checkpoint only fits a model that agrees on all.
STRUCTURE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "dense_intermediate_size", "moe_layer_frequency", "tie_word_embeddings")
MOE_STRUCTURE_FIELDS = ("expert_sizes", "activation")


def moe_layers(module: torch.nn.Module) -> list[tuple[int, str, Any]]:
    """``(layer index, module name, layer)`` of every MoE layer of an ``HMoEForCausalLM``."""
    names = {id(m): name for name, m in module.named_modules()}
    return [(i, names[id(layer)], layer) for i, layer in module.moe_layers()]


def mixin_host(layer: Any) -> Any:
    """The object holding the math (``experts``, ``placement``): ``deepspeed_moe`` for HMoE, else the layer."""
    return getattr(layer, "deepspeed_moe", layer)


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


def logical_config(model_config: Any) -> Any:
    """The parallelism-free twin of a training config: ``ep_size=1``, ``frontend="moe"``, contiguous placement.

    Parameter names and shapes of this model are the checkpoint-independent
    ("logical") layout that export and re-sharding use.
    """
    from .modeling import HMoEConfig

    data = model_config.to_dict()
    data["moe"] = {**data["moe"], "ep_size": 1, "frontend": "moe", "placement": "contiguous"}
    data["expert_placements"] = None
    data["architectures"] = ["HMoEForCausalLM"]
    return HMoEConfig.from_dict(data)


def logical_expert_key(prefix: str, expert: int, weight: str) -> str:
    """Logical name of expert ``expert``'s ``weight`` (w1/w2/w3) in the MoE layer module ``prefix``."""
    return f"{prefix}.deepspeed_moe.experts.deepspeed_experts.{expert}.{weight}.weight"


def logical_dense_key(name: str, moe_prefixes: list[str]) -> str:
    """Logical name of a non-expert parameter: the gate moves under ``deepspeed_moe`` (AutoEP has it at the top)."""
    for prefix in moe_prefixes:
        if name.startswith(prefix + "."):
            rest = name[len(prefix) + 1:].removeprefix("deepspeed_moe.")
            return f"{prefix}.deepspeed_moe.{rest}"
    return name


def logical_parameter_shapes(model_config: Any) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the logical model's parameters (tied weights once), built on the meta device."""
    from .modeling import HMoEForCausalLM

    with torch.device("meta"):
        model = HMoEForCausalLM(logical_config(model_config))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def expert_weight_names(layer: Any) -> tuple[str, ...]:
    return ("w1", "w2", "w3") if layer.config.activation.gated else ("w1", "w2")
