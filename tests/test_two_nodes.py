"""Two "nodes" on one machine, started as pdsh starts them: DeepSpeed's per-node launcher once per node.

The ``deepspeed`` runner, given a hostfile of N nodes, runs
``deepspeed.launcher.launch --world_info ... --node_rank i --master_addr ...`` on
every node. Here both run on this machine, 2 ranks each (world 4, global
ranks 2-3 on "node 1" have local ranks 0-1), with EP 4 spanning both nodes,
under ZeRO-3 and under ZeRO-2 with CPU offload, and each node building its own data cache (no shared file system for
data; the checkpoints go to one shared directory). Checked:

* every process of node 1 SIGKILLed during step 3 (after the step-2
  checkpoint): node 0 stops within seconds with a clear error, no hang;
* a resume on both nodes continues exactly: the step losses of the two-node
  run (steps 1-2 before the loss, 3-6 after the resume) equal those of the
  same run on 4 ranks of one node.

The resumed run saves at step 4 and trains on, so this is also the test of the
first step after a save in a resumed ZeRO-3 run (it once failed there with
DeepSpeed's "tracing error": releasing the parameters an evaluation forward had
gathered also partitioned ZeRO-3's persistent parameters;
``hmoe_ds.collectives.release_gathered_parameters``).

Not covered yet: node-local checkpoint storage (DeepSpeed's
``checkpoint.use_node_local_storage``): on one machine both "nodes" see the
same directory.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import launcher as L
from .distributed import free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

NODES, PER_NODE = 2, 2
STEPS = 6


def _experiment() -> dict:
    exp = copy.deepcopy(L.EXPERIMENT)
    exp["model"]["moe"].update(expert_sizes=[32, 64, 96, 128, 32, 64, 96, 128], ep_size=4, placement="balanced")
    exp["run"].update(train_steps=STEPS, log_every=1, eval_every=0, eval_at_start=False, save_every=2)
    return exp


#: The two ZeRO set-ups multi-node users run: ZeRO-3, and ZeRO-2 with the optimizer offloaded to CPU (DeepSpeed's
#: CPU Adam, so the offload path is the real one).
ZERO: dict[str, dict] = {
    "zero3": {"stage": 3},
    "zero2_offload": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
}


def _ds(zero: str) -> dict:
    ds = copy.deepcopy(L.DS_CONFIG)
    ds["zero_optimization"] = copy.deepcopy(ZERO[zero])
    ds["gradient_accumulation_steps"] = 1
    if zero == "zero2_offload":
        ds["optimizer"]["params"].pop("torch_adam", None)
    return ds


def _start_nodes(tmp: Path, run_dir: Path, zero: str, *extra: str, env_for: dict[int, dict[str, str]] | None = None,
                 ) -> list[subprocess.Popen]:
    """One per-node launcher per node, each in its own session, output to ``tmp/node<i>.log``."""
    exp_file, ds_file = L.write_configs(tmp, _experiment(), _ds(zero))
    world_info = base64.urlsafe_b64encode(
        json.dumps({f"node{n}": list(range(PER_NODE)) for n in range(NODES)}).encode()).decode()
    port = free_port()
    procs = []
    for node in range(NODES):
        env = L.environment(tmp / f"cache_node{node}", **(env_for or {}).get(node, {}))
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", "run/train.py",
               "--config", str(exp_file), "--deepspeed_config", str(ds_file), "--set",
               f"run.output_dir={run_dir}", "run.progress_bar=false", *extra]
        log = open(tmp / f"node{node}.log", "a")
        procs.append(subprocess.Popen(cmd, cwd=L.REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
    finally:
        _kill(procs)


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["train/lm_loss"] for r in L.read_metrics(out) if "train/lm_loss" in r}


@pytest.mark.parametrize("zero", list(ZERO))
def test_two_nodes_survive_a_lost_node_and_train_like_one(tmp_path: Path, zero: str) -> None:
    reference = L.train(tmp_path / "one_node", experiment=_experiment(), ds=_ds(zero), ranks=4,
                        cache=tmp_path / "cache_one_node", timeout=600)
    assert reference.returncode == 0, L.output(reference)
    expected = _losses(tmp_path / "one_node" / "out")
    assert sorted(expected) == list(range(1, STEPS + 1))

    # Node 1 lost during step 3: its rank 2 is SIGKILLed by the test hook, then every process of node 1.
    lost = tmp_path / "lost"
    procs = _start_nodes(lost, lost / "out", zero, env_for={1: {"HMOE_DS_TEST_KILL_DURING_STEP": "3",
                                                          "HMOE_DS_TEST_KILL_RANK": "2"}})
    deadline = time.monotonic() + 600
    while "[hmoe_ds test hook]" not in (lost / "node1.log").read_text():
        assert time.monotonic() < deadline and procs[0].poll() is None, (lost / "node0.log").read_text()[-3000:]
        time.sleep(0.2)
    killed_at = time.monotonic()
    _kill(procs[1:])
    try:
        code = procs[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        _kill(procs)
        pytest.fail("node 0 still running 60 s after node 1 was killed: " + (lost / "node0.log").read_text()[-3000:])
    stopped_after = time.monotonic() - killed_at
    _kill(procs)
    node0 = (lost / "node0.log").read_text()
    assert code != 0 and stopped_after < 30, (code, stopped_after)
    assert "another rank of this run ended" in node0 or "Connection closed by peer" in node0, node0[-3000:]

    # Resume on both nodes from the last checkpoint (step 2): the run continues exactly.
    codes = _wait(_start_nodes(lost, lost / "out", zero, "--resume"), timeout=600)
    assert codes == [0, 0], (lost / "node0.log").read_text()[-3000:] + (lost / "node1.log").read_text()[-3000:]
    # Steps 1-2 from before the loss, 3-6 after the resume: all equal the one-node run's.
    resumed = _losses(lost / "out")
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), (step, resumed, expected)
    for node in range(NODES):
        assert any((lost / f"cache_node{node}").iterdir()), f"node {node} built no data cache of its own"
