"""The initial model of a training run: a function of (experiment, seed) only.

Hugging Face initialises a model by walking its modules and drawing from
torch's global RNG, so the values a parameter gets depend on how many random
numbers were drawn before it: on which front-end built the MoE layers (module
list under ZeRO 0-2, packed AutoEP experts under ZeRO-3), on how many experts
this rank holds, and under ``deepspeed.zero.Init`` on nothing sensible at all
(the parameters are already partitioned). :func:`initialize_parameters`
instead gives every parameter values drawn from its own generator, seeded by
the run's seed and the parameter's *logical* name (the name it has with
``ep_size=1`` and ``frontend="moe"``, :mod:`hmoe_ds.naming`); experts are
drawn per logical expert. So ZeRO 0/1/2/3, any EP size, placement and world
size start from bit-identical weights.

Each rank writes only the part of each parameter it holds
(:func:`hmoe_ds.partitioned.write_full`): under ZeRO-3 no parameter is ever
gathered and no collective runs; peak extra memory is one full parameter.

The distributions are HF's for this model (``HMoEPreTrainedModel._init_weights``):
normal(0, ``initializer_range``) for every matrix (embeddings, attention, dense
FFN, router, experts), ones for RMSNorm weights.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .naming import logical_dense_key, moe_layers
from .partitioned import full_shape, write_full

__all__ = ["initialize_parameters", "stable_seed"]


def stable_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from ``(seed, name)``: the same in every process, Python and platform."""
    digest = hashlib.blake2b(f"{int(seed)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@torch.no_grad()
def initialize_parameters(model: nn.Module, seed: int) -> None:
    """Initialise every parameter of an ``HMoEForCausalLM`` from ``(seed, logical name)``.

    Call it on every rank after the model is built (under ``deepspeed.zero.Init``
    or not) and before ``deepspeed.initialize`` (ZeRO copies the weights into
    its optimizer partitions there).
    """
    from .hf.modeling_hmoe import RMSNorm

    std = float(model.config.initializer_range)
    layers = moe_layers(model)
    prefixes = [name for _, name, _ in layers]
    expert_params = {id(p) for _, _, layer in layers for p in layer.moe_core.experts.parameters()}
    done: set[int] = set()
    for name, param in model.named_parameters():  # tied weights appear once
        if id(param) in expert_params or id(param) in done:
            continue
        done.add(id(param))
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if isinstance(owner, RMSNorm):
            value = torch.ones(full_shape(param))
        elif isinstance(owner, (nn.Linear, nn.Embedding)) and name.endswith(".weight"):
            generator = torch.Generator().manual_seed(stable_seed(seed, logical_dense_key(name, prefixes)))
            value = torch.empty(full_shape(param)).normal_(0.0, std, generator=generator)
        else:
            raise TypeError(f"{name}: no initialisation rule for a parameter of {type(owner).__name__}; "
                            "add one to hmoe_ds.initialization")
        write_full(param, value)
    for _, prefix, layer in layers:
        layer.moe_core.init_expert_weights(std, seed=stable_seed(seed, prefix) % 2**31)
