"""hmoe-ds: Heterogeneous Mixture-of-Experts (HMoE) language models on DeepSpeed.

Public API::

    from hmoe_ds import HMoE, HMoELayerConfig, build_moe_layer, RoutingStats, collect_routing_stats
    from hmoe_ds import sizes          # expert-size distributions and parameter accounting

Names are imported lazily (PEP 562): ``import hmoe_ds.sizes`` or
``hmoe_ds.env`` does not import DeepSpeed, whose accelerator is chosen at
import time and must be configured first (:func:`hmoe_ds.env.configure_environment`).
The model (``hmoe_ds.modeling``), data (``hmoe_ds.data``) and training
(``hmoe_ds.training``) packages are imported on demand.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "HMoE": "layer",
    "HMoEBlock": "layer",
    "RoutingStats": "moe_core",
    "MoELayer": "moe_core",
    "collect_routing_stats": "moe_core",
    "build_moe_layer": "layer",
    "HMoELayerConfig": "config",
    "RoutingMethod": "config",
    "ExpertActivation": "config",
    "SizeNormalization": "config",
    "PlacementStrategy": "config",
    "MoEFrontend": "config",
    "ExpertPlacement": "placement",
    "balanced_placement": "placement",
    "contiguous_placement": "placement",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'hmoe_ds' has no attribute {name!r}")


if TYPE_CHECKING:  # for type checkers and IDEs
    from .config import (ExpertActivation, HMoELayerConfig, MoEFrontend, PlacementStrategy, RoutingMethod,
                         SizeNormalization)
    from .layer import HMoE, HMoEBlock, build_moe_layer
    from .moe_core import MoELayer, RoutingStats, collect_routing_stats
    from .placement import ExpertPlacement, balanced_placement, contiguous_placement
