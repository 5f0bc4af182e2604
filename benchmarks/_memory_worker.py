"""Worker process for peak-memory measurements (see :mod:`benchmarks.common`).

Reads ``{"module", "jobs", "threads", "fresh"}`` as JSON on stdin, builds each
job's step with ``<module>.build_step(job, device)``, runs one warm-up step,
then measures one step, and prints ``RESULT [mib, ...]``.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    from benchmarks.common import measure_peak_mb, pick_device, setup_threads

    spec = json.loads(sys.stdin.read())
    setup_threads(int(spec["threads"]))
    module = importlib.import_module(spec["module"])
    device = pick_device()
    results: list[float] = []
    for job in spec["jobs"]:
        step = module.build_step(job, device)
        step()  # warm-up: lazy initialisation and gradient buffers are not a per-step cost
        results.append(measure_peak_mb(step, device, fresh_process=bool(spec["fresh"])))
        del step
        gc.collect()
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
