"""Run the hmoe-ds benchmarks and print their tables.

    .venv/bin/python -m benchmarks.run_all            # full (~15-20 min on 2 CPU cores)
    .venv/bin/python -m benchmarks.run_all --quick    # smoke run, ~1 min
    .venv/bin/python -m benchmarks.run_all --only layer --threads 1 --json out.json
    .venv/bin/python -m benchmarks.run_all --only memory    # per-rank peak RSS of the training job (~40 min)

Device: CUDA when available (else CPU; ``HMOE_BENCH_DEVICE`` overrides);
dtype fp32 on CPU, bf16 on GPU (``HMOE_BENCH_DTYPE``). MFU needs a peak:
known GPUs are in ``benchmarks.common.PEAK_TFLOPS``; ``HMOE_PEAK_TFLOPS``
sets it for any device. Timings compare candidates measured interleaved in
one process; absolute numbers depend on what else runs on the machine (the
1-minute load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .common import Table, default_dtype, machine_summary, pick_device, setup_threads  # noqa: E402

SUITES = ("layer", "scaling", "train", "memory")


def target_summary(layer: Table) -> list[str]:
    """The issue's CPU targets, checked against the layer table."""
    h = layer.headers
    col = {name: h.index(name) for name in ("T", "E", "d", "HMoE", "HMoE/floor", "HMoE/DS")}
    lines = []
    target_rows = [r for r in layer.rows if r[col["T"]] == 8192 and r[col["E"]] == 8 and r[col["HMoE"]] == "top-k"]
    if target_rows:
        for r in target_rows:
            ok = r[col["HMoE/floor"]] <= 1.25
            lines.append(f"HMoE top-k within 1.25x of the dense floor at E=8, T=8k, d={r[col['d']]}: "
                         f"{r[col['HMoE/floor']]:.2f}x -> {'MET' if ok else 'MISSED'}")
    else:
        lines.append("HMoE within 1.25x of the dense floor at E=8, T=8k: not measured in this mode")
    dropless = [r for r in layer.rows if r[col["HMoE"]] in ("top-k", "top-p")]
    slower = [r for r in dropless if not r[col["HMoE/DS"]] < 1.0]
    lines.append(
        f"HMoE (dropless top-k/top-p) faster than DeepSpeed MoE: {len(dropless) - len(slower)}/{len(dropless)} rows"
        + ("" if not slower else "; not faster at " + ", ".join(
            f"T={r[col['T']]} E={r[col['E']]} d={r[col['d']]} {r[col['HMoE']]} ({r[col['HMoE/DS']]:.2f}x)" for r in slower))
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny grids, few repeats (smoke test)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--only", nargs="+", choices=SUITES, default=None,
                        help="suites to run (default: layer scaling; train and memory only when asked)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory worker processes")
    parser.add_argument("--json", default=None, help="also write every table to this JSON file")
    parser.add_argument("--wait-quiet", type=float, default=None, metavar="S",
                        help="before each timing round wait up to S seconds for other processes to go idle "
                             "(shared machines; default 0 = never wait)")
    args = parser.parse_args(argv)
    if args.wait_quiet is not None:
        os.environ["HMOE_BENCH_WAIT_QUIET"] = str(args.wait_quiet)
    suites = args.only or ["layer", "scaling"]

    threads = setup_threads(args.threads)
    device = pick_device()
    print(f"hmoe-ds benchmarks ({'quick' if args.quick else 'full'}): {machine_summary(device, default_dtype(device))}")
    print(f"command: {' '.join([os.path.basename(sys.executable), '-m', 'benchmarks.run_all'] + sys.argv[1:])}\n",
          flush=True)
    tables: list[Table] = []
    start = time.time()
    layer_table = None
    if "layer" in suites:
        from . import bench_layer

        layer_table = bench_layer.run(args.quick, threads, not args.no_memory)
        tables.append(layer_table)
        print(layer_table.render() + "\n", flush=True)
    if "scaling" in suites:
        from . import bench_scaling

        for table in bench_scaling.run(args.quick, threads, not args.no_memory):
            tables.append(table)
            print(table.render() + "\n", flush=True)
    if "train" in suites:
        from . import bench_train

        table = bench_train.run(args.quick)
        tables.append(table)
        print(table.render() + "\n", flush=True)
    if "memory" in suites:
        from . import bench_memory

        for table in bench_memory.run(args.quick):
            tables.append(table)
            print(table.render() + "\n", flush=True)
    if layer_table is not None:
        print("### Targets (CPU, from the issue)\n")
        for line in target_summary(layer_table):
            print("* " + line)
    print(f"\ntotal {time.time() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quick": args.quick, "threads": threads, "device": str(device),
                       "tables": [t.as_dict() for t in tables]}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
