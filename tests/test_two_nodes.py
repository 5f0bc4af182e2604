"""Two "nodes" on one machine, started as pdsh starts them: DeepSpeed's per-node launcher once per node.

The ``deepspeed`` runner, given a hostfile of N nodes, runs
``deepspeed.launcher.launch --world_info ... --node_rank i --master_addr ...`` on
every node. Here both run on this machine, 2 ranks each (world 4, global
ranks 2-3 on "node 1" have local ranks 0-1), with EP 4 spanning both nodes,
under ZeRO-3 and under ZeRO-2 with CPU offload, and each node building its own data cache (no shared file system for
data). The checkpoints go to one shared directory, or (ZeRO-3) to node-local storage (DeepSpeed's
``checkpoint.use_node_local_storage``): each node runs in its own working directory with the same relative
``run.output_dir``, so both nodes are given the same path, as on a cluster with local disks, and neither can see the
other's files. Checked:

* every process of node 1 SIGKILLed during step 3 (after the step-2
  checkpoint): node 0 stops within seconds with a clear error, no hang;
* a resume on both nodes continues exactly: the step losses of the two-node
  run (steps 1-2 before the loss, 3-6 after the resume) equal those of the
  same run on 4 ranks of one node (run once per ZeRO set-up, shared by both storage modes);
* node-local: each node's checkpoint directory holds its own ranks' files and its own completion marker, and
  nothing of the other node's.

The resumed run saves at step 4 and trains on, so this is also the test of the
first step after a save in a resumed ZeRO-3 run (it once failed there with
DeepSpeed's "tracing error": releasing the parameters an evaluation forward had
gathered also partitioned ZeRO-3's persistent parameters;
``hmoe_ds.collectives.release_gathered_parameters``).

The choice of the checkpoint every node has complete (a save interrupted on one node only), the refusals of
elastic resume and export from one node's part, and a node-local output directory that is in fact shared are
tested without a training run in ``tests/test_checkpoint_storage.py``.
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
from typing import Callable

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


#: (ZeRO set-up, where the checkpoints go: one directory both nodes share, or each node's own (node-local
#: storage)). Each set-up and each storage mode once (a full grid adds a 4-rank lost-node run and resume, ~50 s,
#: and nothing the two cases do not reach: the storage code does not depend on the ZeRO stage).
CASES = [("zero2_offload", "shared"), ("zero3", "node_local")]


def _ds(zero: str, storage: str = "shared") -> dict:
    ds = copy.deepcopy(L.DS_CONFIG)
    ds["zero_optimization"] = copy.deepcopy(ZERO[zero])
    ds["gradient_accumulation_steps"] = 1
    if zero == "zero2_offload":
        ds["optimizer"]["params"].pop("torch_adam", None)
    if storage == "node_local":
        ds["checkpoint"] = {"use_node_local_storage": True}
    return ds


def _node_dir(tmp: Path, node: int) -> Path:
    """Node ``node``'s working directory: with node-local storage, the relative ``run.output_dir`` lands here."""
    return tmp / f"node{node}"


def _output_dirs(tmp: Path, storage: str) -> list[Path]:
    """Each node's output directory (the same one twice for shared storage)."""
    if storage == "node_local":
        return [_node_dir(tmp, node) / "out" for node in range(NODES)]
    return [tmp / "out"] * NODES


def _start_nodes(tmp: Path, zero: str, storage: str, *extra: str,
                 env_for: dict[int, dict[str, str]] | None = None) -> list[subprocess.Popen]:
    """One per-node launcher per node, each in its own session and working directory, output to ``tmp/node<i>.log``.

    Both nodes get the same command line; with node-local storage ``run.output_dir`` is the relative path ``out``,
    which each node resolves in its own working directory, as one path on every node's own disk would.
    """
    exp_file, ds_file = L.write_configs(tmp, _experiment(), _ds(zero, storage))
    world_info = base64.urlsafe_b64encode(
        json.dumps({f"node{n}": list(range(PER_NODE)) for n in range(NODES)}).encode()).decode()
    port = free_port()
    output_dir = "out" if storage == "node_local" else str(tmp / "out")
    procs = []
    for node in range(NODES):
        env = L.environment(tmp / f"cache_node{node}", **(env_for or {}).get(node, {}))
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", str(L.REPO / "run/train.py"),
               "--config", str(exp_file), "--deepspeed_config", str(ds_file), "--set",
               f"run.output_dir={output_dir}", "run.progress_bar=false", *extra]
        log = open(tmp / f"node{node}.log", "a")
        _node_dir(tmp, node).mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen(cmd, cwd=_node_dir(tmp, node), env=env, stdout=log, stderr=subprocess.STDOUT,
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


@pytest.fixture(scope="module")
def one_node_losses(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[int, float]]:
    """The step losses of the run on 4 ranks of one node, per ZeRO set-up; each run once, for every storage mode."""
    runs: dict[str, dict[int, float]] = {}

    def losses(zero: str) -> dict[int, float]:
        if zero not in runs:
            tmp = tmp_path_factory.mktemp(f"one_node_{zero}")
            reference = L.train(tmp, experiment=_experiment(), ds=_ds(zero), ranks=4, cache=tmp / "cache",
                                timeout=600)
            assert reference.returncode == 0, L.output(reference)
            runs[zero] = _losses(tmp / "out")
            assert sorted(runs[zero]) == list(range(1, STEPS + 1))
        return runs[zero]

    return losses


@pytest.mark.parametrize(("zero", "storage"), CASES, ids=[f"{zero}-{storage}" for zero, storage in CASES])
def test_two_nodes_survive_a_lost_node_and_train_like_one(
        tmp_path: Path, zero: str, storage: str, one_node_losses: Callable[[str], dict[int, float]]) -> None:
    expected = one_node_losses(zero)

    # Node 1 lost during step 3: its rank 2 is SIGKILLed by the test hook, then every process of node 1.
    lost = tmp_path / "lost"
    procs = _start_nodes(lost, zero, storage, env_for={1: {"HMOE_DS_TEST_KILL_DURING_STEP": "3",
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
    codes = _wait(_start_nodes(lost, zero, storage, "--resume"), timeout=600)
    assert codes == [0, 0], (lost / "node0.log").read_text()[-3000:] + (lost / "node1.log").read_text()[-3000:]
    # Steps 1-2 from before the loss, 3-6 after the resume: all equal the one-node run's (rank 0 logs them).
    outputs = _output_dirs(lost, storage)
    resumed = _losses(outputs[0])
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), (step, resumed, expected)
    for node in range(NODES):
        assert any((lost / f"cache_node{node}").iterdir()), f"node {node} built no data cache of its own"
    if storage == "node_local":
        _check_node_local_checkpoints(outputs)


def _check_node_local_checkpoints(outputs: list[Path]) -> None:
    """Each node's checkpoints: its own ranks' files and its own marker, none of the other node's; same tags."""
    tags = [sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) for out in outputs]
    assert tags[0] == tags[1] == ["step_2", "step_4", "step_6"], tags
    for node, out in enumerate(outputs):
        ours = range(node * PER_NODE, (node + 1) * PER_NODE)
        for tag in tags[node]:
            tag_dir = out / "checkpoints" / tag
            marker = json.loads((tag_dir / "hmoe_complete.json").read_text())
            assert marker["storage"] == {"mode": "node_local", "node": node, "nodes": NODES, "ranks": list(ours)}
            held = sorted(int(p.name.split("_")[3]) for p in tag_dir.glob("zero_pp_rank_*_model_states.pt"))
            assert held == list(ours), (tag_dir, held)
            assert sorted(int(p.stem.split("_")[-1]) for p in tag_dir.glob("hmoe_shard_*")) == list(ours)
            assert sorted(marker["files"]) == sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                                                     if p.is_file() and p.name != "hmoe_complete.json")
        assert (out / "checkpoints" / "latest").read_text() == "step_6"
