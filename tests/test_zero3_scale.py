"""ZeRO-3 at realistic sizes, one initial model for every layout, and elastic resume, through ``run/train.py``.

Every run here is the real main job started by the ``deepspeed`` launcher
(``tests/launcher.py``). The "realistic" model has expert packs, embeddings
and FFN matrices above DeepSpeed's parameter-persistence threshold (1e5
elements) and uses DeepSpeed's default ZeRO-3 buckets and prefetch, which is
what a tiny model never reaches.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest

from . import checkpoint_runs
from . import launcher as L
from .checkpoint_runs import Run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

#: 2 layers, D=128, 8 experts of 256..1152: packs of 2 x 1792 x 128 = 229k elements per EP rank at EP 2.
REALISTIC = copy.deepcopy(L.EXPERIMENT)
REALISTIC["model"].update(hidden_size=128, num_attention_heads=4, dense_intermediate_size=512)
REALISTIC["model"]["moe"].update(expert_sizes=[256, 384, 512, 640, 768, 896, 1024, 1152])
REALISTIC["data"].update(vocab_size=1024)
REALISTIC["run"].update(train_steps=3, log_every=1, eval_every=0, save_every=0)


def _experiment(base: dict, **moe) -> dict:
    exp = copy.deepcopy(base)
    exp["model"]["moe"].update(moe)
    return exp


def _ds(stage: int, ranks: int, offload: bool = False, global_micro_batches: int = 4) -> dict:
    ds = copy.deepcopy(L.DS_CONFIG)
    ds["zero_optimization"] = {"stage": stage}  # DeepSpeed's default buckets, prefetch and thresholds
    if offload:
        ds["zero_optimization"].update(offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
    ds["gradient_accumulation_steps"] = global_micro_batches // ranks  # the same global batch at any world size
    return ds


def _losses(out: Path, key: str = "train/lm_loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in L.read_metrics(out) if key in r}


def _train_ok(tmp: Path, *extra: str, **kwargs) -> Path:
    proc = L.train(tmp, *extra, **kwargs)
    assert proc.returncode == 0, L.output(proc)
    return tmp / "out"


def test_the_initial_model_does_not_depend_on_zero_stage_ep_size_or_placement(
        tmp_path: Path, zero2_ep2_run: Run, zero3_ep2_run: Run) -> None:
    """Same experiment and seed: identical step-1 loss under ZeRO-1 (1 rank), ZeRO-2 EP 2 and ZeRO-3 EP 2.

    The two EP 2 runs are the session's checkpoint references (2 ranks, balanced
    placement, a shared expert: a dense branch the two front-ends hold as the
    same replicated module); one more run trains the same experiment on 1 rank
    with EP 1. The global batch is the same 4 micro-batches everywhere, and the
    step-1 loss is computed before any update, so it measures the initial model
    alone. (The contiguous placement at EP 2 under ZeRO-3 gives ZeRO-1's loss at
    every step in ``test_zero3_at_realistic_sizes_trains_like_zero1``.)
    """
    exp = checkpoint_runs.experiment(ep_size=1, placement="contiguous")
    exp["run"].update(train_steps=1, save_every=0)
    runs = {
        "zero1_1rank": _train_ok(tmp_path, experiment=exp, ds=_ds(1, 1), ranks=1, cache=zero2_ep2_run.cache),
        "zero2_ep2_balanced": zero2_ep2_run.out,
        "zero3_ep2_balanced": zero3_ep2_run.out,
    }
    lm = {name: _losses(out)[1] for name, out in runs.items()}
    for value in lm.values():
        assert value == pytest.approx(lm["zero1_1rank"], rel=1e-6), lm
    # The aux losses are computed per micro-batch, and which sequences share a micro-batch depends on the number
    # of data-parallel ranks (the loader strides the global batch over them), so compare them at equal world size.
    for key in ("train/aux/p_penalty", "train/aux/entropy"):
        values = [_losses(runs[name], key)[1] for name in ("zero2_ep2_balanced", "zero3_ep2_balanced")]
        assert values[1] == pytest.approx(values[0], rel=1e-6), (key, values)


@pytest.mark.parametrize(
    "name,stage,ranks,moe,offload",
    [
        ("zero3_ep1_offload", 3, 2, {"ep_size": 1}, True),
        ("zero3_ep2xdp2_balanced_offload", 3, 4, {"ep_size": 2, "placement": "balanced"}, True),
        ("zero3_ep2xdp2_contiguous", 3, 4, {"ep_size": 2, "placement": "contiguous"}, False),
    ],
)
def test_zero3_at_realistic_sizes_trains_like_zero1(name: str, stage: int, ranks: int, moe: dict, offload: bool,
                                                    zero1_reference: dict[int, float],
                                                    tmp_path_factory: pytest.TempPathFactory, data_cache) -> None:
    """ZeRO-3 with DeepSpeed's default buckets, any placement, EP 1 and EP 2 x DP 2, +- offload: ZeRO-1's losses.

    Contiguous placement at EP 2 gives the two EP ranks packs of different real
    width (padded to one shape); before the padding, ZeRO-3's prefetch issued
    all-gathers of different sizes on the two ranks and gloo aborted with a
    collective mismatch on the first step. The EP 2 x DP 2 contiguous case
    holds that situation (each EP group's two ranks differ in width) and
    data parallelism over it; an EP-2-only 2-rank case added nothing to it.
    """
    reference = zero1_reference
    out = _train_ok(tmp_path_factory.mktemp(name), experiment=_experiment(REALISTIC, **moe),
                    ds=_ds(stage, ranks, offload), ranks=ranks, cache=data_cache, timeout=600)
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3]
    for step, value in reference.items():
        assert losses[step] == pytest.approx(value, rel=1e-5), (losses, reference)


@pytest.fixture(scope="module")
def zero1_reference(tmp_path_factory: pytest.TempPathFactory, data_cache) -> dict[int, float]:
    """The realistic-size experiment's step losses under ZeRO-1 on 2 ranks, DeepSpeed's defaults."""
    out = _train_ok(tmp_path_factory.mktemp("zero1_reference"), experiment=REALISTIC, ds=_ds(1, 2), ranks=2,
                    cache=data_cache, timeout=600)
    return _losses(out)


def test_elastic_resume_at_another_world_size_carries_the_optimizer_state(tmp_path: Path, data_cache) -> None:
    """2 ranks EP 2 (ZeRO-3) saved at step 2 -> resumed on 4 ranks EP 2 x DP 2, then that run's step 4 -> 2 ranks.

    Aux-loss coefficients are 0, so the gradient of a global batch does not
    depend on how it is cut into micro-batches: the resumed steps must equal
    the uninterrupted run's (1e-5), and the Adam moments saved at step 4 by
    the 4-rank run must equal those of the uninterrupted run (they would be
    off by orders of magnitude had the resume restarted the optimizer).
    """
    from hmoe_ds.naming import logical_expert_key
    from hmoe_ds.shards import ShardReader

    exp = _experiment(L.EXPERIMENT, ep_size=2, p_penalty_coef=0.0, entropy_coef=0.0)
    exp["run"].update(train_steps=6, log_every=1, eval_every=0, save_every=2)
    ref = _train_ok(tmp_path / "ref", experiment=exp, ds=_ds(3, 2), ranks=2, cache=data_cache)

    shutil.copytree(ref, tmp_path / "four" / "out", ignore=shutil.ignore_patterns("step_4", "step_6"))
    (tmp_path / "four" / "out" / "checkpoints" / "latest").write_text("step_2")
    exp4 = copy.deepcopy(exp)
    exp4["run"]["train_steps"] = 4
    proc = L.train(tmp_path / "four", "--resume", experiment=exp4, ds=_ds(3, 4), ranks=4, cache=data_cache)
    assert proc.returncode == 0, L.output(proc)
    assert "elastic resume" in proc.stderr
    four = tmp_path / "four" / "out"

    shutil.copytree(four, tmp_path / "two" / "out")
    back = _train_ok(tmp_path / "two", "--resume", experiment=exp, ds=_ds(3, 2), ranks=2, cache=data_cache)

    expected = _losses(ref)
    got = {**_losses(four), **_losses(back)}
    for step in range(3, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got, expected)

    saved, resumed = (ShardReader(run / "checkpoints" / "step_4") for run in (ref, four))
    key = logical_expert_key("model.layers.1.mlp", 3, "w2")
    for state in ("exp_avg", "exp_avg_sq"):
        a, b = saved.get(key, state), resumed.get(key, state)
        assert float(a.abs().max()) > 0
        assert (a - b).abs().max() <= 1e-4 * a.abs().max(), state
    assert saved.optimizer_step == resumed.optimizer_step == 4


def test_eval_shards_experts_over_its_ranks(tmp_path: Path, zero3_ep2_run: Run) -> None:
    """``run/eval.py`` on 2 ranks builds EP 2 (each rank holds half the experts) and gives the run's own loss.

    The run's last validation covered the whole split, as the evaluation does;
    ``tests/test_export.py`` evaluates the same checkpoint in one process.
    """
    import json

    two = L.run([str(L.DEEPSPEED), "--num_accelerators", "2", "--master_port", str(L.free_port()), "run/eval.py",
                 str(zero3_ep2_run.out), "--output", str(tmp_path / "two.json")], L.environment(zero3_ep2_run.cache))
    assert two.returncode == 0, L.output(two)
    assert "experts sharded over 2 ranks" in two.stdout
    result = json.loads((tmp_path / "two.json").read_text())
    assert result["loss"] == pytest.approx(checkpoint_runs.val_loss(zero3_ep2_run.metrics(), checkpoint_runs.STEPS),
                                           rel=1e-5)
