"""Rank-0 sections that every rank waits for: the result, or the failure, reaches every rank.

Training and checkpointing have steps that only rank 0 performs (checking the
output directory, writing the probe, tokenizer and the completion marker)
while the other ranks wait. If rank 0 fails there and the others wait in a
plain barrier, they hang until the collective timeout. :func:`on_rank0`
broadcasts the outcome instead, so every rank stops at once with an error.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from .training.experiment import ExperimentError

__all__ = ["on_rank0"]

T = TypeVar("T")


def on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and give every rank its result (a plain call when not distributed).

    An :class:`ExperimentError` (a user mistake, e.g. a bad checkpoint) is raised
    on every rank with its message. Any other exception (a bug, a full disk) is
    re-raised on rank 0 with its traceback, and the other ranks stop with a
    ``RuntimeError`` naming it. Collective: every rank must call it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    payload: list[Any] = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            payload = [("ok", fn())]
        except ExperimentError as exc:
            failure, payload = exc, [("error", str(exc))]
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks are told
            failure, payload = exc, [("crash", f"{type(exc).__name__}: {exc}")]
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if failure is not None:
        raise failure
    if status == "error":
        raise ExperimentError(value)
    if status == "crash":
        raise RuntimeError(f"rank 0 failed ({value}); see its traceback")
    return value
