"""The runs behind the checkpoint and export tests: a tiny HMoE, 2 ranks, EP=2, 6 steps, saved at 3 and 6.

Every step is logged (``log_every: 1``), so ``metrics.jsonl`` holds each
step's losses for step-by-step comparison, and the validation pass at the end
covers the whole validation split (``eval_batches`` larger than the split).
"""

from __future__ import annotations

import copy
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .distributed import PORTS
from .launcher import DS_CONFIG, EXPERIMENT, output, read_metrics, train

STEPS = 6
SAVE_EVERY = 3


def experiment(**moe: Any) -> dict[str, Any]:
    exp = copy.deepcopy(EXPERIMENT)
    # A shared expert too, so checkpoints, resume, export and eval carry a dense branch inside the MoE layer.
    exp["model"]["moe"].update({"ep_size": 2, "placement": "balanced", "shared_expert_size": 24, **moe})
    exp["run"].update(train_steps=STEPS, log_every=1, eval_every=0, eval_batches=1000, eval_at_start=False,
                      save_every=SAVE_EVERY)
    return exp


DS_CONFIGS: dict[str, dict[str, Any]] = {
    "zero2_offload": {**DS_CONFIG, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                      "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}}},
    "zero3": {**DS_CONFIG, "zero_optimization": {"stage": 3}},
}


@dataclass
class Run:
    tmp: Path
    ds_name: str
    proc: subprocess.CompletedProcess
    cache: Path
    port: int  # its MASTER_PORT, part of its /dev/shm segments' names

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def ds(self) -> dict[str, Any]:
        return DS_CONFIGS[self.ds_name]

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.out)


def launch(tmp: Path, ds_name: str, cache: Path, *extra: str, env: dict[str, str] | None = None,
           ranks: int = 2, exp: dict[str, Any] | None = None, watch: Callable[[int], None] | None = None) -> Run:
    proc = train(tmp, *extra, experiment=exp or experiment(), ds=DS_CONFIGS[ds_name], cache=cache, env=env,
                 ranks=ranks, timeout=400, watch=watch)
    return Run(tmp, ds_name, proc, cache, PORTS[-1])


def reference_run(tmp: Path, ds_name: str, cache: Path) -> Run:
    run = launch(tmp, ds_name, cache)
    assert run.proc.returncode == 0, output(run.proc)
    return run


def train_losses(records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per step, everything logged but wall-clock values: losses, aux terms, lr, grad norm, routing statistics."""
    by_step: dict[int, dict[str, float]] = {}
    for record in records:
        if "train/lm_loss" not in record:
            continue
        assert record["step"] not in by_step, f"step {record['step']} logged twice"
        by_step[record["step"]] = {k: v for k, v in record.items() if k != "time" and not k.startswith("perf/")}
    return by_step


def val_loss(records: list[dict[str, Any]], step: int) -> float:
    return next(r["val/loss"] for r in records if r["step"] == step and "val/loss" in r)
