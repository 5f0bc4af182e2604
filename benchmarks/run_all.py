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


#: The issue's CPU targets for HMoE top-2 / dense floor: (E, d or None for any, T) -> bound.
FLOOR_TARGETS = {(32, 512, 8192): 1.3, (32, 256, 2048): 1.5, (8, None, 2048): 1.1, (8, None, 8192): 1.0}


def target_summary(layer: Table) -> list[str]:
    """The issue's CPU targets (grouped expert path), checked against the layer table."""
    h = layer.headers
    col = {name: h.index(name) for name in ("T", "E", "d", "HMoE/floor", "HMoE/DS", "HMoE/plain", "HMoE MiB",
                                            "plain MiB")}
    lines = []
    for (experts, d_model, tokens), bound in FLOOR_TARGETS.items():
        rows = [r for r in layer.rows if r[col["E"]] == experts and r[col["T"]] == tokens
                and (d_model is None or r[col["d"]] == d_model)]
        where = f"E={experts}, T={tokens}"
        if not rows:
            d_any = "" if d_model is None else f", d={d_model}"
            lines.append(f"HMoE top-2 at most {bound}x the dense floor at {where}{d_any}: not measured in this mode")
        for r in rows:
            ratio = r[col["HMoE/floor"]]
            lines.append(f"HMoE top-2 at most {bound}x the dense floor at {where}, d={r[col['d']]}: {ratio:.2f}x -> "
                         f"{'MET' if ratio <= bound else 'MISSED'}")
    comparisons = [("HMoE/DS", "DeepSpeed MoE"), ("HMoE/plain", "the plain per-expert loop")]
    if "HMoE/DS dropless" in h:  # tables written before the column existed have no such comparison
        col["HMoE/DS dropless"] = h.index("HMoE/DS dropless")
        comparisons.insert(1, ("HMoE/DS dropless", "DeepSpeed MoE without drops"))
    for name, label in comparisons:
        slower = [r for r in layer.rows if not r[col[name]] < 1.0]
        lines.append(f"HMoE faster than {label}: {len(layer.rows) - len(slower)}/{len(layer.rows)} rows" + (
            "" if not slower else "; not at " + ", ".join(
                f"T={r[col['T']]} E={r[col['E']]} d={r[col['d']]} ({r[col[name]]:.2f}x)" for r in slower)))
    measured = [r for r in layer.rows if r[col["HMoE MiB"]] == r[col["HMoE MiB"]]]  # not NaN
    higher = [r for r in measured if r[col["HMoE MiB"]] > r[col["plain MiB"]]]
    if measured:
        lines.append(f"HMoE peak memory no higher than the plain loop's: {len(measured) - len(higher)}/{len(measured)} "
                     "rows" + ("" if not higher else "; higher at " + ", ".join(
                         f"T={r[col['T']]} E={r[col['E']]} d={r[col['d']]} ({r[col['HMoE MiB']]:.0f} vs "
                         f"{r[col['plain MiB']]:.0f} MiB)" for r in higher)))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny grids, few repeats (smoke test)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--only", nargs="+", choices=SUITES, default=None,
                        help="suites to run (default: layer scaling; train and memory only when asked)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory worker processes")
    parser.add_argument("--layer-configs", nargs="+", default=None, metavar="T,E,D",
                        help="layer benchmark points (tokens,experts,d_model) instead of the default grid")
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

        configs = None
        if args.layer_configs:
            configs = [bench_layer.LayerConfig(*(int(v) for v in spec.split(","))) for spec in args.layer_configs]
        layer_table = bench_layer.run(args.quick, threads, not args.no_memory, configs=configs)
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
