"""The ZeRO-3 front-end as DeepSpeed's engine sees it, and the layer protocol both front-ends satisfy."""

from __future__ import annotations

import inspect
import re

import torch

from .distributed import run_distributed

SIZES = [16, 24, 32, 40]
D = 8


def test_every_engine_attribute_is_still_read_by_deepspeeds_engine():
    """ENGINE_ATTRIBUTES names what the engine does with each attribute: each must still be read there."""
    import deepspeed.runtime.engine as engine

    from hmoe_ds.layer_autoep import ENGINE_ATTRIBUTES

    source = inspect.getsource(engine)
    for attribute, purpose in ENGINE_ATTRIBUTES.items():
        assert re.search(rf"\bmodule\.{attribute}\b", source), f"the engine no longer reads module.{attribute}"
        for function in re.findall(r"\b(_?[a-z_]+)(?= ?[:/])", purpose):
            if function.startswith("_") or function.startswith("load_"):
                assert f"def {function}(" in source, f"{attribute}: the engine has no {function} any more"


def _build_both_frontends(rank: int, world_size: int) -> dict:
    from hmoe_ds import HMoELayerConfig, MoELayer, build_moe_layer
    from hmoe_ds.layer_autoep import ENGINE_ATTRIBUTES, HMoEAutoEP

    autoep = build_moe_layer(D, HMoELayerConfig(expert_sizes=SIZES, ep_size=world_size, frontend="autoep"))
    moe = build_moe_layer(D, HMoELayerConfig(expert_sizes=SIZES, ep_size=world_size))
    assert isinstance(autoep, HMoEAutoEP)
    out = {"missing": [a for a in ENGINE_ATTRIBUTES if not hasattr(autoep, a)]}
    for layer, name in ((autoep, "autoep"), (moe, "moe")):
        core = layer.moe_core
        out[name] = {
            "protocol": isinstance(layer, MoELayer),
            "logical_experts": layer.config.num_experts,
            "local": list(core.local_expert_ids),
            "sizes": layer.expert_sizes,
            "placement_ranks": layer.placement.ep_size,
        }
    out["autoep"]["deepspeed_num_experts"] = autoep.num_experts  # packs, one per EP rank
    out["autoep"]["num_local_experts"] = autoep.num_local_experts
    x = torch.randn(5, D)
    for layer, name in ((autoep, "autoep"), (moe, "moe")):
        y, l_aux, counts = layer(x)
        out[name]["shapes"] = (tuple(y.shape), tuple(l_aux.shape), tuple(counts.shape))
    return out


def test_both_frontends_satisfy_the_layer_protocol_and_autoep_sets_what_the_engine_reads():
    for rank, result in enumerate(run_distributed(_build_both_frontends, world_size=2)):
        assert result["missing"] == []
        for name in ("autoep", "moe"):
            r = result[name]
            assert r["protocol"] and r["logical_experts"] == len(SIZES) and r["sizes"] == SIZES
            assert r["placement_ranks"] == 2 and len(r["local"]) == 2
            assert r["shapes"] == ((5, D), (), (len(SIZES),))
        # DeepSpeed counts packs (one per EP rank); hmoe-ds code reads config.num_experts.
        assert result["autoep"]["deepspeed_num_experts"] == 2 and result["autoep"]["num_local_experts"] == 1
        assert result["autoep"]["local"] == result["moe"]["local"]
