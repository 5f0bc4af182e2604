"""Configuration of the HMoE causal LM, standalone: imports only ``transformers`` and the standard library.

This file is copied verbatim next to every export's weights (``run/export.py``),
with ``auto_map`` in ``config.json`` pointing at it, so an export loads with
``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` where hmoe-ds and
DeepSpeed are not installed. Inside hmoe-ds, :class:`hmoe_ds.modeling.HMoEConfig`
subclasses this class and validates ``moe`` with the full training options
(:class:`hmoe_ds.config.HMoELayerConfig`); the fields here are the one definition.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

__all__ = ["DEFAULT_MOE", "HMoEConfig", "INFERENCE_MOE_DEFAULTS"]

# The paper's 0.4B HMoE (Wang et al., arXiv 2408.10681): 8 experts summing to 12,288 in its main (arithmetic)
# shape, 96 x {9, 11, ..., 23}; Top-P with p = 0.6, P-Penalty 0.1 (Eq. 4) and router entropy 3e-2 (Eq. 5).
DEFAULT_MOE: dict[str, Any] = {
    "expert_sizes": [864, 1056, 1248, 1440, 1632, 1824, 2016, 2208],
    "routing": "top_p",
    "top_p": 0.6,
    "p_penalty_coef": 0.1,
    "entropy_coef": 0.03,
}

#: The ``moe`` options the forward pass reads, with hmoe-ds's defaults. Training-only options
#: (loss coefficients, expert parallelism, placement, jitter) may be present and are ignored here.
INFERENCE_MOE_DEFAULTS: dict[str, Any] = {
    "routing": "top_p",
    "top_k": 2,
    "top_p": 0.6,
    "renormalize_gates": True,
    "activation": "swiglu",
    "capacity_factor": None,
    "eval_capacity_factor": None,
    "min_capacity": 4,
    "shared_expert_size": 0,
    "use_residual": False,
    "gate_convention": "hmoe",
    "top2_2nd_expert_sampling": False,
}
_ROUTINGS = ("top_k", "top_p")
_ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu")


def unsupported_at_inference(moe: dict[str, Any]) -> str | None:
    """Why this model cannot compute the layer ``moe`` describes at inference, or ``None``.

    A layer with DeepSpeed's gate conventions is the same function as HMoE's
    Top-K when nothing is dropped and no expert is sampled; with a capacity
    (DeepSpeed drops by random token selection or by priority) or a sampled
    second expert, inference is random or batch-dependent in a way this model
    does not reproduce.
    """
    if str(moe.get("gate_convention", "hmoe")) != "deepspeed":
        return None
    if moe.get("capacity_factor") is not None or moe.get("eval_capacity_factor") is not None:
        return ("gate_convention='deepspeed' with a capacity factor drops tokens by DeepSpeed's rules, which this "
                "model does not reproduce: train with drop_tokens=False (capacity_factor null) to export")
    if int(moe.get("top_k", 1)) == 2 and moe.get("top2_2nd_expert_sampling"):
        return ("gate_convention='deepspeed' with top2_2nd_expert_sampling draws the second expert at random at "
                "inference too: set top2_2nd_expert_sampling false to export")
    return None


class HMoEConfig(PretrainedConfig):
    """Configuration of an ``HMoEForCausalLM`` (defaults: the paper's 0.4B HMoE, Top-P).

    ``moe_layer_frequency`` n places MoE layers at indices i with (i + 1) % n == 0:
    1 makes every layer MoE, 2 makes layers 1, 3, 5, ... MoE (the first layer
    stays dense), and 0 gives a dense model with no MoE layer (the dense
    baseline). ``moe`` is a dict of MoE layer options shared by every MoE layer
    (``expert_sizes``, ``routing``, ``top_k``, ``top_p``, ``activation``, ...);
    it is ignored when ``moe_layer_frequency`` is 0. ``expert_placements`` (training
    only, ignored here) records which expert-parallel rank held which experts. ``num_key_value_heads``
    None means multi-head attention; fewer heads than ``num_attention_heads``
    gives grouped-query attention. ``dense_intermediate_size`` is the SwiGLU width
    of the layers that are not MoE. ``max_position_embeddings`` is recorded for
    HF tooling; rotary embeddings themselves have no length limit. The special
    token ids default to None: an export takes them from its tokenizer. Every
    error names the field and the allowed values.
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
    bos_token_id: int | None = None
    eos_token_id: int | None = None
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
            raise ValueError(f"moe={moe!r}: must be a dict of MoE layer options, e.g. {DEFAULT_MOE}")
        self.moe = self._normalize_moe(dict(moe))
        super().__post_init__(**kwargs)

    def _normalize_moe(self, moe: dict[str, Any]) -> dict[str, Any]:
        """The ``moe`` dict with the inference options checked and defaults filled in; other keys kept.

        :class:`hmoe_ds.modeling.HMoEConfig` overrides this with the full
        training validation, so inside hmoe-ds the stricter check applies.
        """
        moe = {**INFERENCE_MOE_DEFAULTS, **moe}
        sizes = moe.get("expert_sizes")
        if (not isinstance(sizes, (list, tuple)) or not sizes
                or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes)):
            raise ValueError(f"moe: expert_sizes={sizes!r}: need a non-empty list of positive ints")
        moe["expert_sizes"] = [int(s) for s in sizes]
        if moe["routing"] not in _ROUTINGS:
            raise ValueError(f"moe: routing={moe['routing']!r} is not supported; allowed values: {_ROUTINGS}")
        if moe["activation"] not in _ACTIVATIONS:
            raise ValueError(f"moe: activation={moe['activation']!r}; allowed values: {_ACTIVATIONS}")
        k = moe["top_k"]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(sizes):
            raise ValueError(f"moe: top_k={k!r}: must be an int with 1 <= top_k <= number of experts ({len(sizes)})")
        if not isinstance(moe["top_p"], (int, float)) or not 0.0 < float(moe["top_p"]) <= 1.0:
            raise ValueError(f"moe: top_p={moe['top_p']!r}: must be a number in (0, 1]")
        problem = unsupported_at_inference(moe)
        if problem:
            raise ValueError(f"moe: {problem}")
        return moe

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` (0-based) is an MoE layer: (i + 1) % moe_layer_frequency == 0."""
        n = self.moe_layer_frequency
        return n > 0 and (layer_idx + 1) % n == 0
