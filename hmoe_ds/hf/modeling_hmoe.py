"""The HMoE causal LM, standalone: imports only ``torch``, ``transformers`` and the standard library.

The HMoE paper (Wang et al., arXiv 2408.10681) trains LLaMA decoders whose FFN
blocks are heterogeneous MoE layers: experts of unequal width, Top-K (Eq. 8)
or Top-P (Eq. 9-11) routing. This file is that model for inference and
fine-tuning without DeepSpeed. It is copied verbatim next to every export's
weights by ``run/export.py`` (``auto_map`` in ``config.json`` points here), so

    AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)

works where only torch, transformers and safetensors are installed.

**One source of truth.** hmoe-ds's training model (:mod:`hmoe_ds.modeling`)
subclasses the classes here and replaces only the MoE layer (by DeepSpeed's,
:class:`hmoe_ds.HMoE`); embeddings, RMSNorm, rotary attention, the dense SwiGLU,
the residual wiring, masks and the KV cache are this code. The MoE block here
(:class:`HMoESparseMoeBlock`) computes the same function as the training layer
(full fp32 softmax router, the same Top-K / Top-P selection and gate
renormalisation, the same capacity rule, gate-weighted sum in fp32), one
expert at a time; ``tests/test_hf_model.py`` checks logits and loss against
the training model on the same weights.

Weight names follow Hugging Face's Mixtral: ``model.layers.{l}.block_sparse_moe.gate.weight``
(router [E, D]) and ``model.layers.{l}.block_sparse_moe.experts.{i}.w1/w2/w3.weight``
(w1: gate projection [h_i, D], w3: up projection [h_i, D], w2: down projection
[D, h_i]; w3 only for gated activations); dense layers and attention use
LLaMA's names. What differs from Mixtral: expert i has its own width h_i
(``config.moe["expert_sizes"]``), and Top-P routing picks a variable number
of experts per token.

Not reproduced here (training-time only): router jitter, the auxiliary losses
and expert parallelism. ``output_router_logits=True`` returns the router
logits of every MoE layer for users who want their own balancing loss.

Shape suffixes: B batch, T new tokens, S key positions (cached + new), D
hidden_size, H attention heads, G key/value heads, K head dim, E experts,
V vocab size.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from .configuration_hmoe import HMoEConfig

__all__ = [
    "Attention",
    "HMoEConfig",
    "HMoEDecoderLayer",
    "HMoEExpert",
    "HMoEForCausalLM",
    "HMoEModel",
    "HMoEPreTrainedModel",
    "HMoESparseMoeBlock",
    "RMSNorm",
    "SwiGLU",
    "apply_rotary",
    "attention_mask_4d",
    "rotary_cos_sin",
    "top_k_mask",
    "top_p_mask",
]


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


def rotary_cos_sin(start: int, seq_len: int, head_dim: int, theta: float,
                   like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, K] of rotary embeddings for positions start..start+T-1 (rotate-half layout, as HF LLaMA).

    Computed on the fly rather than cached in a buffer: it is cheap, and
    ``from_pretrained`` builds models on the meta device, where an unsaved buffer
    would have to be re-created by hand. With a KV cache, ``start`` is the
    number of cached positions.
    """
    inv_freq_K2 = theta ** -(torch.arange(0, head_dim, 2, device=like.device, dtype=torch.float32) / head_dim)
    positions_T = torch.arange(start, start + seq_len, device=like.device, dtype=torch.float32)
    angles_TK2 = positions_T[:, None] * inv_freq_K2
    angles_TK = torch.cat((angles_TK2, angles_TK2), dim=-1)
    return angles_TK.cos().to(like.dtype), angles_TK.sin().to(like.dtype)


def apply_rotary(x_BHTK: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor) -> torch.Tensor:
    x1_BHTK, x2_BHTK = x_BHTK.chunk(2, dim=-1)
    return x_BHTK * cos_TK + torch.cat((-x2_BHTK, x1_BHTK), dim=-1) * sin_TK


def attention_mask_4d(attention_mask: torch.Tensor | None, num_new: int, num_cached: int,
                      device: torch.device) -> torch.Tensor | None:
    """Boolean [B, 1, T, S] mask (True = may attend), or None when SDPA's own causal rule is exact.

    ``attention_mask`` [B, S] is HF's padding mask over cached + new positions
    (1 = token, 0 = padding). None is returned without padding when there is
    no cache (``is_causal``) or one new token (it sees every cached position).
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (num_cached == 0 or num_new == 1):
        return None
    S = num_cached + num_new
    query_pos_T1 = torch.arange(num_cached, S, device=device)[:, None]
    key_pos_1S = torch.arange(S, device=device)[None, :]
    mask_11TS = (key_pos_1S <= query_pos_T1)[None, None]
    if padded:
        mask_11TS = mask_11TS & attention_mask.bool()[:, None, None, -S:]
    # A padded query sees no key at all; letting it see itself avoids NaN rows (its output is unused).
    return mask_11TS | (key_pos_1S == query_pos_T1)[None, None]


class Attention(nn.Module):
    """Causal self-attention with rotary embeddings; grouped-query when G < H; an optional KV cache."""

    def __init__(self, config: HMoEConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor,
                mask_B1TS: torch.Tensor | None, cache: Cache | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTK = self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k_BGTK = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BGTK = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_BHTK, k_BGTK = apply_rotary(q_BHTK, cos_TK, sin_TK), apply_rotary(k_BGTK, cos_TK, sin_TK)
        if cache is not None:  # keys/values of every position so far, [B, G, S, K]
            k_BGTK, v_BGTK = cache.update(k_BGTK, v_BGTK, self.layer_idx)
        # Without a mask, is_causal lets SDPA pick its fused (flash) kernels; it is exact only when T == S.
        y_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BGTK, v_BGTK, attn_mask=mask_B1TS,
                                                is_causal=mask_B1TS is None and T == k_BGTK.shape[2] and T > 1,
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


# --------------------------------------------------------------------------- the MoE block


def top_k_mask(probs_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k most probable experts per token (Eq. 8)."""
    _, idx_TK = torch.topk(probs_TE, k=k, dim=1)
    return torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(1, idx_TK, True)


def top_p_mask(probs_TE: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean mask of the Top-P set per token (Eq. 9): the shortest prefix by probability whose mass reaches p.

    Expert j (in descending-probability order) is kept iff the mass of the
    experts strictly before it is below p, so the crossing expert is included
    and the most probable expert always is. The running sum is in float64 so
    the decision does not depend on how the scan is computed; ``p >= 1`` keeps
    every expert.
    """
    if p >= 1.0:
        return torch.ones_like(probs_TE, dtype=torch.bool)
    sorted_TE, order_TE = torch.sort(probs_TE, dim=1, descending=True, stable=True)
    # float64: a float32 running sum rounds differently depending on how the scan is computed (sequentially,
    # or with a wider accumulator as torch's CPU cumsum does), which could flip a decision within an ulp of p.
    cumulative_TE = torch.cumsum(sorted_TE.double(), dim=1)
    # Shifted rather than ``cumsum - sorted``: the subtraction rounds differently from the running sum.
    mass_before_TE = torch.cat([torch.zeros_like(cumulative_TE[:, :1]), cumulative_TE[:, :-1]], dim=1)
    return torch.zeros_like(mass_before_TE, dtype=torch.bool).scatter_(1, order_TE, mass_before_TE < p)


class HMoEExpert(nn.Module):
    """One expert FFN of width h: ``w2(act(w1 x) * w3 x)`` (SwiGLU/GeGLU) or ``w2(act(w1 x))`` (GELU/ReLU)."""

    def __init__(self, hidden_size: int, ffn_size: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.w1 = nn.Linear(hidden_size, ffn_size, bias=False)
        self.w2 = nn.Linear(ffn_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, ffn_size, bias=False) if activation in ("swiglu", "geglu") else None

    def forward(self, x_RD: torch.Tensor) -> torch.Tensor:
        h_RH = self.w1(x_RD)
        h_RH = F.silu(h_RH) if self.activation == "swiglu" else F.relu(h_RH) if self.activation == "relu" \
            else F.gelu(h_RH)
        if self.w3 is not None:
            h_RH = h_RH * self.w3(x_RD)
        return self.w2(h_RH)


class HMoESparseMoeBlock(nn.Module):
    """Heterogeneous MoE FFN: router -> Top-K / Top-P -> unequal experts -> gate-weighted sum.

    ``out_t = sum_{e in E^t} g_{t,e} * expert_e(x_t)`` with ``P_t = softmax(W_r x_t)``
    in fp32 (Eq. 1), ``E^t`` the Top-K (Eq. 8) or Top-P (Eq. 9) set and ``g``
    the probabilities renormalised over ``E^t`` (Eq. 8, 11) unless
    ``renormalize_gates`` is false. With ``capacity_factor`` set, each expert
    keeps its first ``max(min_capacity, ceil(cf * assignments / E))``
    assignments in token order (the training layer's rule; it depends on the
    batch, so cached generation differs from a full recomputation there).
    """

    def __init__(self, config: HMoEConfig) -> None:
        super().__init__()
        moe = config.moe
        self.expert_sizes = list(moe["expert_sizes"])
        self.routing, self.top_k, self.top_p = moe["routing"], int(moe["top_k"]), float(moe["top_p"])
        self.renormalize_gates = bool(moe["renormalize_gates"])
        self.capacity_factor, self.eval_capacity_factor = moe["capacity_factor"], moe["eval_capacity_factor"]
        self.min_capacity = int(moe["min_capacity"])
        self.gate = nn.Linear(config.hidden_size, len(self.expert_sizes), bias=False)
        self.experts = nn.ModuleList(HMoEExpert(config.hidden_size, h, moe["activation"]) for h in self.expert_sizes)
        # An always-on shared expert (DeepSeekMoE), added; with use_residual, mixed by a learned per-token
        # two-way softmax (Residual MoE, as DeepSpeed's use_residual).
        shared = int(moe.get("shared_expert_size") or 0)
        self.shared_expert = HMoEExpert(config.hidden_size, shared, moe["activation"]) if shared else None
        self.residual_coefficient = nn.Linear(config.hidden_size, 2) if shared and moe.get("use_residual") else None

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(router logits [T, E] fp32, kept mask [T, E], gate weights [T, E] fp32)``."""
        # fp32 logits whatever the model dtype: softmax and Top-P sums need the precision.
        logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        probs_TE = torch.softmax(logits_TE, dim=1)
        with torch.no_grad():
            mask_TE = top_k_mask(probs_TE, self.top_k) if self.routing == "top_k" else top_p_mask(probs_TE, self.top_p)
        weights_TE = probs_TE * mask_TE
        if self.renormalize_gates:
            weights_TE = weights_TE / weights_TE.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights_TE.dtype).eps)
        factor = self.capacity_factor if self.training else (self.eval_capacity_factor or self.capacity_factor)
        if factor is not None:
            capacity = max(self.min_capacity, math.ceil(factor * int(mask_TE.sum()) / mask_TE.shape[1]))
            mask_TE = mask_TE & (torch.cumsum(mask_TE.to(torch.int32), dim=0) <= capacity)
        return logits_TE, mask_TE, weights_TE

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output [B, T, D], router logits [B*T, E])``."""
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        logits_TE, mask_TE, weights_TE = self.route(x_TD)
        out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        for e, expert in enumerate(self.experts):
            token_idx = mask_TE[:, e].nonzero().squeeze(1)
            if token_idx.numel():
                y_RD = expert(x_TD.index_select(0, token_idx))
                # Accumulated in fp32 so a token's sum over its experts is rounded once.
                out_TD.index_add_(0, token_idx, y_RD.float() * weights_TE[token_idx, e, None])
        out_BTD = out_TD.to(x_BTD.dtype).reshape(x_BTD.shape)
        if self.shared_expert is not None:
            shared_BTD = self.shared_expert(x_BTD)
            if self.residual_coefficient is None:
                out_BTD = out_BTD + shared_BTD
            else:
                coef_BT2 = torch.softmax(self.residual_coefficient(x_BTD), dim=-1)
                out_BTD = out_BTD * coef_BT2[..., 0:1] + shared_BTD * coef_BT2[..., 1:]
        return out_BTD, logits_TE


# --------------------------------------------------------------------------- decoder


class HMoEDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x)); ffn is SwiGLU (``mlp``) or MoE.

    The MoE layer is ``block_sparse_moe`` here; hmoe-ds's training model
    overrides :meth:`build_moe` and :meth:`moe_forward` to put DeepSpeed's
    layer there instead (as ``mlp``), and nothing else.
    """

    def __init__(self, config: HMoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_moe:
            self.build_moe(config)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.dense_intermediate_size)

    def build_moe(self, config: HMoEConfig) -> None:
        self.block_sparse_moe = HMoESparseMoeBlock(config)

    def moe_forward(self, h_BTD: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The MoE layer's output and what it reports per layer (router logits here)."""
        return self.block_sparse_moe(h_BTD)

    def forward(self, x_BTD: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor,
                mask_B1TS: torch.Tensor | None, cache: Cache | None = None) -> tuple[torch.Tensor, Any]:
        """The new hidden states and the MoE layer's report (None for a dense block)."""
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_TK, sin_TK, mask_B1TS, cache)
        h_BTD = self.post_attention_layernorm(x_BTD)
        if not self.is_moe:
            return x_BTD + self.mlp(h_BTD), None
        y_BTD, report = self.moe_forward(h_BTD)
        return x_BTD + y_BTD, report


class HMoEPreTrainedModel(PreTrainedModel):
    """HF plumbing shared by the models: config class, weight init, checkpointing, loading."""

    config_class = HMoEConfig
    config: HMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HMoEDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """normal(0, initializer_range) for matrices, ones for norms (HF's ``initialization`` skips loaded weights)."""
        if isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)


class HMoEModel(HMoEPreTrainedModel):
    """Token embeddings, the blocks and the final norm; no LM head."""

    decoder_layer_class: type[HMoEDecoderLayer] = HMoEDecoderLayer

    def __init__(self, config: HMoEConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.decoder_layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # HF's gradient_checkpointing_enable() sets both attributes; the default matches its default.
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        self.post_init()

    def run_layers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   cache: Cache | None = None) -> tuple[torch.Tensor, list[Any]]:
        """Final-norm hidden states [B, T, D] and the report of every MoE block, in layer order.

        ``input_ids`` [B, T] are the new tokens; ``attention_mask`` [B, S] has 1
        for tokens and 0 for padding over cached + new positions (optional);
        ``cache`` holds earlier positions' keys and values and is extended.
        Packed training blocks need no mask. With padding, pad tokens are still
        routed by the MoE layers. Rotary scores depend only on relative offsets,
        so left padding needs no per-row position shift.
        """
        T = input_ids.shape[1]
        num_cached = cache.get_seq_length() if cache is not None else 0
        x_BTD = self.embed_tokens(input_ids)
        mask_B1TS = attention_mask_4d(attention_mask, T, num_cached, input_ids.device)
        cos_TK, sin_TK = rotary_cos_sin(num_cached, T, self.config.head_dim, self.config.rope_theta, x_BTD)
        reports = []
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                x_BTD, report = self._gradient_checkpointing_func(block.__call__, x_BTD, cos_TK, sin_TK, mask_B1TS,
                                                                  cache)
            else:
                x_BTD, report = block(x_BTD, cos_TK, sin_TK, mask_B1TS, cache)
            if block.is_moe:
                reports.append(report)
        return self.norm(x_BTD), reports

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, use_cache: bool | None = None, output_router_logits: bool = False,
                **unused: Any) -> MoeModelOutputWithPast:
        """Hidden states; with ``use_cache`` a ``DynamicCache`` is created if none is passed and returned."""
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        hidden_BTD, router_logits = self.run_layers(input_ids, attention_mask, cache)
        return MoeModelOutputWithPast(last_hidden_state=hidden_BTD, cache=cache,
                                      router_logits=tuple(router_logits) if output_router_logits else None)


class HMoEForCausalLM(HMoEPreTrainedModel, GenerationMixin):
    """:class:`HMoEModel` plus an LM head (tied to the embeddings if ``tie_word_embeddings``).

    ``generate`` uses a KV cache (``DynamicCache``): each step runs only the new token.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    base_model_class: type[HMoEModel] = HMoEModel

    def __init__(self, config: HMoEConfig) -> None:
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: Cache | None = None, use_cache: bool | None = None,
                output_router_logits: bool = False, return_dict: bool | None = None,
                **unused: Any) -> MoeCausalLMOutputWithPast | tuple:
        """Logits [B, T, V] and, with ``labels`` [B, T], the LM loss.

        Labels are shifted inside (position t predicts labels[t + 1]) as in HF;
        -100 marks positions to ignore. Other HF keyword arguments are accepted
        and ignored.
        """
        out = self.model(input_ids, attention_mask, cache=cache, use_cache=use_cache,
                         output_router_logits=output_router_logits)
        logits_BTV = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        result = MoeCausalLMOutputWithPast(loss=loss, logits=logits_BTV, cache=out.cache,
                                           router_logits=out.router_logits)
        return result if return_dict is not False else result.to_tuple()
