"""End-to-end training throughput: HMoE vs a homogeneous MoE, EP=1 and EP=2, 2 ranks.

    .venv/bin/python -m benchmarks.bench_train [--steps 40] [--repeats 1]
    .venv/bin/python -m benchmarks.run_all --only train

Each run is ``deepspeed --num_accelerators 2 run/train.py`` on
``run/configs/quickstart.yaml`` (DeepSpeed config ``ds_configs/cpu_default.json``)
for a few steps, with evaluation and checkpoints left to the end (the
trainer keeps them out of tokens/s). The homogeneous MoE has 8 experts of the
mean HMoE width (same total and, under uniform routing, the same activated
parameters), the same routing and losses. Throughput is the median of
``perf/tokens_per_s`` over the logged points of ``<output_dir>/metrics.jsonl``
after the first (warm-up) one; runs are interleaved (HMoE, MoE, HMoE, MoE ...)
so slow drifts of the machine hit both equally.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hmoe_ds.env import configure_environment
from hmoe_ds.training.metrics import read_jsonl

from .common import Table

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "run" / "configs" / "quickstart.yaml"
DS_CONFIG = REPO / "ds_configs" / "cpu_default.json"
TRAIN = REPO / "run" / "train.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quickstart_sizes() -> list[int]:
    import yaml

    from hmoe_ds.sizes import parse_expert_sizes

    return parse_expert_sizes(yaml.safe_load(CONFIG.read_text())["model"]["moe"]["expert_sizes"])



def throughput_records(cmd: list[str], env: dict[str, str], out_dir: Path) -> list[dict[str, Any]]:
    """Run a ``run/train.py`` launch; return its logged throughput records, the first (warm-up) one dropped."""
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"training run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    points = [r for r in read_jsonl(out_dir / "metrics.jsonl") if "perf/tokens_per_s" in r]
    if len(points) < 2:
        raise RuntimeError(f"{out_dir}/metrics.jsonl has {len(points)} throughput points; raise --steps")
    return points[1:]

def launch(out_dir: Path, steps: int, log_every: int, ep_size: int, expert_sizes: list[int]) -> dict[str, Any]:
    """One 2-rank training run; returns throughput and routing figures from its metrics.jsonl."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    overrides = [
        f"run.output_dir={out_dir}", f"run.train_steps={steps}", f"run.log_every={log_every}",
        "run.eval_every=0", "run.eval_batches=1", "run.eval_at_start=false", "run.save_every=0",
        "run.progress_bar=false", f"model.moe.ep_size={ep_size}", f"model.moe.expert_sizes={json.dumps(expert_sizes)}",
    ]
    cmd = [str(deepspeed), "--num_accelerators", "2", "--master_port", str(_free_port()), str(TRAIN),
           "--config", str(CONFIG), "--deepspeed_config", str(DS_CONFIG), "--set", *overrides]
    configure_environment()  # CPU accelerator without CUDA, offline hubs (as run/env.sh)
    env = dict(os.environ)
    train = throughput_records(cmd, env, out_dir)
    return {
        "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in train),
        "activated": statistics.mean(r.get("moe/activated_params_per_token", float("nan")) for r in train),
        "experts_per_token": statistics.mean(r.get("moe/mean_experts_per_token", float("nan")) for r in train[1:]),
        "lm_loss": train[-1].get("train/lm_loss", float("nan")),
    }


def run(quick: bool = False, steps: int | None = None, repeats: int = 1) -> Table:
    """Train each variant ``repeats`` times (interleaved) and tabulate tokens/s."""
    title = "End-to-end training throughput, 2 CPU ranks (quickstart model)"
    if not (TRAIN.exists() and CONFIG.exists() and DS_CONFIG.exists()):
        return Table(title, ["status"], [["skipped: run/train.py or its configs are missing"]], [])
    steps = steps or (12 if quick else 40)
    log_every = max(1, steps // 6)
    hetero = _quickstart_sizes()
    homo = [round(sum(hetero) / len(hetero))] * len(hetero)
    variants = {"HMoE": hetero, "MoE (homogeneous)": homo}
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="hmoe_bench_train_") as tmp:
        for rep in range(repeats):
            for ep in (1, 2):
                for name, sizes in variants.items():
                    out = Path(tmp) / f"{name.split()[0]}_ep{ep}_{rep}"
                    results.setdefault((name, ep), []).append(launch(out, steps, log_every, ep, sizes))
                    print(f"  train {name} EP={ep} repeat {rep} done", flush=True)
    rows: list[list[Any]] = []
    for ep in (1, 2):
        base = statistics.median(r["tokens_per_s"] for r in results[("MoE (homogeneous)", ep)])
        for name, sizes in variants.items():
            rs = results[(name, ep)]
            tps = statistics.median(r["tokens_per_s"] for r in rs)
            rows.append([ep, name, str(sizes), statistics.mean(r["experts_per_token"] for r in rs),
                         statistics.mean(r["activated"] for r in rs) / 1e6, tps, tps / base])
    return Table(
        title,
        ["EP", "model", "expert sizes", "exp/tok", "activated M", "tokens/s", "vs MoE"],
        rows,
        [f"{steps} steps per run, tokens/s = median of metrics.jsonl perf/tokens_per_s after the first log point; "
         f"{repeats} interleaved run(s) per variant", "activated M: moe/activated_params_per_token (millions)",
         f"config {CONFIG.relative_to(REPO)}, {DS_CONFIG.relative_to(REPO)}; same routing and losses for both"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(run(args.quick, args.steps, args.repeats).render())


if __name__ == "__main__":
    main()
