"""A Hugging Face-compatible decoder-only HMoE language model (LLaMA-style).

The HMoE paper (Wang et al., arXiv 2408.10681) trains LLaMA decoders whose FFN
blocks are heterogeneous MoE layers; this file is that model, small enough to
read in one sitting (in the spirit of nanoGPT's ``model.py``):

* :class:`HMoEConfig` - a ``PretrainedConfig``; ``moe`` holds the
  :class:`~hmoe_ds.config.HMoELayerConfig` fields shared by every MoE layer.
* :class:`HMoEModel` - embeddings, ``num_hidden_layers`` pre-norm blocks
  (RMSNorm, rotary attention through ``scaled_dot_product_attention``, then a
  SwiGLU FFN or an HMoE layer) and a final RMSNorm.
* :class:`HMoEForCausalLM` - adds the LM head and returns its own loss
  (LM loss + the layers' coefficient-weighted aux losses), the unweighted aux
  terms and per-layer :class:`~hmoe_ds.layer.RoutingStats` for logging.

Both classes are registered with ``AutoConfig`` / ``AutoModelForCausalLM``
when this module is imported. There is no KV cache: ``generate()`` recomputes
the whole sequence at every step, which is simple and enough for evaluation.

Shape suffixes: B batch, T sequence length, D hidden_size, H attention heads,
G key/value heads, K head dim, F dense FFN hidden size, V vocab size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from hmoe_ds import layer as moe_layer
from hmoe_ds.config import HMoELayerConfig, RoutingMethod
from hmoe_ds.layer import RoutingStats, build_moe_layer
from hmoe_ds.experts import HeteroExperts
from hmoe_ds.sizes import expected_activated_expert_params, expert_param_count, router_param_count

__all__ = [
    "HMoECausalLMOutput",
    "HMoEConfig",
    "HMoEForCausalLM",
    "HMoEModel",
    "HMoEModelOutput",
    "HMoEPreTrainedModel",
    "debug_config",
    "parameter_summary",
]

# The paper's 0.4B HMoE: 8 experts summing to 12,288 in its main (arithmetic) shape, 96 x {9, 11, ..., 23};
# Top-P with p = 0.6, P-Penalty 0.1 (Eq. 4) and router entropy 3e-2 (Eq. 5).
DEFAULT_MOE: dict[str, Any] = {
    "expert_sizes": [864, 1056, 1248, 1440, 1632, 1824, 2016, 2208],
    "routing": "top_p",
    "top_p": 0.6,
    "p_penalty_coef": 0.1,
    "entropy_coef": 0.03,
}


class HMoEConfig(PretrainedConfig):
    """Configuration of an :class:`HMoEForCausalLM` (defaults: the paper's 0.4B HMoE, Top-P).

    ``moe_layer_frequency`` n places MoE layers at indices i with (i + 1) % n == 0:
    1 makes every layer MoE, 2 makes layers 1, 3, 5, ... MoE (the first layer
    stays dense), and 0 gives a dense model with no MoE layer (the dense
    baseline). ``moe`` is a dict of :class:`HMoELayerConfig` fields, stored
    fully expanded (every field, enums as strings) so ``config.json`` is explicit;
    it is ignored when ``moe_layer_frequency`` is 0. ``expert_placements``, when
    given, holds one explicit layout (``rank_experts``) per MoE layer, in layer
    order, and overrides ``moe.placement`` layer by layer: it is what
    ``moe.placement: measured`` resolves to from a run's measured load
    (:mod:`hmoe_ds.training.replacement`). ``num_key_value_heads``
    None means multi-head attention; fewer heads than ``num_attention_heads``
    gives grouped-query attention. ``dense_intermediate_size`` is the SwiGLU width
    of the layers that are not MoE. ``max_position_embeddings`` is recorded for
    HF tooling; rotary embeddings themselves have no length limit. Every error
    names the field and the allowed values.
    """

    model_type = "hmoe"

    vocab_size: int = 32000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    dense_intermediate_size: int = 2048
    moe_layer_frequency: int = 1
    moe: dict[str, Any] | None = None
    expert_placements: list[list[list[int]]] | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings", "dense_intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r}: must be a positive int")
        for name in ("rope_theta", "rms_norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a positive number")
        if not self.initializer_range >= 0:
            raise ValueError(f"initializer_range={self.initializer_range!r}: must be a number >= 0")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_attention_heads="
                             f"{self.num_attention_heads}; allowed num_attention_heads: divisors of hidden_size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads="
                             f"{self.num_attention_heads}; allowed: a divisor of num_attention_heads, or None for MHA")
        if self.head_dim % 2:
            raise ValueError(f"hidden_size / num_attention_heads = {self.head_dim} must be even for rotary embeddings")
        n = self.moe_layer_frequency
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.num_hidden_layers:
            raise ValueError(f"moe_layer_frequency={n!r}: allowed values are 0 (dense model, no MoE layer) and "
                             f"1..num_hidden_layers={self.num_hidden_layers} (every n-th layer is MoE)")
        moe = DEFAULT_MOE if self.moe is None else self.moe
        if not isinstance(moe, dict):
            raise ValueError(f"moe={moe!r}: must be a dict of HMoELayerConfig fields, e.g. {DEFAULT_MOE}")
        try:
            self.moe = HMoELayerConfig.from_dict(moe).to_dict()
        except (ValueError, TypeError) as err:
            raise ValueError(f"moe: {err}") from err
        if self.expert_placements is not None:
            self._check_expert_placements()
        super().__post_init__(**kwargs)

    def _check_expert_placements(self) -> None:
        layouts = self.expert_placements
        count = len(self.moe_layer_indices())
        if not isinstance(layouts, (list, tuple)) or len(layouts) != count:
            raise ValueError(f"expert_placements: need one layout per MoE layer ({count}), got {layouts!r}")
        for ordinal, rank_experts in enumerate(layouts):
            try:
                self.moe_layer_config(self.moe_layer_indices()[ordinal])
            except (ValueError, TypeError, KeyError) as err:
                raise ValueError(f"expert_placements[{ordinal}]={rank_experts!r}: {err}") from err

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def moe_layer_config(self, layer_idx: int | None = None) -> HMoELayerConfig:
        """The :class:`HMoELayerConfig` of block ``layer_idx`` (a fresh copy).

        Every MoE layer shares ``moe``, except for the placement when
        ``expert_placements`` gives this layer its own; without ``layer_idx``,
        the shared settings.
        """
        moe = dict(self.moe)
        if layer_idx is not None and self.expert_placements is not None:
            ordinal = self.moe_layer_indices().index(layer_idx)
            moe["placement"] = {"rank_experts": self.expert_placements[ordinal]}
        return HMoELayerConfig.from_dict(moe)

    def moe_layer_indices(self) -> list[int]:
        """Block indices of the MoE layers, in order (MoE layer ``i`` of the metrics is block ``[i]``)."""
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` (0-based) is an MoE layer: (i + 1) % moe_layer_frequency == 0."""
        n = self.moe_layer_frequency
        return n > 0 and (layer_idx + 1) % n == 0


def debug_config(**overrides: Any) -> HMoEConfig:
    """The tiny model shared by tests and smoke runs: 2 layers, D=64, 4 heads (2 KV), 4 unequal experts.

    ``overrides`` replace config fields; a ``moe`` dict is merged into the debug
    MoE settings, e.g. ``debug_config(moe={"routing": "top_k"})``.
    """
    moe = {"expert_sizes": [32, 64, 96, 128], "routing": "top_p", "top_p": 0.6,
           "p_penalty_coef": 0.1, "entropy_coef": 0.03, **overrides.pop("moe", {})}
    fields = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, dense_intermediate_size=128,
                  moe_layer_frequency=1, moe=moe)
    return HMoEConfig(**{**fields, **overrides})


# --------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (LLaMA)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x32_BTD = x_BTD.float()
        x32_BTD = x32_BTD * torch.rsqrt(x32_BTD.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32_BTD.to(x_BTD.dtype)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, K] of rotary embeddings for positions 0..T-1 (rotate-half layout, as HF LLaMA).

    Computed on the fly rather than cached in a buffer: it is cheap, and
    ``from_pretrained`` builds models on the meta device, where an unsaved buffer
    would have to be re-created by hand.
    """
    inv_freq_K2 = theta ** -(torch.arange(0, head_dim, 2, device=like.device, dtype=torch.float32) / head_dim)
    angles_TK2 = torch.arange(seq_len, device=like.device, dtype=torch.float32)[:, None] * inv_freq_K2
    angles_TK = torch.cat((angles_TK2, angles_TK2), dim=-1)
    return angles_TK.cos().to(like.dtype), angles_TK.sin().to(like.dtype)


def apply_rotary(x_BHTK: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor) -> torch.Tensor:
    x1_BHTK, x2_BHTK = x_BHTK.chunk(2, dim=-1)
    return x_BHTK * cos_TK + torch.cat((-x2_BHTK, x1_BHTK), dim=-1) * sin_TK


class Attention(nn.Module):
    """Causal self-attention with rotary embeddings; grouped-query when G < H."""

    def __init__(self, config: HMoEConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor,
                mask_B1TT: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTK = self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k_BGTK = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BGTK = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_BHTK, k_BGTK = apply_rotary(q_BHTK, cos_TK, sin_TK), apply_rotary(k_BGTK, cos_TK, sin_TK)
        # Without padding the mask is None and is_causal lets SDPA pick its fused (flash) kernels.
        y_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BGTK, v_BGTK, attn_mask=mask_B1TT,
                                                is_causal=mask_B1TT is None,
                                                enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(y_BHTK.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """Dense LLaMA FFN, down(silu(gate(x)) * up(x)), used by the layers that are not MoE."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class HMoEDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x)); ffn is SwiGLU or an HMoE layer."""

    def __init__(self, config: HMoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layer_idx = layer_idx
        self.mlp = (build_moe_layer(config.hidden_size, config.moe_layer_config(layer_idx)) if self.is_moe
                    else SwiGLU(config.hidden_size, config.dense_intermediate_size))

    def forward(self, x_BTD: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor,
                mask_B1TT: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the new hidden states and the MoE layer's weighted aux loss (None for a dense block)."""
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_TK, sin_TK, mask_B1TT)
        h_BTD = self.post_attention_layernorm(x_BTD)
        if not self.is_moe:
            return x_BTD + self.mlp(h_BTD), None
        y_BTD, l_aux, _exp_counts = self.mlp(h_BTD)
        return x_BTD + y_BTD, l_aux


# --------------------------------------------------------------------------- HF models


@dataclass
class HMoEModelOutput(ModelOutput):
    """``last_hidden_state`` [B, T, D]; ``aux_loss`` sum of the MoE layers' weighted l_aux; per-layer stats."""

    last_hidden_state: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    routing_stats: list[RoutingStats] | None = None


@dataclass
class HMoECausalLMOutput(ModelOutput):
    """Output of :meth:`HMoEForCausalLM.forward`.

    ``loss`` = ``lm_loss`` + ``aux_loss`` (only with labels); ``aux_loss`` is the
    sum of every MoE layer's coefficient-weighted l_aux (0 for a dense model);
    ``aux_losses`` holds the unweighted terms (load_balance, p_penalty, entropy,
    z_loss), each averaged over MoE layers, detached, for logging;
    ``routing_stats`` has one :class:`RoutingStats` per MoE layer, in layer order.
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None
    routing_stats: list[RoutingStats] | None = None


class HMoEPreTrainedModel(PreTrainedModel):
    """HF plumbing shared by the models: config class, weight init, checkpointing, loading."""

    config_class = HMoEConfig
    config: HMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HMoEDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """normal(0, initializer_range) for matrices, zero biases, ones for norms; experts are left out.

        Expert matrices (tagged ``allreduce=False``) are drawn per logical expert
        by :meth:`initialize_weights`; drawing them here as well would advance
        the global RNG by an amount that depends on how many experts this rank
        holds, and so change every dense weight initialised after them.
        """
        std = self.config.initializer_range
        if isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, nn.Linear) and getattr(module.weight, "allreduce", True) is False:
            return
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)

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
                module.mlp.init_expert_weights(self.config.initializer_range, seed=module.layer_idx)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained``, then re-tag the expert parameters for DeepSpeed.

        Loading replaces parameter objects, which drops the ``allreduce=False`` and
        ``group_name`` attributes by which DeepSpeed recognises expert parameters
        (``deepspeed.moe.utils.is_moe_param``); without them DeepSpeed would treat
        experts as dense parameters.
        """
        result = super().from_pretrained(*args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result  # output_loading_info=True
        for module in model.modules():
            if isinstance(module, HeteroExperts):
                module.tag_expert_parameters()
        return result


class HMoEModel(HMoEPreTrainedModel):
    """Token embeddings, the blocks and the final norm; no LM head."""

    def __init__(self, config: HMoEConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # HF's activation_checkpointing_enable() sets both attributes; the default matches its default.
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> HMoEModelOutput:
        """``input_ids`` [B, T]; ``attention_mask`` [B, T] with 1 for tokens and 0 for padding (optional).

        Packed training blocks need no mask. With padding, pad tokens are still
        routed by the MoE layers (they count in the aux losses and routing stats).
        """
        T = input_ids.shape[1]
        x_BTD = self.embed_tokens(input_ids)
        mask_B1TT = None
        # An all-ones mask (as HF collators send) keeps the fused is_causal path.
        if attention_mask is not None and not bool(attention_mask.all()):
            causal_TT = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            # A padded query sees no key at all; letting it see itself avoids NaN rows (its output is unused).
            mask_B1TT = (causal_TT & attention_mask.bool()[:, None, None, :]) | torch.eye(
                T, dtype=torch.bool, device=input_ids.device)
        # Rotary scores depend only on relative offsets, so left padding needs no per-row position shift.
        cos_TK, sin_TK = rotary_cos_sin(T, self.config.head_dim, self.config.rope_theta, x_BTD)

        aux_loss = torch.zeros((), device=x_BTD.device)
        routing_stats: list[RoutingStats] = []
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                x_BTD, l_aux = self._gradient_checkpointing_func(block.__call__, x_BTD, cos_TK, sin_TK, mask_B1TT)
            else:
                x_BTD, l_aux = block(x_BTD, cos_TK, sin_TK, mask_B1TT)
            if block.is_moe:
                aux_loss = aux_loss + l_aux
                routing_stats.append(block.mlp.last_stats)
        return HMoEModelOutput(last_hidden_state=self.norm(x_BTD), aux_loss=aux_loss, routing_stats=routing_stats)


class HMoEForCausalLM(HMoEPreTrainedModel, GenerationMixin):
    """:class:`HMoEModel` plus an LM head (tied to the embeddings if ``tie_word_embeddings``)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HMoEConfig) -> None:
        super().__init__(config)
        self.model = HMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, return_dict: bool | None = None,
                **unused: Any) -> HMoECausalLMOutput | tuple:
        """Logits [B, T, V] and, with ``labels`` [B, T], the training loss.

        Labels are shifted inside (position t predicts labels[t + 1]) as in HF;
        -100 marks positions to ignore. ``loss`` = ``lm_loss`` + ``aux_loss``.
        Other HF keyword arguments (e.g. ``use_cache``) are accepted and ignored.
        """
        out = self.model(input_ids, attention_mask)
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
                                    aux_losses=aux_losses, routing_stats=out.routing_stats)
        return result if return_dict is not False else result.to_tuple()

    # ---- generation without a KV cache: every step re-reads the whole sequence.

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # GenerationMixin then allocates no cache object

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **unused: Any) -> dict[str, Any]:
        # Never slice to the last token (HF does that when it believes a cache holds the prefix).
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def moe_layers(self) -> list[tuple[int, moe_layer.HMoE]]:
        """``(layer index, HMoE layer)`` for every MoE block, in layer order."""
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
                 + num_moe * (experts_per_layer + router_param_count(d, moe.num_experts)))
        expert = num_moe * experts_per_layer
    rates = [_uniform_selection_rate(moe)] * moe.num_experts
    activated = total - expert + num_moe * expected_activated_expert_params(d, moe.expert_sizes, rates,
                                                                             moe.activation.gated)
    return {"total_params": total, "expert_params": expert, "non_expert_params": total - expert,
            "activated_params_per_token": float(activated)}


AutoConfig.register(HMoEConfig.model_type, HMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(HMoEConfig, HMoEForCausalLM, exist_ok=True)
