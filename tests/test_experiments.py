"""run/experiments/paper_comparison.py: the paper's MoE vs HMoE comparison, end to end at a tiny size.

The slow tests run the real command once (2 arms: homogeneous MoE Top-K and the headline HMoE Top-P
arm, 2 seeds each, every run trained by ``run/train.py`` through the deepspeed launcher for 2 steps,
then evaluated by ``run/eval.py``) on a 150k-character slice of the default corpus: about 3 minutes on 2
free cores. The runs train on one rank (``--num-ranks 1``): the subject here is the driver, and every
multi-rank training path has its own end-to-end test. They check the tables (mean ± std per arm, the paired interval of the
HMoE-vs-MoE difference, training FLOPs, the zero-shot column), plots and summary, that the runs of one
seed used the same data, seed and token budget and that the seed changes the initial weights, that
total parameters are equal, and ``--report-only`` / ``--resume``. The fast tests check the ``--scale``
plan, the arms' overrides and the statistics against hand-computed values.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run" / "experiments" / "paper_comparison.py"
ARMS = ("moe_topk", "hmoe_topp_matched")
STEPS = 2
SEEDS = (1234, 1235)
slow = [pytest.mark.slow, pytest.mark.distributed]


def load_driver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("paper_comparison", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_driver(tmp: Path, *args: str, timeout: float = 300, **env_extra: str) -> subprocess.CompletedProcess:
    from .launcher import FAST_START

    env = {**os.environ, **FAST_START, "DS_ACCELERATOR": "cpu", "HMOE_DS_CACHE": str(tmp / "cache"), **env_extra}
    cmd = [sys.executable, str(SCRIPT), "--scale", "0.5", "--steps", str(STEPS), "--arms", ",".join(ARMS),
           "--seeds", str(len(SEEDS)), "--num-ranks", "1", "--out", str(tmp / "out"),
           "--set", "data.max_chars=150000", "data.vocab_size=512", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- fast: the plan


def test_scale_one_is_the_cpu_model_and_scale_six_the_papers_width() -> None:
    driver = load_driver()
    one = driver.plan_for_scale(1.0, num_ranks=2)
    assert (one.hidden_size, one.num_layers, one.num_heads, one.expert_hidden) == (128, 4, 4, 256)
    assert (one.block_size, one.global_batch, one.micro_batch, one.steps) == (128, 16, 8, driver.BASE_STEPS)
    six = driver.plan_for_scale(6.0, num_ranks=8)
    assert (six.hidden_size, six.num_layers, six.num_heads) == (768, 12, 12)
    hmoe = driver.Arm("h", "h", "arithmetic").expert_sizes(six)
    assert hmoe == [864, 1056, 1248, 1440, 1632, 1824, 2016, 2208] and sum(hmoe) == 12288  # the paper's 0.4B
    ds = six.ds_config(json.loads(driver.DS_JSON.read_text()))
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8


def test_bad_plan_and_arm_arguments_are_named() -> None:
    driver = load_driver()
    for kwargs, match in (({"num_ranks": 0}, "--num-ranks=0"), ({"num_ranks": 2, "micro_batch": 0}, "--micro-batch=0"),
                          ({"num_ranks": 2, "micro_batch": 3}, "--micro-batch=3")):
        with pytest.raises(SystemExit, match=match):
            driver.plan_for_scale(1.0, **kwargs)
    arms = driver.load_arms(driver.ARMS_YAML, "moe_topk, hmoe_topp")  # spaces after commas are fine
    assert [a.name for a in arms] == ["moe_topk", "hmoe_topp"]
    with pytest.raises(SystemExit, match=r"unknown arm\(s\) \['hmoe_top'\]"):
        driver.load_arms(driver.ARMS_YAML, "moe_topk,hmoe_top")


def test_arms_have_equal_expert_totals_and_the_papers_losses() -> None:
    from hmoe_ds.sizes import solve_expert_sizes

    driver = load_driver()
    plan = driver.plan_for_scale(1.0, num_ranks=2)
    arms = {arm.name: arm for arm in driver.load_arms(driver.ARMS_YAML, "all")}
    assert [a.name for a in driver.load_arms(driver.ARMS_YAML, None)] == ["moe_topk", "moe_topp", "hmoe_topk",
                                                                          "hmoe_topp", "hmoe_topp_matched"]
    assert arms["hmoe_topk"].expert_sizes(plan) == solve_expert_sizes(
        num_experts=8, homogeneous_hidden=256, distribution="arithmetic", multiple=16)
    for arm in arms.values():
        sizes = arm.expert_sizes(plan)
        assert sizes is None or sum(sizes) == 8 * plan.expert_hidden, arm.name
    coefs = {name: (a.settings["model.moe.load_balance_coef"], a.settings["model.moe.p_penalty_coef"],
                    a.settings["model.moe.entropy_coef"]) for name, a in arms.items() if name != "dense"}
    assert coefs["moe_topk"] == (0.01, 0.0, 0.0) and coefs["moe_topp"] == (0.01, 0.0, 0.03)
    assert coefs["hmoe_topk"] == (0.0, 0.1, 0.0) and coefs["hmoe_topp"] == (0.0, 0.1, 0.03)
    # the headline arm is hmoe_topp with a higher threshold and a weaker entropy loss (so that it activates
    # about as many parameters as MoE Top-K); sizes and the P-Penalty are the same
    matched, topp = arms["hmoe_topp_matched"], arms["hmoe_topp"]
    assert matched.experts == topp.experts == "arithmetic" and matched.settings["model.moe.routing"] == "top_p"
    assert matched.settings["model.moe.top_p"] > topp.settings["model.moe.top_p"]
    assert 0 < matched.settings["model.moe.entropy_coef"] < topp.settings["model.moe.entropy_coef"]
    assert coefs["hmoe_topp_matched"][:2] == coefs["hmoe_topp"][:2]
    pairs = {(p.hmoe, p.moe) for p in driver.load_pairs(driver.ARMS_YAML)}
    assert {("hmoe_topk", "moe_topk"), ("hmoe_topp", "moe_topp"), ("hmoe_topp_matched", "moe_topk")} <= pairs


# --------------------------------------------------------------------------- fast: the statistics


def test_t_quantile_matches_tables_and_closed_forms() -> None:
    driver = load_driver()
    # two-sided 95% critical values of Student's t (any statistics table)
    table = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 10: 2.228138852, 30: 2.042272456}
    for df, expected in table.items():
        assert driver.t_quantile(0.975, df) == pytest.approx(expected, rel=1e-8), df
    assert driver.t_quantile(0.975, 1e7) == pytest.approx(1.959963985, rel=1e-6)  # -> the normal's 1.96
    for p in (0.6, 0.9, 0.99, 0.999):  # closed forms: df=1 is Cauchy, df=2 has t = (2p-1) / sqrt(2p(1-p))
        assert driver.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert driver.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
        assert driver.t_quantile(1 - p, 3) == pytest.approx(-driver.t_quantile(p, 3), rel=1e-12)
    assert driver.t_quantile(0.5, 7) == 0.0
    # a fractional df (Welch's): the CDF agrees with Simpson's rule over the density, and lies between df 2 and 3
    df = 50 / 17
    q = driver.t_quantile(0.975, df)
    density = lambda t: math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) * (
        1 + t * t / df) ** (-(df + 1) / 2)
    n = 2000
    h = q / n
    area = h / 3 * sum((1 if i in (0, n) else 4 if i % 2 else 2) * density(i * h) for i in range(n + 1))
    assert 0.5 + area == pytest.approx(0.975, abs=1e-9)
    assert table[3] < q < table[2]
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="t_quantile"):
            driver.t_quantile(bad, 3)


def test_mean_std_and_intervals_by_hand() -> None:
    driver = load_driver()
    mean, sd = driver.mean_std([4.5, 4.6, 4.7])
    assert mean == pytest.approx(4.6) and sd == pytest.approx(0.1)  # sample std: n - 1 in the denominator
    assert driver.mean_std([4.5]) == (4.5, None)

    # paired: d = a - b = (1.0, 1.2, 0.8): mean 1, sd 0.2, half width t_{.975,2} * 0.2 / sqrt(3) = 0.496828
    paired = driver.paired_difference({1: 3.0, 2: 3.2, 3: 2.8}, {1: 2.0, 2: 2.0, 3: 2.0, 4: 9.0})  # seed 4 unpaired
    assert (paired.n, paired.df, paired.method) == (3, 2.0, "paired")
    assert paired.estimate == pytest.approx(1.0)
    assert (paired.low, paired.high) == (pytest.approx(0.503172, abs=1e-6), pytest.approx(1.496828, abs=1e-6))
    assert paired.distinguishable is True
    # d = (-1, -2, -6): mean -3, sd sqrt(7), half width 4.302653 * sqrt(7/3) = 6.572411: straddles 0
    noisy = driver.paired_difference({1: 1.0, 2: 2.0, 3: 3.0}, {1: 2.0, 2: 4.0, 3: 9.0})
    assert (noisy.low, noisy.high) == (pytest.approx(-9.572411, abs=1e-6), pytest.approx(3.572411, abs=1e-6))
    assert noisy.distinguishable is False

    # Welch: a = (1, 2, 3), b = (4, 6, 8): variances 1 and 4, se^2 = 1/3 + 4/3, df = (5/3)^2 / ((1/9 + 16/9) / 2)
    welch = driver.welch_difference([1.0, 2.0, 3.0], [4.0, 6.0, 8.0])
    assert welch.estimate == pytest.approx(-4.0) and welch.df == pytest.approx(50 / 17)
    half = driver.t_quantile(0.975, 50 / 17) * math.sqrt(5 / 3)
    assert (welch.low, welch.high) == (pytest.approx(-4 - half), pytest.approx(-4 + half))
    assert half == pytest.approx(4.155, abs=0.01) and welch.distinguishable is False  # -4 +- 4.155 includes 0

    # one seed: an estimate, but no interval and no verdict
    for one in (driver.paired_difference({7: 4.55}, {7: 4.58}), driver.welch_difference([4.55], [4.58])):
        assert one.estimate == pytest.approx(-0.03) and one.low is None and one.distinguishable is None
    assert driver.interval_text(None, None, 4) == "n/a (1 seed)" == driver.verdict(None, -0.03)
    assert driver.mean_pm_std(4.55561, float("nan"), 1, 4) == "4.5556 (1 seed)"
    assert driver.mean_pm_std(4.55561, 0.01234, 3, 4) == "4.5556 ± 0.0123"
    assert driver.interval_text(-0.0312, 0.0051, 4) == "[-0.0312, +0.0051]"
    assert driver.verdict(True, -0.02) == "yes: HMoE lower" and driver.verdict(False, 0.01) == "no"


def _fake_run(driver: ModuleType, arm: str, seed: int, loss: float, acc: float = float("nan")) -> dict[str, Any]:
    return {"arm": arm, "label": arm.upper(), "seed": seed, "final_val_loss": loss, "zero_shot_acc": acc,
            "activated_params_per_token": 2e6 if arm == "moe" else 1.9e6, "train_flops": 6e12}


def test_compare_pairs_by_seed_and_says_when_one_seed_cannot_tell() -> None:
    driver = load_driver()
    pairs = [driver.Pair(hmoe="hmoe", moe="moe"), driver.Pair(hmoe="absent", moe="moe")]
    one = driver.compare([_fake_run(driver, "moe", 1234, 4.5556), _fake_run(driver, "hmoe", 1234, 4.5802)], pairs)
    assert len(one) == 1  # no zero-shot result: only the loss is compared; the absent arm is skipped
    assert one[0]["difference"] == pytest.approx(0.0246) and one[0]["ci_low"] is None
    assert one[0]["activated_params_ratio"] == pytest.approx(0.95)
    table = driver.comparison_table(one)
    assert "| +0.0246 | n/a (1 seed) | n/a (1 seed) |" in table

    moe = ((1, 4.50, 0.50), (2, 4.60, 0.52), (3, 4.70, 0.54))
    hmoe = ((1, 4.48, 0.50), (2, 4.59, 0.53), (3, 4.67, 0.55))
    rows = [_fake_run(driver, "moe", *run) for run in moe] + [_fake_run(driver, "hmoe", *run) for run in hmoe]
    three = {c["metric"]: c for c in driver.compare(rows, pairs)}
    loss = three["val loss"]  # d = (-0.02, -0.01, -0.03): mean -0.02, sd 0.01, half width 0.0248414
    assert loss["difference"] == pytest.approx(-0.02) and loss["num_seeds"] == 3
    assert (loss["ci_low"], loss["ci_high"]) == (pytest.approx(-0.0448414, abs=1e-6),
                                                 pytest.approx(0.0048414, abs=1e-6))
    assert loss["distinguishable"] is False
    acc = three["zero-shot acc"]  # d = (0, 0.01, 0.01): mean 0.00667, sd 0.00577: interval includes 0
    assert acc["difference"] == pytest.approx(0.02 / 3) and acc["distinguishable"] is False
    more = {"routing": "-", "expert_sizes": "-", "losses": "-", "total_params": 1, "train_tokens": 1,
            "zero_shot_acc_norm": float("nan"), "activated_expert_params_per_token": 1.0, "mean_experts_per_token": 2.0,
            "train_activated_params_mean": 1.0, "final_val_ppl": 90.0}
    agg = {a["arm"]: a for a in driver.aggregate([{**r, **more} for r in rows])}
    assert agg["moe"]["final_val_loss_mean"] == pytest.approx(4.6)
    assert agg["moe"]["final_val_loss_std"] == pytest.approx(0.1)
    assert agg["moe"]["zero_shot_acc_std"] == pytest.approx(0.02) and agg["moe"]["seeds"] == "1 2 3"
    assert math.isnan(agg["moe"]["zero_shot_acc_norm_mean"])
    assert "4.6000 ± 0.1000" in driver.markdown_table(list(agg.values()))


def test_zero_shot_results_flops_and_seed_layout(tmp_path: Path) -> None:
    driver = load_driver()
    assert driver.read_zero_shot(tmp_path / "absent.json") is None
    path = tmp_path / driver.ZERO_SHOT_NAME  # lm-evaluation-harness's layout; a group row without acc is skipped
    path.write_text(json.dumps({"results": {"piqa": {"acc,none": 0.6, "acc_norm,none": 0.62, "alias": "piqa"},
                                            "arc_easy": {"acc,none": 0.4, "acc_norm,none": 0.38},
                                            "group": {"alias": "all"}}}))
    zs = driver.read_zero_shot(path)
    assert zs["acc"] == pytest.approx(0.5) and zs["acc_norm"] == pytest.approx(0.5) and set(zs["tasks"]) == {"piqa",
                                                                                                         "arc_easy"}
    # run/zero_shot.py's own summary: per-task rows with examples; the group's aggregate row has none
    path.write_text(json.dumps({"model": "x", "tasks": {
        "hmoe_bigbench": {"acc": 0.9, "acc_norm": 0.9},
        "hmoe_bigbench_winowhy": {"acc": 0.5, "acc_stderr": 0.01, "acc_norm": 0.4, "examples": 10},
        "hmoe_bigbench_strategyqa": {"acc": 0.7, "acc_stderr": 0.01, "acc_norm": 0.6, "examples": 10}}}))
    zs = driver.read_zero_shot(path)
    assert set(zs["tasks"]) == {"hmoe_bigbench_winowhy", "hmoe_bigbench_strategyqa"}
    assert zs["acc"] == pytest.approx(0.6) and zs["acc_norm"] == pytest.approx(0.5)
    path.write_text(json.dumps({"results": {"piqa": {"alias": "piqa"}}}))
    with pytest.raises(SystemExit, match="no task with an 'acc'"):
        driver.read_zero_shot(path)
    # 6 N D + 6 L n_ctx d D with N = 2.1M, D = 1.2288M tokens, 4 layers, n_ctx 128, d 128
    assert driver.training_flops(2.1e6, 1_228_800, 4, 128, 128) == pytest.approx(6 * 1_228_800 * (2.1e6 + 65_536))
    assert driver.seeds_for(1234, 3) == [1234, 1235, 1236]
    with pytest.raises(SystemExit, match="--seeds=0"):
        driver.seeds_for(1234, 0)
    assert driver.run_path(tmp_path, "moe_topk", 1234, False) == tmp_path / "moe_topk"  # one seed: the old layout
    assert driver.run_path(tmp_path, "moe_topk", 1235, True) == tmp_path / "moe_topk" / "seed1235"
    assert driver.run_name("moe_topk", 1235, True) == "moe_topk.seed1235"


# --------------------------------------------------------------------------- slow: the command


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("paper_comparison")
    # 4 runs of ~25 s each plus evaluations on 2 free cores; each takes 3-4 min on a machine loaded 5x
    return tmp / "out", run_driver(tmp, timeout=1800)


def _rows(out: Path) -> list[dict[str, Any]]:
    with (out / "results.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _runs(arm: str) -> list[str]:
    return [f"{arm}.seed{seed}" for seed in SEEDS]


@pytest.mark.slow
@pytest.mark.distributed
def test_command_writes_tables_plots_and_summary(comparison: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = comparison
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("results.csv", "arms.csv", "comparisons.csv", "results.md", "val_loss.png", "expert_share.png",
                 "summary.json"):
        assert (out / name).is_file(), name
        assert str(out / name) in proc.stdout  # the command says where its outputs are
    for png in ("val_loss.png", "expert_share.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "results.md").read_text()
    assert "MoE Top-K (k=2)" in markdown and "HMoE Top-P (p=" in markdown
    assert "| val loss (mean ± std) |" in markdown and "| 95% CI (paired by seed) |" in markdown
    # one row per arm with mean ± std over the 2 seeds (no "(1 seed)"), and the zero-shot column empty
    arm_rows = [line for line in markdown.splitlines()
                if line.startswith(("| MoE Top-K", "| HMoE Top-P")) and "| top_" in line]
    assert len(arm_rows) == 2
    for line in arm_rows:
        assert re.search(r"\| (\*\*)?\d+\.\d{4} ± \d+\.\d{4}(\*\*)? \| - \|$", line), line
    # the headline pair: a difference with an interval and a verdict, not "n/a (1 seed)"
    pair = [line for line in markdown.splitlines() if line.startswith("| HMoE Top-P") and "| val loss |" in line]
    assert len(pair) == 1 and "n/a" not in pair[0], pair
    assert re.search(r"\| \[[+-]\d+\.\d{4}, [+-]\d+\.\d{4}\] \| (no|yes: HMoE (lower|higher)) \|", pair[0]), pair[0]
    for run in _runs("moe_topk") + _runs("hmoe_topp_matched"):
        assert f"| {run} |" in markdown


@pytest.mark.slow
@pytest.mark.distributed
def test_tables_have_a_finite_row_per_run_arm_and_pair(comparison: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = comparison
    assert proc.returncode == 0
    rows = _rows(out)
    assert [r["run"] for r in rows] == _runs(ARMS[0]) + _runs(ARMS[1])
    assert [int(r["seed"]) for r in rows] == list(SEEDS) * 2
    numeric = ("total_params", "activated_params_per_token", "activated_expert_params_per_token",
               "mean_experts_per_token", "final_val_loss", "final_val_ppl", "step0_val_loss", "train_tokens",
               "train_activated_params_mean", "train_flops")
    for row in rows:
        for key in numeric:
            assert math.isfinite(float(row[key])) and float(row[key]) > 0, (row["run"], key, row[key])
        assert float(row["activated_params_per_token"]) < float(row["total_params"])
        assert float(row["final_val_loss"]) < math.log(512) + 1
        assert row["zero_shot_acc"] == ""  # no zero_shot.json in the run directories
        # FLOPs = 6 N D + 6 L n_ctx d D (scale 0.5: 3 layers, 64-token sequences, d = 64)
        expected = 6 * int(row["train_tokens"]) * (float(row["train_activated_params_mean"]) + 3 * 64 * 64)
        assert float(row["train_flops"]) == pytest.approx(expected, rel=1e-6)
    by_run = {r["run"]: r for r in rows}
    for run in _runs("moe_topk"):
        assert float(by_run[run]["mean_experts_per_token"]) == pytest.approx(2.0)
        assert by_run[run]["expert_sizes"] == " ".join(["128"] * 8)
    for run in _runs("hmoe_topp_matched"):
        assert 1.0 <= float(by_run[run]["mean_experts_per_token"]) <= 8.0
        assert by_run[run]["expert_sizes"] == "64 80 96 112 144 160 176 192"  # arithmetic, h = 128
    # the seed changes the initial weights: the step-0 validation loss of an arm differs between its seeds
    for arm in ARMS:
        assert by_run[f"{arm}.seed{SEEDS[0]}"]["step0_val_loss"] != by_run[f"{arm}.seed{SEEDS[1]}"]["step0_val_loss"]

    with (out / "arms.csv").open(newline="", encoding="utf-8") as f:
        arms = {r["arm"]: r for r in csv.DictReader(f)}
    assert list(arms) == list(ARMS)
    for arm, agg in arms.items():
        losses = [float(by_run[run]["final_val_loss"]) for run in _runs(arm)]
        assert int(agg["num_seeds"]) == 2 and agg["seeds"] == " ".join(map(str, SEEDS))
        assert float(agg["final_val_loss_mean"]) == pytest.approx(sum(losses) / 2)
        assert float(agg["final_val_loss_std"]) == pytest.approx(abs(losses[0] - losses[1]) / math.sqrt(2))
    with (out / "comparisons.csv").open(newline="", encoding="utf-8") as f:
        comparisons = list(csv.DictReader(f))
    assert [(c["hmoe"], c["moe"], c["metric"]) for c in comparisons] == [("hmoe_topp_matched", "moe_topk", "val loss")]
    c = comparisons[0]
    loss = {run: float(r["final_val_loss"]) for run, r in by_run.items()}
    diffs = [loss[f"hmoe_topp_matched.seed{s}"] - loss[f"moe_topk.seed{s}"] for s in SEEDS]
    half = 12.706204736 * abs(diffs[0] - diffs[1]) / math.sqrt(2) / math.sqrt(2)  # t_{.975,1} * sd / sqrt(n)
    assert float(c["difference"]) == pytest.approx(sum(diffs) / 2)
    assert float(c["ci_low"]) == pytest.approx(sum(diffs) / 2 - half, rel=1e-6, abs=1e-9)
    assert float(c["ci_high"]) == pytest.approx(sum(diffs) / 2 + half, rel=1e-6, abs=1e-9)
    assert float(c["df"]) == 1.0 and c["distinguishable"] == str(float(c["ci_low"]) > 0 or float(c["ci_high"]) < 0)
    assert float(c["activated_params_ratio"]) > 0 and float(c["train_flops_ratio"]) > 0


@pytest.mark.slow
@pytest.mark.distributed
def test_runs_share_data_order_and_token_budget(comparison: tuple[Path, subprocess.CompletedProcess]) -> None:
    """What each run actually saved: same tokenised cache entry, batch, steps and block everywhere; the same
    seed in run i of every arm, and different seeds across i."""
    out, proc = comparison
    assert proc.returncode == 0
    dirs = {(arm, seed): out / arm / f"seed{seed}" for arm in ARMS for seed in SEEDS}
    saved = {key: yaml.safe_load((d / "experiment.yaml").read_text()) for key, d in dirs.items()}
    ds = {key: json.loads((d / "ds_config.json").read_text()) for key, d in dirs.items()}
    first = saved[ARMS[0], SEEDS[0]]
    for (arm, seed), exp in saved.items():
        assert exp["data"] == first["data"]  # incl. the explicit tokenized_cache path (and so the split)
        assert exp["run"]["seed"] == seed
        assert exp["run"]["train_steps"] == STEPS
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            assert ds[arm, seed][key] == ds[ARMS[0], SEEDS[0]][key]
    cache = Path(first["data"]["tokenized_cache"])
    assert (cache / "manifest.json").is_file()
    rows = _rows(out)
    assert len({(r["data_cache"], r["train_tokens"]) for r in rows}) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["consistency"]["identical_data_order_and_budget"] is True
    assert summary["consistency"]["seeds"] == {arm: list(SEEDS) for arm in ARMS}
    assert summary["seeds"] == list(SEEDS) and summary["data"]["cache_path"] == str(cache)
    for d in dirs.values():  # evaluated at the start and at the end
        steps = [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()
                 if "val/loss" in line]
        assert steps[0] == 0 and steps[-1] == STEPS


@pytest.mark.slow
@pytest.mark.distributed
def test_arms_have_equal_total_parameters(comparison: tuple[Path, subprocess.CompletedProcess]) -> None:
    from hmoe_ds.modeling import HMoEConfig, parameter_summary

    out, proc = comparison
    assert proc.returncode == 0
    totals = {r["run"]: int(r["total_params"]) for r in _rows(out)}
    assert len(set(totals.values())) == 1, totals
    for arm in ARMS:  # recomputed from the saved model config, not taken from the table
        config = HMoEConfig.from_json_file(str(out / arm / f"seed{SEEDS[0]}" / "model_config.json"))
        assert parameter_summary(config)["total_params"] == totals[f"{arm}.seed{SEEDS[0]}"]
        assert sum(config.moe["expert_sizes"]) == 8 * 128
    assert json.loads((out / "summary.json").read_text())["consistency"]["equal_total_params_moe_arms"] is True


@pytest.mark.slow
@pytest.mark.distributed
def test_report_only_resume_and_zero_shot_results(comparison: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = comparison
    assert proc.returncode == 0
    (out / "results.csv").unlink()
    # a zero-shot result for every run fills the zero-shot column and adds an accuracy comparison
    for i, (arm, seed) in enumerate((arm, seed) for arm in ARMS for seed in SEEDS):
        (out / arm / f"seed{seed}" / "zero_shot.json").write_text(json.dumps(
            {"results": {"piqa": {"acc,none": 0.5 + 0.01 * i, "acc_norm,none": 0.5}}}))
    again = run_driver(out.parent, "--report-only")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert [r["run"] for r in _rows(out)] == _runs(ARMS[0]) + _runs(ARMS[1])
    assert [float(r["zero_shot_acc"]) for r in _rows(out)] == pytest.approx([0.50, 0.51, 0.52, 0.53])
    markdown = (out / "results.md").read_text()
    assert "| 0.5050 ± 0.0071 |" in markdown  # MoE Top-K: mean and std of 0.50, 0.51
    accuracy = [line for line in markdown.splitlines() if line.startswith("| HMoE") and "| zero-shot acc |" in line]
    assert len(accuracy) == 1 and "| +0.0200 | [+0.0200, +0.0200] | yes: HMoE higher |" in accuracy[0]
    resumed = run_driver(out.parent, "--resume")  # every run is done: nothing is trained
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert resumed.stdout.count("already trained and evaluated, skipped (--resume)") == 4
    refused = run_driver(out.parent)
    assert refused.returncode != 0 and "--resume" in refused.stderr
    # --zero-shot with --resume: the run without a zero_shot.json gets a real one (run/zero_shot.py, 3 examples
    # per shipped task), read back from run/zero_shot.py's own format; the others keep theirs.
    from hmoe_ds.eval_tasks import data_dir, prepare_bigbench

    prepare_bigbench()  # a no-op after run/setup.sh
    (out / ARMS[0] / f"seed{SEEDS[0]}" / "zero_shot.json").unlink()
    missing = run_driver(out.parent, "--resume", "--zero-shot", "--zero-shot-limit", "3", timeout=600,
                         HMOE_EVAL_DATA=str(data_dir()))
    assert missing.returncode == 0, missing.stdout[-3000:] + missing.stderr[-3000:]
    assert missing.stdout.count("zero-shot in") == 1 and "over 5 tasks" in missing.stdout, missing.stdout
    written = json.loads((out / ARMS[0] / f"seed{SEEDS[0]}" / "zero_shot.json").read_text())
    assert {row["examples"] for name, row in written["tasks"].items() if "examples" in row} == {3}
    accuracies = [float(r["zero_shot_acc"]) for r in _rows(out)]
    assert 0 <= accuracies[0] <= 1 and accuracies[1:] == pytest.approx([0.51, 0.52, 0.53])
    no_data = run_driver(out.parent, "--resume", "--zero-shot", HMOE_EVAL_DATA=str(out / "nowhere"))
    assert no_data.returncode != 0 and "--zero-shot:" in no_data.stderr and "--prepare_data" in no_data.stderr
