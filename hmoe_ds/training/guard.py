"""The non-finite guard: a NaN or Inf loss or gradient norm stops the run (or skips the step), never a checkpoint.

Without it a run that goes non-finite keeps "training" on NaN, logs ``null``,
saves checkpoints full of NaN and moves ``latest`` onto them: the last good
state is then the one a user is least likely to find.

Per optimizer step the trainer calls :meth:`StepGuard.observe_loss` for every
micro-batch (no host sync: the flag stays a tensor) and :meth:`StepGuard.end_step`
once at the boundary, which is a single small all-reduce that also carries the
"stop requested" flag of :mod:`hmoe_ds.training.signals`, so every rank takes the
same decision at the same step. ``run.on_nonfinite`` says what happens:

``stop`` (default)  raise :class:`NonFiniteError` naming the step and the last good
                    checkpoint; nothing is saved and ``latest`` does not move.
``skip``            count the step (``train/skipped_nonfinite_steps`` in TensorBoard
                    and metrics.jsonl) and go on, as large-scale trainers do. The
                    update itself is dropped by DeepSpeed's own overflow check (ZeRO
                    1-2, and fp16/bf16 with ``check_grad_overflow``), which zeroes
                    the gradients when their norm is not finite. Where that check does
                    not exist (fp32 ZeRO-0/3) the weights may already be non-finite;
                    :meth:`StepGuard.check_parameters` then stops the run, since
                    skipping cannot undo it.

Before every save the trainer also checks that the weights are finite
(:meth:`StepGuard.check_parameters`): an update from a damaged optimizer state
can make them NaN while the step's loss was still finite.

The test-only hook ``HMOE_DS_TEST_NONFINITE_AT_STEP=<step>`` makes one rank
(``HMOE_DS_TEST_NONFINITE_RANK``, default 1) turn its loss into NaN during that
optimizer step (1-based), before the backward; it does nothing unless set.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch

from hmoe_ds.collectives import all_reduce_max
from hmoe_ds.errors import NonFiniteError  # re-exported: the old import path keeps working

__all__ = ["NONFINITE_MODES", "NonFiniteError", "StepGuard", "maybe_poison_loss", "nonfinite_parameters"]

NONFINITE_MODES = ("stop", "skip")
NONFINITE_AT_STEP_ENV = "HMOE_DS_TEST_NONFINITE_AT_STEP"
NONFINITE_RANK_ENV = "HMOE_DS_TEST_NONFINITE_RANK"


def maybe_poison_loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """Test hook: NaN instead of the loss of optimizer step ``step`` on one rank; the loss itself otherwise."""
    value = os.environ.get(NONFINITE_AT_STEP_ENV)
    if value and int(value) == step and rank == int(os.environ.get(NONFINITE_RANK_ENV, "1")):
        return loss * float("nan")
    return loss


def nonfinite_parameters(module: torch.nn.Module, limit: int = 5) -> list[str]:
    """Names of (at most ``limit``) parameters of this rank holding NaN or Inf.

    Under ZeRO-3 a parameter's local data is its partition (``ds_tensor``); every
    rank checks its own share, so the caller all-reduces the count.
    """
    bad = []
    for name, param in module.named_parameters():
        data = getattr(param, "ds_tensor", None)
        data = param.data if data is None else data
        if data.numel() and not bool(torch.isfinite(data).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


class StepGuard:
    """Tracks one optimizer step's finiteness on every rank; see the module docstring."""

    def __init__(self, mode: str, device: torch.device | str, last_checkpoint: Callable[[], str | None]) -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite={mode!r}: allowed values are {', '.join(NONFINITE_MODES)}")
        self.mode = mode
        self.device = torch.device(device)
        self.last_checkpoint = last_checkpoint
        self.skipped = 0
        self._bad_micro = torch.zeros((), dtype=torch.float32, device=self.device)

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Record one micro-batch's loss; stays on the device (no synchronisation)."""
        self._bad_micro = self._bad_micro + (~torch.isfinite(loss.detach().float())).any().float()

    def end_step(self, step: int, grad_norm: float | None, stop_requested: bool) -> tuple[bool, bool]:
        """Collective, once per optimizer step: ``(this step was non-finite, some rank asked to stop)``.

        In ``stop`` mode a non-finite step raises :class:`NonFiniteError` on every rank.
        """
        flags = torch.stack([(self._bad_micro > 0).float(),
                             torch.tensor(1.0 if stop_requested else 0.0, device=self.device)])
        flags = all_reduce_max(flags).tolist()
        self._bad_micro = torch.zeros((), dtype=torch.float32, device=self.device)
        bad_loss = flags[0] > 0
        bad_norm = grad_norm is not None and not math.isfinite(float(grad_norm))  # the global norm: same everywhere
        nonfinite = bad_loss or bad_norm
        if nonfinite:
            what = " and ".join(w for w, on in (("training loss", bad_loss), (f"gradient norm ({grad_norm})",
                                                                               bad_norm)) if on)
            if self.mode == "stop":
                raise NonFiniteError(
                    f"step {step}: non-finite {what}. The run stops here without saving; {self._last_good()} "
                    "Lower the learning rate or tighten gradient_clipping in the DeepSpeed JSON, check the data, "
                    "or set run.on_nonfinite: skip to drop such steps and go on")
            self.skipped += 1
        return nonfinite, flags[1] > 0

    def check_parameters(self, module: torch.nn.Module, step: int, why: str) -> None:
        """Collective: raise :class:`NonFiniteError` on every rank if any rank's weights hold NaN/Inf."""
        bad = nonfinite_parameters(module)
        count = all_reduce_max(torch.tensor([float(len(bad))], device=self.device)).item()
        if count:
            where = f" (on this rank: {', '.join(bad)})" if bad else ""
            raise NonFiniteError(
                f"step {step}: the weights hold NaN/Inf{where}; {why}. Nothing was saved; {self._last_good()} "
                "Lower the learning rate or tighten gradient_clipping in the DeepSpeed JSON")

    def _last_good(self) -> str:
        last = self.last_checkpoint()
        if last is None:
            return "no checkpoint of this run exists yet."
        return f"the last good checkpoint is {last} (--resume continues from it)."

    def scalars(self) -> dict[str, Any]:
        """What the trainer logs in ``skip`` mode: the running count of skipped steps."""
        return {"train/skipped_nonfinite_steps": float(self.skipped)} if self.mode == "skip" else {}
