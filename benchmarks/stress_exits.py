"""Stress check (not in CI): N consecutive 2-rank ZeRO-3 runs must all exit 0 and leave /dev/shm untouched.

    .venv/bin/python -m benchmarks.stress_exits [--runs 20] [--ds-config ds_configs/zero3.json] [--keep DIR]

Each run is ``deepspeed --num_accelerators 2 run/train.py`` with
``run/configs/quickstart.yaml`` shrunk to the tests' tiny model (2 layers,
D=64, 4 unequal experts, EP 1, 6 steps with evaluation and a final save) and
the DeepSpeed config given (default: the project's ZeRO-3 + CPU offload). A
run counts as bad when the launcher exits non-zero, any rank aborts
(``terminate called``, a fatal Python error, a rank named by the launcher with
a non-zero return code) or a DeepSpeed shared-memory segment of its port
remains in /dev/shm afterwards. Other people's runs on the machine use other
ports and are not counted. Prints one line per run and a summary line; exits 1
if any run was bad. About 30-60 s per run on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hmoe_ds.distributed_env import SHM_DIR, SHM_PREFIX
from hmoe_ds.env import configure_environment

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "run" / "configs" / "quickstart.yaml"
TRAIN = REPO / "run" / "train.py"
#: The tests' tiny experiment (tests/launcher.py) as overrides of the quickstart YAML.
TINY = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=4",
        "model.max_position_embeddings=64", "model.dense_intermediate_size=128",
        "model.moe.expert_sizes=[32,64,96,128]", "model.moe.ep_size=1", "data.block_size=64", "data.vocab_size=512",
        "data.max_chars=150000", "data.num_proc=1", "run.train_steps=6", "run.log_every=2", "run.eval_every=3",
        "run.eval_batches=2", "run.save_every=0", "run.progress_bar=false"]
#: What a rank that dies at exit leaves in the launcher's output.
ABORT_SIGNS = ("terminate called", "Fatal Python error", "exits with return code", "core dumped")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shm_of_port(port: int) -> list[str]:
    """This run's DeepSpeed all-reduce segments still named in /dev/shm (names end ``_<port>_<rank>``)."""
    if not SHM_DIR.is_dir():
        return []
    return sorted(p.name for p in SHM_DIR.glob(f"{SHM_PREFIX}_*") if p.name.rsplit("_", 2)[-2] == str(port))


def one_run(index: int, work: Path, ds_config: Path, timeout: float) -> dict[str, object]:
    """Launch one run in its own process group (killed afterwards, whatever happened); return what was seen."""
    port = free_port()
    out = work / f"run{index:02d}"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2", "--master_port", str(port),
           str(TRAIN), "--config", str(CONFIG), "--deepspeed_config", str(ds_config),
           "--set", f"run.output_dir={out}", *TINY]
    env = {**os.environ, "HMOE_DS_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
        code: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        code = "timeout"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a rank left behind by the launcher must not outlive the run
        except ProcessLookupError:
            pass
    left = shm_of_port(port)
    signs = [s for s in ABORT_SIGNS if s in text]
    (work / f"run{index:02d}.log").write_text(text, encoding="utf-8")
    return {"run": index, "port": port, "exit": code, "seconds": round(time.monotonic() - start, 1),
            "aborts": signs, "shm_left": left, "ok": code == 0 and not signs and not left}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="consecutive runs (default 20)")
    parser.add_argument("--ds-config", type=Path, default=REPO / "ds_configs" / "zero3.json",
                        help="DeepSpeed JSON (default ds_configs/zero3.json: ZeRO-3, CPU offload)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run before it is killed")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep outputs and per-run logs here (default: a temporary directory, removed)")
    args = parser.parse_args(argv)
    configure_environment()  # CPU accelerator without CUDA, offline hubs (as run/env.sh), inherited by the runs
    with tempfile.TemporaryDirectory(prefix="hmoe_stress_exits_") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = []
        for index in range(args.runs):
            result = one_run(index, work, args.ds_config.resolve(), args.timeout)
            results.append(result)
            print(json.dumps(result), flush=True)
        bad = [r for r in results if not r["ok"]]
        aborts = sum(1 for r in results if r["aborts"])
        nonzero = sum(1 for r in results if r["exit"] != 0)
        leaked = sum(len(r["shm_left"]) for r in results)  # type: ignore[arg-type]
        print(f"stress_exits: {len(results)} runs of {args.ds_config.name}: {nonzero} non-zero exits, {aborts} with "
              f"an abort, {leaked} shm segments left; {'OK' if not bad else 'FAILED'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
