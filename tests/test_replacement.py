"""Placement from measured load (``placement: measured``): the math, the shares read back, and a real re-placement.

The end-to-end test re-places the experts of a 2-rank EP 2 run at a checkpoint
boundary through ``run/train.py`` (``tests/launcher.py``) and checks that the
step after the re-placement gives the loss the uninterrupted run gave.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from hmoe_ds.config import HMoELayerConfig, PlacementStrategy
from hmoe_ds.placement import (
    ExpertPlacement,
    balanced_placement,
    contiguous_placement,
    expert_work,
    make_placement,
    measured_placement,
    work_imbalance,
)
from hmoe_ds.training.replacement import MEASURED_WINDOW, logged_token_shares

from . import launcher as L

QUICKSTART = [144, 176, 208, 240, 272, 304, 336, 368]
# Small experts get more tokens, as P-Penalty makes them (shape of the quickstart's measured shares).
SKEWED = [0.20, 0.17, 0.15, 0.13, 0.11, 0.10, 0.08, 0.06]


def test_work_imbalance_is_max_over_mean_of_size_times_share() -> None:
    placement = ExpertPlacement(((0, 1), (2, 3)))
    sizes, shares = [1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1]
    assert expert_work(sizes, shares) == pytest.approx([0.4, 0.6, 0.6, 0.4])
    assert work_imbalance(placement, sizes, shares) == pytest.approx(1.0)
    assert work_imbalance(placement, sizes) == pytest.approx(7 / 5)  # uniform shares: sizes 3 vs 7
    assert work_imbalance(contiguous_placement(4, 4), sizes, shares) == pytest.approx(0.6 / 0.5)


@pytest.mark.parametrize("ep_size", [2, 4])
def test_measured_beats_the_size_balanced_layout_on_skewed_routing(ep_size: int) -> None:
    static = balanced_placement(QUICKSTART, ep_size)
    measured = measured_placement(QUICKSTART, ep_size, SKEWED)
    assert measured != static
    assert work_imbalance(measured, QUICKSTART, SKEWED) < work_imbalance(static, QUICKSTART, SKEWED) - 0.005
    assert work_imbalance(measured, QUICKSTART, SKEWED) < 1.04
    # make_placement: measured with shares is this layout; without any (nothing logged yet) it is balanced.
    assert make_placement("measured", QUICKSTART, ep_size, SKEWED) == measured
    assert make_placement(PlacementStrategy.MEASURED, QUICKSTART, ep_size) == static


@pytest.mark.parametrize("ep_size", [2, 4])
def test_measured_finds_the_best_split_of_a_few_experts(ep_size: int) -> None:
    """8 experts: every split into equal groups is tried (35 at EP 2, 105 at EP 4); none is better."""
    import itertools

    def splits(items: list[int], size: int):
        if not items:
            yield []
            return
        for others in itertools.combinations(items[1:], size - 1):
            left = [e for e in items[1:] if e not in others]
            for rest in splits(left, size):
                yield [(items[0], *others), *rest]

    for shares in (SKEWED, (0.05, 0.3, 0.1, 0.05, 0.2, 0.1, 0.1, 0.1)):
        best = min(work_imbalance(ExpertPlacement(tuple(s)), QUICKSTART, shares)
                   for s in splits(list(range(8)), 8 // ep_size))
        measured = measured_placement(QUICKSTART, ep_size, shares)
        assert work_imbalance(measured, QUICKSTART, shares) == pytest.approx(best, rel=1e-12)
        assert work_imbalance(measured, QUICKSTART, shares) <= work_imbalance(
            balanced_placement(QUICKSTART, ep_size, shares), QUICKSTART, shares)


def test_an_explicit_layout_is_a_placement_and_must_fit() -> None:
    config = HMoELayerConfig(expert_sizes=[1, 2, 3, 4], ep_size=2, placement={"rank_experts": [[0, 3], [1, 2]]})
    assert config.placement == ExpertPlacement(((0, 3), (1, 2)))
    assert HMoELayerConfig.from_dict(config.to_dict()) == config
    assert make_placement(config.placement, config.expert_sizes, 2) is config.placement
    with pytest.raises(ValueError, match="ep_size=4"):
        HMoELayerConfig(expert_sizes=[1, 2, 3, 4], ep_size=4, placement={"rank_experts": [[0, 3], [1, 2]]})
    with pytest.raises(ValueError, match="non-negative"):
        measured_placement([1, 2], 1, [0.5, -0.1])


def test_per_layer_layouts_reach_the_layers_and_not_the_logical_model() -> None:
    from hmoe_ds.modeling import HMoEForCausalLM, debug_config, logical_config
    from hmoe_ds.naming import expected_moe_layer_records

    config = debug_config(moe={"placement": "measured"}, expert_placements=[[[0, 1, 2, 3]], [[3, 2, 1, 0]]])
    model = HMoEForCausalLM(config)
    assert [layer.placement.rank_experts for _, layer in model.moe_layers()] == [((0, 1, 2, 3),), ((3, 2, 1, 0),)]
    assert [r["placement"]["rank_experts"] for r in expected_moe_layer_records(config)] == [[[0, 1, 2, 3]],
                                                                                          [[3, 2, 1, 0]]]
    assert logical_config(config).expert_placements is None
    with pytest.raises(ValueError, match="one layout per MoE layer"):
        debug_config(expert_placements=[[[0, 1, 2, 3]]])


def test_logged_token_shares_average_the_last_log_points_up_to_the_checkpoint(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    lines = []
    for step in range(1, 9):
        record = {"step": step, "train/lm_loss": 1.0}
        for layer in range(2):
            for expert in range(2):
                record[f"moe/layer_{layer}/expert_{expert}_token_fraction"] = (step if expert == 0 else 100 - step) / 100
        lines.append(json.dumps(record))
        lines.append(json.dumps({"step": step, "val/loss": 2.0}))  # evaluation records carry no routing
    metrics.write_text("\n".join(lines) + "\n")
    shares = logged_token_shares(metrics, up_to_step=7)
    steps = range(7 - MEASURED_WINDOW + 1, 8)
    expected0 = sum(steps) / len(steps) / 100
    assert shares == [[pytest.approx(expected0), pytest.approx(1 - expected0)]] * 2
    assert logged_token_shares(tmp_path / "missing.jsonl") is None


# --------------------------------------------------------------------------- a real re-placement


def _marker_layouts(run: Path, step: int) -> list:
    from hmoe_ds.checkpoint import read_marker

    marker = read_marker(run / "checkpoints" / f"step_{step}")
    return [layer["placement"]["rank_experts"] for layer in marker["moe_layers"]]


@pytest.mark.slow
@pytest.mark.distributed
def test_replacement_at_a_checkpoint_keeps_the_next_step_loss(tmp_path: Path, data_cache) -> None:
    """EP 2, ``placement: measured``: the run starts size-balanced; resumed at step 2 it is re-placed from the
    shares logged at steps 1-2, and its losses at steps 3 (weights moved) and 4 (the Adam moments moved with
    them made step 3's update) equal the uninterrupted run's (1e-6)."""
    exp = copy.deepcopy(L.EXPERIMENT)
    # Pairs of equal sizes: the size-balanced layout breaks their ties by index, measured shares by load, so
    # even the nearly uniform routing of two steps moves experts.
    exp["model"]["moe"].update(expert_sizes=[32, 32, 64, 64, 96, 96, 128, 128], ep_size=2, placement="measured")
    exp["run"].update(train_steps=4, log_every=1, eval_every=0, eval_at_start=False, save_every=2)
    ref = tmp_path / "ref"
    proc = L.train(ref, experiment=exp, ranks=2, cache=data_cache)
    assert proc.returncode == 0, L.output(proc)

    moved = tmp_path / "moved"
    shutil.copytree(ref / "out", moved / "out", ignore=shutil.ignore_patterns("step_4"))
    (moved / "out" / "checkpoints" / "latest").write_text("step_2")
    proc = L.train(moved, "--resume", experiment=exp, ranks=2, cache=data_cache)
    assert proc.returncode == 0, L.output(proc)
    assert "placement: measured: experts re-placed" in proc.stdout, proc.stdout[-3000:]
    assert "elastic resume" in proc.stderr, proc.stderr[-3000:]

    before, after = _marker_layouts(ref / "out", 2), _marker_layouts(moved / "out", 4)
    static = [[list(r) for r in balanced_placement(exp["model"]["moe"]["expert_sizes"], 2).rank_experts]] * 2
    assert before == static  # nothing measured yet at the start: size-balanced
    assert after != before, "the measured shares did not move any expert; the test would prove nothing"

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["train/lm_loss"] for r in L.read_metrics(run / "out") if "train/lm_loss" in r}

    expected, got = losses(ref), losses(moved)
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), (step, got, expected)
