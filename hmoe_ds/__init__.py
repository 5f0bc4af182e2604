"""hmoe-ds: Heterogeneous Mixture-of-Experts (HMoE) language models on DeepSpeed.

Public API::

    from hmoe_ds import HMoE, HMoELayerConfig, build_moe_layer, RoutingStats
    from hmoe_ds import sizes          # expert-size distributions and parameter accounting

The model (``hmoe_ds.modeling``), data (``hmoe_ds.data``) and training
(``hmoe_ds.training``) packages are imported on demand.
"""

from .config import ExpertActivation, HMoELayerConfig, PlacementStrategy, RoutingMethod, SizeNormalization
from .layer import HMoE, HMoEBlock, RoutingStats, build_moe_layer
from .placement import ExpertPlacement, balanced_placement, contiguous_placement

__version__ = "0.1.0"

__all__ = [
    "HMoE",
    "HMoEBlock",
    "HMoELayerConfig",
    "RoutingStats",
    "RoutingMethod",
    "ExpertActivation",
    "SizeNormalization",
    "PlacementStrategy",
    "ExpertPlacement",
    "balanced_placement",
    "contiguous_placement",
    "build_moe_layer",
]
