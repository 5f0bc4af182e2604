"""Shared benchmark machinery: device choice, interleaved timing, peak memory, FLOP/s, tables.

Timing method: every candidate of one configuration lives in the same process
and is timed *interleaved* (one sample of each in turn, rotating the start
so no candidate always runs first) after warm-up; the reported figure is the
median of the samples, each sample averaging enough back-to-back steps to last
``min_sample_s``. On CUDA every sample is bracketed by ``torch.cuda.synchronize``.

Peak-memory method (see :func:`measure_peak_mb`): on CPU, the peak resident
set size *above the level before the step* of one forward+backward, measured
in a fresh worker process started with a fixed glibc mmap threshold (so
freed tensors go back to the OS and RSS tracks live memory). The peak is the
kernel's ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; where
that reset is not allowed each candidate gets its own process and
``resource.getrusage(...).ru_maxrss`` is used. ``tracemalloc`` does not see
torch's allocations. On CUDA: ``torch.cuda.max_memory_allocated`` minus the
allocation before the step.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

StepFn = Callable[[], None]

# Environment for memory workers: a fixed mmap threshold disables glibc's
# dynamic threshold, so every large buffer is mmap'ed and unmapped on free.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) from vendor datasheets,
# matched as a substring of torch.cuda.get_device_name(). Override with
# HMOE_PEAK_TFLOPS (also the only way to get an MFU on CPU).
PEAK_TFLOPS: dict[str, float] = {
    "B200": 2250.0,
    "H200": 989.0,
    "H100": 989.0,  # SXM; PCIe is 756: set HMOE_PEAK_TFLOPS
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "V100": 125.0,  # fp16
    "T4": 65.0,  # fp16
}


def pick_device() -> torch.device:
    """CUDA when available, else CPU; ``HMOE_BENCH_DEVICE`` overrides."""
    name = os.environ.get("HMOE_BENCH_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on GPU (``HMOE_BENCH_DTYPE`` overrides: float32/bfloat16/float16)."""
    name = os.environ.get("HMOE_BENCH_DTYPE")
    if name:
        return getattr(torch, name)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup_threads(threads: int) -> int:
    """Set torch's intra-op thread count (CPU) and return it."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine_summary(device: torch.device, dtype: torch.dtype) -> str:
    """One line saying what the numbers were measured on."""
    import deepspeed

    if device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{where}; torch {torch.__version__} ({torch.get_num_threads()} threads), deepspeed {deepspeed.__version__}, "
        f"dtype {str(dtype).removeprefix('torch.')}, 1-min load average at start {load:.1f}"
    )


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


class CpuMeter:
    """Share of the machine's CPU time used by *other* processes between ``start()`` and ``stop()`` (Linux).

    Read from ``/proc/stat`` (all CPUs) minus this process's own ``utime +
    stime``; NaN where ``/proc`` is missing. Printed with every table: above
    a few percent, other jobs were competing for the cores and timings of
    many-small-op layers (MoE) suffer more than those of one big GEMM.
    """

    def __init__(self) -> None:
        self._start: tuple[int, int, int] | None = None

    @staticmethod
    def _snapshot() -> tuple[int, int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(values), sum(values) - values[3] - values[4], int(fields[11]) + int(fields[12])

    def start(self) -> None:
        try:
            self._start = self._snapshot()
        except OSError:
            self._start = None

    def stop(self) -> float:
        """Percent of total CPU capacity used by other processes since ``start()``."""
        if self._start is None:
            return float("nan")
        total, busy, own = (b - a for a, b in zip(self._start, self._snapshot()))
        return 100.0 * max(0, busy - own) / max(total, 1)


def wait_until_quiet(max_wait_s: float, threshold_pct: float = 10.0, window_s: float = 1.0) -> float:
    """Sleep (up to ``max_wait_s``) until other processes use < ``threshold_pct`` of the CPU; return the last reading."""
    meter = CpuMeter()
    deadline = time.monotonic() + max_wait_s
    while True:
        meter.start()
        time.sleep(window_s)
        busy = meter.stop()
        if not busy >= threshold_pct or time.monotonic() >= deadline:
            return busy


@dataclass
class Timings:
    """Result of :func:`time_interleaved`: median (and min) seconds per call, and the contention seen."""

    median_s: dict[str, float]
    min_s: dict[str, float]
    others_cpu_pct: float

    def __getitem__(self, name: str) -> float:
        return self.median_s[name]

    def __contains__(self, name: object) -> bool:
        return name in self.median_s


def time_interleaved(
    steps: Mapping[str, StepFn],
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int = 5,
    min_sample_s: float = 0.05,
    max_inner: int = 50,
    wait_quiet_s: float | None = None,
) -> Timings:
    """Median seconds per call of each step, sampled round-robin in one process.

    Each candidate is warmed up ``warmup`` times; one sample then runs ``n``
    back-to-back calls (``n`` chosen so a sample lasts at least
    ``min_sample_s``), and the ``repeats`` samples of all candidates are
    interleaved, the starting candidate rotating each round. With
    ``wait_quiet_s`` (default: env ``HMOE_BENCH_WAIT_QUIET``, seconds), each
    round first waits up to that long for other processes to go idle.
    """
    if wait_quiet_s is None:
        wait_quiet_s = float(os.environ.get("HMOE_BENCH_WAIT_QUIET", "0"))
    names = list(steps)
    inner: dict[str, int] = {}
    for name in names:
        for _ in range(max(warmup, 1)):
            sync(device)
            start = time.perf_counter()
            steps[name]()
            sync(device)
            elapsed = time.perf_counter() - start
        inner[name] = max(1, min(max_inner, math.ceil(min_sample_s / max(elapsed, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    meter, busy = CpuMeter(), 0.0
    for rep in range(repeats):
        if wait_quiet_s > 0:
            wait_until_quiet(wait_quiet_s)
        meter.start()
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            fn, n = steps[name], inner[name]
            sync(device)
            start = time.perf_counter()
            for _ in range(n):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) / n)
        busy += meter.stop() / repeats
    return Timings(
        median_s={name: median(v) for name, v in samples.items()},
        min_s={name: min(v) for name, v in samples.items()},
        others_cpu_pct=busy,
    )


def peak_tflops(device: torch.device) -> float | None:
    """Peak FLOP/s (in TFLOP/s) for MFU: ``HMOE_PEAK_TFLOPS`` or the GPU table, else None."""
    env = os.environ.get("HMOE_PEAK_TFLOPS")
    if env:
        return float(env)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def swiglu_train_flops(tokens: float, d_model: int, hidden: float) -> float:
    """FLOPs of forward+backward of a SwiGLU FFN (3 matmuls of d x h): 3 x (2 x 3 d h) per token."""
    return 18.0 * tokens * d_model * hidden


# --------------------------------------------------------------------------- memory


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def hwm_reset_supported() -> bool:
    """True when this process may reset its peak-RSS counter (``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_mb("VmHWM")
        return True
    except OSError:
        return False
    except KeyError:
        return False


def measure_peak_mb(step: StepFn, device: torch.device, *, fresh_process: bool = False) -> float:
    """Peak memory (MiB) of one ``step()`` above the memory in use just before it.

    Call after a warm-up step (one-time allocations excluded). CPU: VmHWM
    after a reset, or ``ru_maxrss`` when ``fresh_process`` (the caller
    guarantees nothing bigger ran before in this process). CUDA: the caching
    allocator's peak.
    """
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    base = _proc_status_mb("VmRSS")
    if fresh_process:
        step()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return _proc_status_mb("VmHWM") - base


def run_memory_jobs(module: str, jobs: Sequence[dict[str, Any]], threads: int, per_job_process: bool = False) -> list[float]:
    """Peak MiB of each job, measured in fresh worker process(es).

    ``module`` must define ``build_step(job: dict, device) -> StepFn``. One
    worker measures all ``jobs`` in turn (the peak counter is reset between
    them); with ``per_job_process`` (or when the reset is not allowed) each
    job gets its own process.
    """
    if not jobs:
        return []
    if not per_job_process and not hwm_reset_supported() and pick_device().type == "cpu":
        per_job_process = True
    groups = [[job] for job in jobs] if per_job_process else [list(jobs)]
    results: list[float] = []
    env = {**os.environ, **WORKER_ENV}
    for group in groups:
        payload = json.dumps({"module": module, "jobs": group, "threads": threads, "fresh": per_job_process})
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks._memory_worker"],
            input=payload, capture_output=True, text=True, env=env, check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        results.extend(json.loads(line[len("RESULT "):]))
    return results


# --------------------------------------------------------------------------- output


@dataclass
class Table:
    """A titled table printed as GitHub markdown (copy-paste into reports)."""

    title: str
    headers: list[str]
    rows: list[list[Any]]
    notes: list[str]

    def render(self) -> str:
        cells = [[_fmt(v) for v in row] for row in self.rows]
        widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(self.headers)]
        line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
        out = [f"### {self.title}", "", line(self.headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in cells]
        out += [""] + [f"* {n}" for n in self.notes]
        return "\n".join(out)

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "headers": self.headers, "rows": self.rows, "notes": self.notes}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)
