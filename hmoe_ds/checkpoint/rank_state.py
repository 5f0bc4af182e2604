"""What each rank saves besides DeepSpeed's files: its data position and RNG states, and exact CPU-Adam resume."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .atomic_io import atomic_torch_save
from .layout import CheckpointError, rank_file

def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (router noise uses torch's global generator)."""
    from deepspeed.accelerator import get_accelerator

    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        state["accelerator"] = accelerator.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def save_rank_state(tag_dir: Path, rank: int, state: dict[str, Any]) -> None:
    atomic_torch_save(state, Path(tag_dir) / rank_file(rank))


def load_rank_state(tag_dir: Path, rank: int) -> dict[str, Any]:
    path = Path(tag_dir) / rank_file(rank)
    try:
        # Our own file (python/numpy RNG states are not plain tensors), inside a checkpoint the
        # user already trusts with DeepSpeed's pickles.
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{tag_dir}: {rank_file(rank)} is missing (the per-rank data position and RNG "
                              f"state of rank {rank}); the checkpoint is incomplete") from None


def restore_cpu_adam_step_state(engine: Any) -> int | None:
    """Make DeepSpeedCPUAdam (ZeRO-Offload's optimizer) resume bit-exactly; returns the replayed step count.

    Its C++ half keeps ``beta^t`` for bias correction as a running product
    (``beta_t *= beta`` each step) but, in a fresh process at step ``n``, computes
    it once with ``pow(beta, n)``: the two differ in the last bits, so every step
    after a resume would differ from the uninterrupted run by ~1e-7 relative.
    Replaying steps 1..n on empty tensors rebuilds the running product exactly
    (one call per step, no arithmetic on weights). Any other optimizer: no-op.
    """
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    candidates = [getattr(engine, "optimizer", None), getattr(getattr(engine, "optimizer", None), "optimizer", None),
                  getattr(engine, "basic_optimizer", None)]
    optimizer = next((o for o in candidates if isinstance(o, DeepSpeedCPUAdam)), None)
    if optimizer is None:
        return None
    steps = {int(state["step"]) for state in optimizer.state.values() if "step" in state}
    if len(steps) != 1:
        return None  # nothing restored, or parameters at different steps: leave DeepSpeed's behaviour alone
    step = steps.pop()
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    empty = torch.empty(0, dtype=torch.float32)
    for t in range(1, step + 1):
        optimizer.ds_opt_adam.adam_update(optimizer.opt_id, t, group["lr"], beta1, beta2, group["eps"],
                                          group["weight_decay"], group["bias_correction"], empty, empty, empty, empty)
    return step

