"""``placement: measured``: re-place experts over EP ranks from the load a run measured, at a checkpoint boundary.

The static placements decide from sizes alone (``balanced`` assumes uniform
routing), but the router a run learns is far from uniform: P-Penalty (HMoE
Eq. 4) sends more tokens to the small experts, so the work of a rank,
``sum_i h_i * s_i`` over its experts (:func:`hmoe_ds.placement.work_imbalance`),
is not what the static layout balanced. With ``model.moe.placement:
measured`` every (re)start from a checkpoint re-places each MoE layer from the
token shares the run logged up to that checkpoint:

1. rank 0 reads ``moe/layer_<l>/expert_<i>_token_fraction`` from the run's
   ``metrics.jsonl`` (the last :data:`MEASURED_WINDOW` log points at or before
   the checkpoint's step; the trainer logs them every ``run.log_every`` steps,
   summed over every micro-batch and rank) and balances ``h_i * s_i`` per layer
   (:func:`hmoe_ds.placement.measured_placement`);
2. the layouts go to every rank (so nodes without a shared file system agree)
   as the model's ``expert_placements``, and the model is built with them;
3. the checkpoint no longer matches the layout, so the trainer resumes
   *elastically*: every rank reads the logical expert slices it now owns,
   weights and Adam moments, from the checkpoint's logical shards
   (:func:`hmoe_ds.shards.load_sharded_state`), whatever rank wrote them. The
   math does not change, only where each expert lives.

A fresh run (no checkpoint, or no routing logged yet) starts ``balanced``.
Re-placing every K steps without a restart is not implemented.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

from .experiment import Experiment

__all__ = ["MEASURED_WINDOW", "logged_token_shares", "measured_placement_experiment"]

#: Log points averaged for the measured shares: recent routing, smoothed over a few windows.
MEASURED_WINDOW = 5

_FRACTION = re.compile(r"^moe/layer_(\d+)/expert_(\d+)_token_fraction$")


def logged_token_shares(metrics: Path, up_to_step: int | None = None,
                        window: int = MEASURED_WINDOW) -> list[list[float]] | None:
    """Mean per-expert token shares of every MoE layer over the last ``window`` log points (``<= up_to_step``).

    ``metrics`` is a run's ``metrics.jsonl``. Returns ``shares[layer][expert]``
    (MoE layers in order, as the metrics number them), or ``None`` when the
    file holds no routing record.
    """
    from .metrics import read_jsonl

    if not Path(metrics).is_file():
        return None
    records = [r for r in read_jsonl(metrics)
               if any(_FRACTION.match(k) for k in r) and (up_to_step is None or int(r.get("step", 0)) <= up_to_step)]
    if not records:
        return None
    records = records[-window:]
    sums: dict[tuple[int, int], float] = {}
    for record in records:
        for key, value in record.items():
            match = _FRACTION.match(key)
            if match and value is not None:
                at = (int(match.group(1)), int(match.group(2)))
                sums[at] = sums.get(at, 0.0) + float(value)
    layers = 1 + max(layer for layer, _ in sums)
    experts = 1 + max(expert for _, expert in sums)
    return [[sums.get((layer, e), 0.0) / len(records) for e in range(experts)] for layer in range(layers)]


def measured_placement_experiment(exp: Experiment, tag: str | None, checkpoints: str = "checkpoints") -> Experiment:
    """``exp`` with ``model.expert_placements`` resolved from measured load when ``model.moe.placement: measured``.

    Called on rank 0 (the trainer broadcasts the result) once the checkpoint
    ``tag`` to resume from is known, before the model is built. Any other
    placement returns ``exp`` unchanged. Without a checkpoint or logged
    routing the layouts are dropped (``measured`` is then ``balanced``).
    Prints, per layer, the work imbalance the static balanced layout would
    have on the measured load and the measured layout's.
    """
    from hmoe_ds.checkpoint import read_marker
    from hmoe_ds.placement import balanced_placement, measured_placement, work_imbalance

    moe = exp.model.get("moe") or {}
    if str(moe.get("placement", "contiguous")) != "measured":
        return exp
    out = copy.deepcopy(exp)
    out.model["expert_placements"] = None
    if tag is None:
        return out
    step = int(read_marker(exp.output_dir / checkpoints / tag)["step"])
    shares = logged_token_shares(exp.output_dir / "metrics.jsonl", step)
    config = out.model_config(tokenizer_vocab_size=1)  # sizes, EP size and MoE layers; the vocabulary is irrelevant
    layer_config = config.moe_layer_config()
    sizes, ep_size, count = layer_config.expert_sizes, layer_config.ep_size, len(config.moe_layer_indices())
    if shares is None or len(shares) != count or any(len(s) != len(sizes) for s in shares):
        print(f"warning: placement: measured: {exp.output_dir / 'metrics.jsonl'} holds no routing of this model "
              f"up to step {step}; experts placed by size (balanced)", file=sys.stderr, flush=True)
        return out
    layouts = [measured_placement(sizes, ep_size, layer_shares) for layer_shares in shares]
    out.model["expert_placements"] = [[list(rank) for rank in p.rank_experts] for p in layouts]
    static = balanced_placement(sizes, ep_size)
    report = ", ".join(f"layer {i}: {work_imbalance(static, sizes, s):.3f} -> {work_imbalance(p, sizes, s):.3f}"
                       for i, (p, s) in enumerate(zip(layouts, shares)))
    print(f"placement: measured: experts re-placed from the token shares logged up to step {step} "
          f"(work imbalance max/mean over {ep_size} EP ranks, balanced -> measured: {report})", flush=True)
    return out
