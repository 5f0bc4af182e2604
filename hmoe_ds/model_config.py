"""The training model's configuration: :class:`HMoEConfig`, and what is computed from a config alone.

Apart from :mod:`hmoe_ds.modeling` (which builds the model and re-exports
everything here) so that reading and validating an experiment needs only
``transformers``' configuration classes, not its modeling stack: a run with a
bad ``model:`` section is refused before the ranks import the model code
(about 3 s of CPU per rank).

* :class:`HMoEConfig` - the standalone config (:mod:`hmoe_ds.hf.configuration_hmoe`)
  with ``moe`` validated as :class:`~hmoe_ds.config.HMoELayerConfig` and
  per-layer expert placements.
* :func:`debug_config` - the tiny model of the tests and smoke runs.
* :func:`largest_layer_params_per_rank` - ZeRO-3 sizing from a config.
"""

from __future__ import annotations

from typing import Any

from hmoe_ds.config import HMoELayerConfig
from hmoe_ds.hf import configuration_hmoe
from hmoe_ds.sizes import expert_param_count, router_param_count

__all__ = ["HMoEConfig", "debug_config", "dense_branch_params", "largest_layer_params_per_rank"]


class HMoEConfig(configuration_hmoe.HMoEConfig):
    """Configuration of an :class:`HMoEForCausalLM`: the standalone config's fields, ``moe`` fully validated.

    ``moe`` is a dict of :class:`HMoELayerConfig` fields, stored fully expanded
    (every field, enums as strings) so ``config.json`` is explicit. See
    :class:`hmoe_ds.hf.configuration_hmoe.HMoEConfig` for the other fields.
    ``expert_placements``, when given, holds one explicit layout
    (``rank_experts``) per MoE layer, in layer order, and overrides
    ``moe.placement`` layer by layer: it is what ``moe.placement: measured``
    resolves to from a run's measured load (:mod:`hmoe_ds.training.replacement`).
    """

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.expert_placements is not None:
            self._check_expert_placements()

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

    def _normalize_moe(self, moe: dict[str, Any]) -> dict[str, Any]:
        try:
            return HMoELayerConfig.from_dict(moe).to_dict()
        except (ValueError, TypeError) as err:
            raise ValueError(f"moe: {err}") from err

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


def largest_layer_params_per_rank(config: HMoEConfig) -> int:
    """Parameters of the largest decoder layer as one rank gathers it under ZeRO-3.

    Attention, norms, and the FFN: a dense SwiGLU, or a MoE layer's router,
    shared expert and its experts divided by ``ep_size`` (each rank gathers only
    its local experts, over the expert-data-parallel group). The experts' split
    is the even one (``ceil``); placements put unequal experts on a rank, so
    this is an estimate within one expert, for sizing ZeRO-3's
    ``stage3_max_live_parameters`` (:func:`hmoe_ds.training.experiment.fill_model_autos`).
    """
    d, moe = config.hidden_size, config.moe_layer_config()
    kv_dim = config.num_key_value_heads * config.head_dim
    attention = 2 * d * d + 2 * d * kv_dim + 2 * d
    experts = sum(expert_param_count(d, h, moe.activation.gated) for h in moe.expert_sizes)
    moe_layer = (-(-experts // moe.ep_size) + router_param_count(d, moe.num_experts) + dense_branch_params(d, moe))
    dense = 3 * d * config.dense_intermediate_size
    ffns = [moe_layer if config.is_moe_layer(i) else dense for i in range(config.num_hidden_layers)]
    return attention + max(ffns)


def dense_branch_params(d: int, moe: HMoELayerConfig) -> int:
    """A MoE layer's shared expert (``shared_expert_size``) and Residual-MoE coefficient: active for every token."""
    if not moe.shared_expert_size:
        return 0
    return expert_param_count(d, moe.shared_expert_size, moe.activation.gated) + (2 * d + 2 if moe.use_residual else 0)
