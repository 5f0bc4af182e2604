"""The GPU check command: on a machine without CUDA it says so and succeeds (it was not run on a GPU here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would train on it")
def test_gpu_check_without_cuda_says_so_and_exits_0() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CUDA device" in proc.stdout and "nothing was run" in proc.stdout


def test_train_flops_per_token_counts_weights_and_causal_attention() -> None:
    from benchmarks.gpu_check import train_flops_per_token

    # 6 N for the weight matmuls (forward 2N, backward 4N) + 6 L d S for QK^T and AV (half the square, causal).
    assert train_flops_per_token(1e6, layers=4, d_model=128, seq_len=128) == 6e6 + 6 * 4 * 128 * 128
