"""run/experiments/paper_comparison.py: the paper's MoE vs HMoE comparison, end to end at a tiny size.

The slow test runs the real command (2 arms: homogeneous MoE Top-K and HMoE Top-P, each trained by
``run/train.py`` through the deepspeed launcher on 2 CPU ranks for 2 steps, then evaluated by
``run/eval.py``) on a 150k-character slice of the default corpus: about 1.5-2.5 minutes. It checks the
table, plots and summary, that both arms used the same data, seed and token budget, and that their
total parameters are equal. The fast tests check the ``--scale`` plan and the arms' overrides.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run" / "experiments" / "paper_comparison.py"
ARMS = ("moe_topk", "hmoe_topp")
STEPS = 2
slow = [pytest.mark.slow, pytest.mark.distributed]


def load_driver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("paper_comparison", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_driver(tmp: Path, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HMOE_DS_CACHE": str(tmp / "cache")}
    cmd = [sys.executable, str(SCRIPT), "--scale", "0.5", "--steps", str(STEPS), "--arms", ",".join(ARMS),
           "--out", str(tmp / "out"), "--set", "data.max_chars=150000", "data.vocab_size=512", *args]
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
                                                                          "hmoe_topp"]
    assert arms["hmoe_topk"].expert_sizes(plan) == solve_expert_sizes(
        num_experts=8, homogeneous_hidden=256, distribution="arithmetic", multiple=16)
    for arm in arms.values():
        sizes = arm.expert_sizes(plan)
        assert sizes is None or sum(sizes) == 8 * plan.expert_hidden, arm.name
    coefs = {name: (a.settings["model.moe.load_balance_coef"], a.settings["model.moe.p_penalty_coef"],
                    a.settings["model.moe.entropy_coef"]) for name, a in arms.items() if name != "dense"}
    assert coefs["moe_topk"] == (0.01, 0.0, 0.0) and coefs["moe_topp"] == (0.01, 0.0, 0.03)
    assert coefs["hmoe_topk"] == (0.0, 0.1, 0.0) and coefs["hmoe_topp"] == (0.0, 0.1, 0.03)


# --------------------------------------------------------------------------- slow: the command


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("paper_comparison")
    return tmp / "out", run_driver(tmp)


def _rows(out: Path) -> list[dict[str, Any]]:
    with (out / "results.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.distributed
def test_command_writes_table_plots_and_summary(comparison: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = comparison
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("results.csv", "results.md", "val_loss.png", "expert_share.png", "summary.json"):
        assert (out / name).is_file(), name
        assert str(out / name) in proc.stdout  # the command says where its outputs are
    for png in ("val_loss.png", "expert_share.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "results.md").read_text()
    assert "MoE Top-K (k=2)" in markdown and "HMoE Top-P (p=0.6)" in markdown and "| val loss |" in markdown


@pytest.mark.slow
@pytest.mark.distributed
def test_table_has_one_finite_row_per_arm(comparison: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = comparison
    assert proc.returncode == 0
    rows = _rows(out)
    assert [r["arm"] for r in rows] == list(ARMS)
    numeric = ("total_params", "activated_params_per_token", "activated_expert_params_per_token",
               "mean_experts_per_token", "final_val_loss", "final_val_ppl", "step0_val_loss", "train_tokens")
    for row in rows:
        for key in numeric:
            assert math.isfinite(float(row[key])) and float(row[key]) > 0, (row["arm"], key, row[key])
        assert float(row["activated_params_per_token"]) < float(row["total_params"])
        assert float(row["final_val_loss"]) < math.log(512) + 1
    by_arm = {r["arm"]: r for r in rows}
    assert float(by_arm["moe_topk"]["mean_experts_per_token"]) == pytest.approx(2.0)
    assert 1.0 <= float(by_arm["hmoe_topp"]["mean_experts_per_token"]) <= 8.0
    assert by_arm["hmoe_topp"]["expert_sizes"] == "64 80 96 112 144 160 176 192"  # arithmetic, h = 128
    assert by_arm["moe_topk"]["expert_sizes"] == " ".join(["128"] * 8)


@pytest.mark.slow
@pytest.mark.distributed
def test_arms_share_data_order_and_token_budget(comparison: tuple[Path, subprocess.CompletedProcess]) -> None:
    """What each run actually saved: same seed, same tokenised cache entry, same batch, steps and block."""
    out, proc = comparison
    assert proc.returncode == 0
    saved = {arm: yaml.safe_load((out / arm / "experiment.yaml").read_text()) for arm in ARMS}
    ds = {arm: json.loads((out / arm / "ds_config.json").read_text()) for arm in ARMS}
    first = saved[ARMS[0]]
    for arm in ARMS[1:]:
        assert saved[arm]["data"] == first["data"]  # incl. the explicit tokenized_cache path
        assert saved[arm]["run"]["seed"] == first["run"]["seed"]
        assert saved[arm]["run"]["train_steps"] == first["run"]["train_steps"] == STEPS
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            assert ds[arm][key] == ds[ARMS[0]][key]
    cache = Path(first["data"]["tokenized_cache"])
    assert (cache / "manifest.json").is_file()
    rows = _rows(out)
    assert len({(r["seed"], r["data_cache"], r["train_tokens"]) for r in rows}) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["consistency"]["identical_data_order_and_budget"] is True
    assert summary["data"]["cache_path"] == str(cache)
    for arm in ARMS:  # evaluated at the start and at the end
        steps = [json.loads(line)["step"] for line in (out / arm / "metrics.jsonl").read_text().splitlines()
                 if "val/loss" in line]
        assert steps[0] == 0 and steps[-1] == STEPS


@pytest.mark.slow
@pytest.mark.distributed
def test_arms_have_equal_total_parameters(comparison: tuple[Path, subprocess.CompletedProcess]) -> None:
    from hmoe_ds.modeling import HMoEConfig, parameter_summary

    out, proc = comparison
    assert proc.returncode == 0
    totals = {r["arm"]: int(r["total_params"]) for r in _rows(out)}
    assert len(set(totals.values())) == 1, totals
    for arm in ARMS:  # recomputed from the saved model config, not taken from the table
        config = HMoEConfig.from_json_file(str(out / arm / "model_config.json"))
        assert parameter_summary(config)["total_params"] == totals[arm]
        assert sum(config.moe["expert_sizes"]) == 8 * 128
    assert json.loads((out / "summary.json").read_text())["consistency"]["equal_total_params_moe_arms"] is True


@pytest.mark.slow
@pytest.mark.distributed
def test_report_only_rebuilds_and_a_used_out_dir_is_refused(
    comparison: tuple[Path, subprocess.CompletedProcess],
) -> None:
    out, proc = comparison
    assert proc.returncode == 0
    (out / "results.csv").unlink()
    again = run_driver(out.parent, "--report-only", timeout=180)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert [r["arm"] for r in _rows(out)] == list(ARMS)
    refused = run_driver(out.parent, timeout=120)
    assert refused.returncode != 0 and "--resume" in refused.stderr
