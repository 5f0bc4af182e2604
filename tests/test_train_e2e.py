"""End to end through the deepspeed launcher, 2 CPU ranks: run/train.py trains, logs, evaluates, saves, resumes.

Each test starts ``deepspeed --num_accelerators 2`` (2 ranks, gloo) as a subprocess on a
free port with a tiny model on a 150k-character slice of the default corpus, then reads
the TensorBoard event files back with TensorBoard's own reader. About a minute in all.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from .launcher import DS_CONFIG, EXPERIMENT, read_metrics, scalars, train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = EXPERIMENT["run"]["train_steps"]


def launch(tmp: Path, *extra: str, ds: dict[str, Any] = DS_CONFIG, timeout: float = 150) -> subprocess.CompletedProcess:
    return train(tmp, *extra, ds=ds, timeout=timeout, as_user=True)  # the environment as a user has it


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("e2e")
    # wall_clock_breakdown: DeepSpeed's own samples-indexed timing events, which the trainer moves onto steps
    return tmp, launch(tmp, ds={**DS_CONFIG, "wall_clock_breakdown": True})


def test_training_exits_cleanly_and_reports(trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    tmp, proc = trained
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "validation loss" in proc.stdout and "tensorboard --logdir" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_tensorboard_has_every_metric(trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    tmp, proc = trained
    assert proc.returncode == 0
    tb = scalars(tmp / "out" / "tensorboard" / "tiny")
    expected = ["train/lm_loss", "train/aux_loss", "train/lr", "train/grad_norm", "perf/tokens_per_s",
                "moe/activated_params_per_token", "moe/mean_experts_per_token", "val/loss", "val/ppl"]
    expected += [f"train/aux/{t}" for t in ("load_balance", "p_penalty", "entropy", "z_loss")]
    for layer in range(2):
        expected += [f"moe/layer_{layer}/{k}" for k in ("experts_per_token", "activated_params_per_token",
                                                        "load_min", "load_max", "load_cv", "dead_experts")]
        expected += [f"moe/layer_{layer}/expert_{e}_token_fraction" for e in range(4)]  # 4 <= 16 experts: auto
    missing = [t for t in expected if t not in tb]
    assert not missing, f"missing tags {missing}; have {sorted(tb)}"
    # Tags that cannot change are not charted: nothing is dropped without a capacity limit; EP 1 has one rank.
    constant = [t for t in tb if t.endswith(("dropped_assignments", "_expert_params", "_imbalance"))
                or "/ep_rank_" in t]
    assert not constant, constant
    # DeepSpeed's samples-indexed events: lr dropped (train/lr), the wall-clock timings on the step axis.
    assert not [t for t in tb if t.startswith("Train/Samples/")], sorted(tb)
    assert [s for s, _ in tb["deepspeed/elapsed_time_ms_forward"] if s <= STEPS] == list(range(1, STEPS + 1))
    for tag in expected:
        assert all(math.isfinite(v) for _, v in tb[tag]), tag
    assert [s for s, _ in tb["train/lm_loss"]] == [2, 4, 6]
    assert [s for s, _ in tb["val/loss"]] == [0, 3, 6]
    fractions: dict[tuple[int, int], float] = defaultdict(float)
    for tag, points in tb.items():
        if tag.endswith("_token_fraction"):
            layer = int(tag.split("/")[1].split("_")[1])
            for step, value in points:
                fractions[(layer, step)] += value
    assert len(fractions) == 2 * 3 and all(abs(v - 1) < 1e-4 for v in fractions.values())
    assert tb["moe/activated_params_per_token"][-1][1] > 0
    assert tb["<images>"][0][1] >= 1  # the expert-load picture
    # One load histogram per MoE layer at every log point, and the Custom Scalars layout.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import metadata as cs_metadata

    events = EventAccumulator(str(tmp / "out" / "tensorboard" / "tiny"), size_guidance={"histograms": 0, "tensors": 0})
    events.Reload()
    for layer in range(2):
        assert [h.step for h in events.Histograms(f"moe/layer_{layer}/expert_load")] == [2, 4, 6]
    assert cs_metadata.CONFIG_SUMMARY_TAG in events.Tags()["tensors"]
    (facts,) = events.Tensors("run/constants/text_summary")[:1]
    text = facts.tensor_proto.string_val[0].decode()
    assert "| 0 | 32, 64, 96, 128 | top_p (p=0.6) | 0 dropped (no capacity limit) | 61,440 (1.000) |" in text, text


def test_metrics_jsonl_checkpoint_and_saved_configs(trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    tmp, proc = trained
    assert proc.returncode == 0
    out = tmp / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/lm_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert all(math.isfinite(r["train/grad_norm"]) for r in train)
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS}"
    assert (out / "checkpoints" / f"step_{STEPS}" / "mp_rank_00_model_states.pt").is_file()
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["tensorboard"]["enabled"]
    assert yaml.safe_load((out / "experiment.yaml").read_text())["run"]["train_steps"] == STEPS


def test_resume_continues_from_the_checkpoint(trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    tmp, first = trained
    assert first.returncode == 0
    proc = launch(tmp, f"run.train_steps={STEPS + 2}", "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"at step {STEPS}" in proc.stdout
    records = [json.loads(line) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == STEPS + 2


def test_bad_batch_size_fails_once_without_traceback(tmp_path: Path) -> None:
    proc = launch(tmp_path, ds={**DS_CONFIG, "train_batch_size": 100}, timeout=90)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert text.count("train_batch_size=100 != train_micro_batch_size_per_gpu (4)") == 1, text[-3000:]
    assert "Traceback" not in text
    assert not (tmp_path / "out").exists()


def test_zero3_with_expert_parallelism_trains_by_editing_the_json_only(tmp_path: Path) -> None:
    """Same experiment, ZeRO-3 JSON: the trainer switches to the AutoEP front-end itself; resume works too."""
    ds = {**DS_CONFIG, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}}
    first = launch(tmp_path, "--set", "model.moe.ep_size=2", "model.moe.placement=balanced", ds=ds, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "out"
    saved = json.loads((out / "model_config.json").read_text())
    assert saved["moe"]["ep_size"] == 2
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [line["train/lm_loss"] for line in lines if "train/lm_loss" in line]
    assert losses and all(math.isfinite(v) for v in losses)
    again = launch(tmp_path, "--set", "model.moe.ep_size=2", "model.moe.placement=balanced",
                   f"run.train_steps={STEPS + 2}", "--resume", ds=ds, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (out / "checkpoints" / f"step_{STEPS + 2}").is_dir()


def test_per_ep_rank_load_tags(trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    """ep_size=1 (the default) on 2 ranks: one EP rank holding every expert, so both ratios are 1.

    TensorBoard leaves these constant tags out (test_tensorboard_has_every_metric);
    metrics.jsonl keeps them, with the per-expert shares, for the tools that read it.
    """
    tmp, proc = trained
    assert proc.returncode == 0
    records = [r for r in read_metrics(tmp / "out") if "train/lm_loss" in r and r["step"] <= STEPS]
    assert len(records) == 3
    for layer in range(2):
        tag = f"moe/layer_{layer}"
        assert [r[f"{tag}/ep_rank_0_expert_params"] for r in records] == [3 * 64 * (32 + 64 + 96 + 128)] * 3
        flops = [r[f"{tag}/ep_rank_0_expert_flops_per_step"] for r in records]
        # per device per step: 8 sequences x 64 tokens, each through 1 to 4 experts (3*64*32 to 3*64*320 params)
        assert all(2 * 3 * 64 * 32 * 8 * 64 <= f <= 2 * 3 * 64 * 320 * 8 * 64 for f in flops)
        assert [r[f"{tag}/ep_flops_imbalance"] for r in records] == [1.0] * 3
        assert f"{tag}/ep_rank_1_expert_params" not in records[0]
        assert [r[f"{tag}/dropped_assignments"] for r in records] == [0.0] * 3
        assert all(abs(sum(r[f"{tag}/expert_{e}_token_fraction"] for e in range(4)) - 1) < 1e-6 for r in records)
