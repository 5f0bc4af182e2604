"""The errors a user can cause, in one place: every module raises these, none defines its own.

Each is a mistake the user can fix (a key in the experiment YAML, the DeepSpeed
JSON, a checkpoint that does not fit, a hostfile line). Its message is complete:
it names the file or key and says what to do, so the command-line drivers print
it as one ``error:`` line and exit 2, without a traceback. Anything else that
escapes is a bug and keeps its traceback.

This module imports nothing from the package, so the lowest layers
(:mod:`hmoe_ds.checkpoint`, :mod:`hmoe_ds.collectives`, :mod:`hmoe_ds.hostfile`)
raise the same types that the training loop and the drivers catch.

``ExperimentError`` and its subclasses travel between ranks by message
(:func:`hmoe_ds.collectives.on_rank0`): a user mistake found by rank 0 stops
every rank with the same line.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ExperimentError",
    "HostfileError",
    "LaunchError",
    "NonFiniteError",
    "RunDirLocked",
]


class ExperimentError(Exception):
    """A user mistake in the experiment, the DeepSpeed config or the output directory.

    The message is complete (file, key, fix); callers print it as is.
    """


class CheckpointError(ExperimentError):
    """A checkpoint that cannot be used as asked; the message names the file or the mismatch and the fix."""


class RunDirLocked(ExperimentError):
    """Another live run holds the output directory."""


class NonFiniteError(ExperimentError):
    """The run produced NaN/Inf; the message names the step, what was non-finite and the last good checkpoint."""


class LaunchError(ValueError):
    """A launch that would fail (``python -m hmoe_ds.launch``); the message says why and how to fix it."""


class HostfileError(ValueError):
    """A hostfile that the deepspeed runner would refuse, with where and why."""
