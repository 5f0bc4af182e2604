"""GPU check: train the quickstart model on one GPU (NCCL, bf16), benchmark the layer there, report MFU.

    .venv/bin/python -m benchmarks.gpu_check [--steps 200] [--no-layer] [--json out.json]

One command for a CUDA machine (set up with ``./run/setup.sh``, which installs
the CUDA build of the pinned torch when a GPU is present). It runs:

1. ``deepspeed --num_gpus 1 run/train.py`` on ``run/configs/quickstart.yaml``
   with ``ds_configs/zero2_bf16.json`` (ZeRO-2, bf16; DeepSpeed's CUDA
   accelerator, so the process group is NCCL), ``ep_size=1``, for ``--steps``
   steps (default 200), and reads throughput from the run's ``metrics.jsonl``.
   Training MFU = tokens/s x FLOPs per token / peak, with FLOPs per token
   ``6 N + 6 L d S``: N the parameters a token activates
   (``moe/activated_params_per_token``: non-expert parameters plus the
   experts the router chose, so Top-P's variable expert count is counted as
   it happened) and ``6 L d S`` the causal attention matmuls (L layers,
   width d, sequence length S).
2. The layer benchmark (:mod:`benchmarks.bench_layer`) on the GPU in bf16
   (the grid's E=8/32/64 rows at d=512, 8k tokens, plus d=1024), whose MFU
   column counts the useful expert FLOPs.

The peak is the dense bf16 tensor-core figure of the GPU
(:data:`benchmarks.common.PEAK_TFLOPS`, e.g. 989 TFLOP/s for H100 SXM / H200),
or ``HMOE_PEAK_TFLOPS``. Without CUDA it says so and exits 0: nothing here is
meaningful on a CPU (``benchmarks.run_all`` is the CPU benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "run" / "configs" / "quickstart.yaml"
DS_CONFIG = REPO / "ds_configs" / "zero2_bf16.json"
TRAIN = REPO / "run" / "train.py"

NO_CUDA_MESSAGE = ("GPU check: no CUDA device is visible (torch.cuda.is_available() is False), so nothing was run. "
                   "Run this command on a machine with an NVIDIA GPU; the CPU benchmarks are "
                   "`python -m benchmarks.run_all`.")


def train_flops_per_token(activated_params: float, layers: int, d_model: int, seq_len: int) -> float:
    """``6 N + 6 L d S``: weight matmuls forward+backward, plus causal attention (QK^T and AV, half the square)."""
    return 6.0 * activated_params + 6.0 * layers * d_model * seq_len


def train_on_gpu(out_dir: Path, steps: int) -> dict[str, Any]:
    """One single-GPU training run through the deepspeed launcher; throughput and MFU from its metrics."""
    import yaml

    from .bench_train import _free_port, throughput_records
    from .common import peak_tflops

    import torch

    log_every = max(1, steps // 10)
    overrides = [
        f"run.output_dir={out_dir}", f"run.train_steps={steps}", f"run.log_every={log_every}", "run.eval_every=0",
        "run.eval_batches=10", "run.eval_at_start=false", "run.save_every=0", "run.progress_bar=false",
        "model.moe.ep_size=1",
    ]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(_free_port()),
           str(TRAIN), "--config", str(CONFIG), "--deepspeed_config", str(DS_CONFIG), "--set", *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cuda"}
    print("$ " + " ".join(cmd), flush=True)
    points = throughput_records(cmd, env, out_dir)
    experiment = yaml.safe_load(CONFIG.read_text())
    model = experiment["model"]
    seq_len = int(experiment["data"]["block_size"])
    tokens_per_s = statistics.median(r["perf/tokens_per_s"] for r in points)
    activated = statistics.mean(r["moe/activated_params_per_token"] for r in points)
    flops = train_flops_per_token(activated, int(model["num_hidden_layers"]), int(model["hidden_size"]), seq_len)
    peak = peak_tflops(torch.device("cuda"))
    losses = [r["train/lm_loss"] for r in points]
    return {
        "gpu": torch.cuda.get_device_name(0), "steps": steps, "tokens_per_s": tokens_per_s,
        "activated_params_per_token": activated, "train_flops_per_token": flops,
        "achieved_tflops": tokens_per_s * flops / 1e12,
        "mfu_percent": None if peak is None else 100.0 * tokens_per_s * flops / (peak * 1e12),
        "peak_tflops": peak, "first_lm_loss": losses[0], "last_lm_loss": losses[-1],
        "bf16": bool(json.loads(DS_CONFIG.read_text())["bf16"]["enabled"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps of the quickstart model (default 200)")
    parser.add_argument("--no-layer", action="store_true", help="skip the layer benchmark")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE)
        return 0
    from hmoe_ds.env import configure_environment

    configure_environment()
    os.environ.setdefault("HMOE_BENCH_DTYPE", "bfloat16")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hmoe_gpu_check_") as tmp:
        train = train_on_gpu(Path(tmp) / "train", args.steps)
    results["train"] = train
    mfu = "n/a (unknown GPU: set HMOE_PEAK_TFLOPS)" if train["mfu_percent"] is None else f"{train['mfu_percent']:.1f}%"
    print(f"\n### Training on {train['gpu']} (1 GPU, NCCL, bf16, ZeRO-2), quickstart model, {train['steps']} steps\n")
    print(f"* tokens/s {train['tokens_per_s']:.0f}; {train['train_flops_per_token'] / 1e6:.1f} MFLOP/token "
          f"(6N + 6LdS, N = {train['activated_params_per_token'] / 1e6:.2f}M activated params); "
          f"{train['achieved_tflops']:.2f} TFLOP/s; MFU {mfu}")
    print(f"* lm loss {train['first_lm_loss']:.3f} -> {train['last_lm_loss']:.3f}\n", flush=True)
    if not args.no_layer:
        from . import bench_layer
        from .bench_layer import LayerConfig

        configs = [LayerConfig(8192, 8, 512), LayerConfig(8192, 32, 512), LayerConfig(8192, 64, 512),
                   LayerConfig(8192, 32, 1024)]
        table = bench_layer.run(quick=False, threads=0, memory=True, configs=configs, bf16=False)  # already bf16
        print(table.render(), flush=True)
        results["layer"] = table.as_dict()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
