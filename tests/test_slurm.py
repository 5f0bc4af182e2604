"""The Slurm batch script on one machine: ``run/train.sbatch`` under stand-ins for ``srun`` and ``scontrol``.

``sbatch`` does not exist here, so Slurm itself is not exercised. What runs is
the script's own logic, unchanged: ``run/train.sbatch`` with the environment a
two-node allocation gives it (``SLURM_SUBMIT_DIR``, ``SLURM_JOB_ID``,
``SLURM_NNODES``, ``SLURM_JOB_NODELIST``), a stand-in ``srun`` that starts its
command once per "node" with ``SLURM_NODEID`` set (as ``srun
--ntasks-per-node=1`` does) and a stand-in ``scontrol show hostnames``. Each
node's ``run/slurm_node.sh`` then starts DeepSpeed's per-node launcher with
``--world_info``/``--node_rank``/``--master_addr``, one rank per node, each node
with its own data cache (no shared file system for data): world 2, EP 2 across
the two "nodes", local rank 0 on both, ZeRO-3. The step losses must equal the same
run started by the ``deepspeed`` runner on one node (the session's ZeRO-3 EP 2
reference run, ``tests/checkpoint_runs.py``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from . import checkpoint_runs
from . import launcher as L
from .checkpoint_runs import Run
from .distributed import free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in for `srun --nodes=N --ntasks-per-node=1 ... CMD ARGS`: CMD once per node, SLURM_NODEID set,
# each node with its own data cache; fails if any node fails (as --kill-on-bad-exit=1 reports).
while [[ "$1" == --* ]]; do echo "srun option: $1" >> "$FAKE_SLURM_LOG"; shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node HMOE_DS_CACHE="$FAKE_CACHE_ROOT/node$node" "$@" > "$FAKE_SLURM_LOG.node$node" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
# Stand-in for `scontrol show hostnames node[1-2]`.
[ "$1 $2 $3" = "show hostnames node[1-2]" ] || { echo "unexpected scontrol $*" >&2; exit 1; }
printf 'node1\\nnode2\\n'
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_sbatch_script_starts_one_per_node_launcher_per_node(tmp_path: Path, zero3_ep2_run: Run) -> None:
    # The session's ZeRO-3 EP 2 reference run, started by the deepspeed runner on one node, for its first 4 steps.
    exp = checkpoint_runs.experiment()
    exp["run"].update(train_steps=4, save_every=0)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    exp_file, ds_file = L.write_configs(tmp_path / "slurm", exp, zero3_ep2_run.ds)
    log = tmp_path / "slurm.log"
    env = L.environment(zero3_ep2_run.cache)
    env.pop("HMOE_DS_CACHE")
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_SUBMIT_DIR=str(L.REPO), SLURM_JOB_ID="4242",
               SLURM_NNODES="2", SLURM_JOB_NODELIST="node[1-2]", RANKS_PER_NODE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), FAKE_SLURM_LOG=str(log), FAKE_CACHE_ROOT=str(tmp_path / "caches"))
    proc = L.run(["bash", str(L.REPO / "run" / "train.sbatch"), "--config", str(exp_file), "--deepspeed_config",
                  str(ds_file), "--set", f"run.output_dir={tmp_path / 'slurm' / 'out'}"], env, timeout=600)
    nodes = [Path(f"{log}.node{n}").read_text() if Path(f"{log}.node{n}").exists() else "" for n in (0, 1)]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + nodes[0][-3000:] + nodes[1][-3000:]

    assert "srun option: --ntasks-per-node=1" in log.read_text()
    assert "--kill-on-bad-exit=1" in log.read_text()
    for n, text in enumerate(nodes):
        assert f"[slurm_node] node {n} of 2 (node{n + 1}): 1 rank(s), master 127.0.0.1" in text, text[-2000:]
    # Each node built its own data cache.
    for n in (0, 1):
        assert any((tmp_path / "caches" / f"node{n}").iterdir()), f"node {n} built no data cache"

    def losses(out: Path) -> dict[int, float]:
        return {r["step"]: r["train/lm_loss"] for r in L.read_metrics(out) if "train/lm_loss" in r}

    expected, got = losses(zero3_ep2_run.out), losses(tmp_path / "slurm" / "out")
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), (step, got, expected)
