"""Opt-in per-phase peak-memory log of a training process, read from the OS (Linux ``/proc``).

Set ``HMOE_DS_MEMORY_LOG=<file>`` and every rank of ``run/train.py`` appends one
JSON line per phase boundary to ``<file>``::

    {"rank": 0, "pid": 1234, "phase": "train", "step": 1, "vmhwm_mib": 2650.1, "vmrss_mib": 2410.7,
     "rssshmem_mib": 12.0, "reset": true, "time": 1767220000.1}

``vmhwm_mib`` is the process's peak resident set size (``VmHWM``) over the
interval that *ends* at the mark: after each mark the kernel's high-water
mark is reset to the current RSS (``echo 5 > /proc/self/clear_refs``), so
the next mark's peak belongs to the next phase alone. ``reset`` says
whether that reset was allowed; where it is not, every later ``vmhwm_mib`` is
the peak since the process started. ``rssshmem_mib`` is the shared-memory
part of the current RSS (DeepSpeed's CPU collectives use ``/dev/shm``), which
every rank that touches a segment counts.

The trainer marks: ``build`` (process start to engine built: imports, data,
model, ``deepspeed.initialize``), ``resume`` (checkpoint load), ``train``
(each optimizer step), ``eval`` and ``save`` (each checkpoint, including
the metrics written since the step before it). ``benchmarks/bench_memory.py``
reads the file.

Unset (the default) :func:`mark` returns at its first test: nothing is read,
written or reset, so production runs pay nothing. The variable is read once,
when this module is imported.
"""

from __future__ import annotations

import json
import os
import time

__all__ = ["ENV_VAR", "enabled", "mark"]

ENV_VAR = "HMOE_DS_MEMORY_LOG"
_PATH = os.environ.get(ENV_VAR) or None


def enabled() -> bool:
    """True when ``HMOE_DS_MEMORY_LOG`` was set when this module was imported."""
    return _PATH is not None


def _status_mib() -> dict[str, float]:
    """VmHWM, VmRSS and RssShmem of this process in MiB (``/proc/self/status`` gives kB)."""
    wanted = {"VmHWM": "vmhwm_mib", "VmRSS": "vmrss_mib", "RssShmem": "rssshmem_mib"}
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in wanted:
                out[wanted[key]] = round(int(line.split()[1]) / 1024.0, 1)
    return out


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel (or a sandbox) does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mark(phase: str, step: int | None = None) -> None:
    """Log this process's peak RSS since the previous mark as ``phase``, then start a new interval.

    No-op unless ``HMOE_DS_MEMORY_LOG`` is set. Errors reading ``/proc`` or
    writing the log are not caught: a measurement run that cannot measure
    should fail loudly rather than produce a table with holes.
    """
    if _PATH is None:
        return
    record: dict[str, object] = {
        "rank": int(os.environ.get("RANK", "0")), "pid": os.getpid(), "phase": phase, "step": step,
        **_status_mib(),
    }
    record["reset"] = _reset_peak()
    record["time"] = round(time.time(), 3)
    # One write() of one line to an O_APPEND file: the ranks' lines never interleave.
    fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)
