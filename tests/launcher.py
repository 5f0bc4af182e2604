"""Start ``run/train.py`` (and other entry points) as a user would, for the end-to-end tests.

Every run gets a free port, an offline environment with the CPU accelerator, a
data cache directory, and its own process session: on a timeout, or when it
ends, the whole group (runner, ranks, mpirun) is killed, so a hung or crashed
test never leaves ranks behind. The tiny experiment and DeepSpeed config here
are the one debug model the end-to-end tests share.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from .distributed import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEEPSPEED = BIN / "deepspeed"

#: A tiny HMoE (2 layers, D=64, 4 unequal experts, Top-P) on a 150k-character slice of the default corpus.
EXPERIMENT: dict[str, Any] = {
    "model": {
        "vocab_size": "auto",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "dense_intermediate_size": 128,
        "tie_word_embeddings": True,
        "moe": {"expert_sizes": [32, 64, 96, 128], "routing": "top_p", "top_p": 0.6,
                "p_penalty_coef": 0.1, "entropy_coef": 0.03},
    },
    "data": {"block_size": 64, "vocab_size": 512, "max_chars": 150_000},
    "run": {"run_name": "tiny", "train_steps": 6, "log_every": 2, "eval_every": 3, "eval_batches": 2},
}
DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "gradient_clipping": 1.0,
    "steps_per_print": 10**6,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01, "torch_adam": True}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-3, "warmup_num_steps": 2}},
    "zero_optimization": {"stage": 2},
}


#: Added to a launched run's environment unless the test asks for the user's own (``as_user=True``).
#: ``TORCHDYNAMO_DISABLE=1`` (PyTorch's switch) turns ``torch.compile`` into a no-op decorator. hmoe-ds
#: compiles nothing, but DeepSpeed's ZeRO optimizer check imports its Muon optimizer, whose
#: ``@torch.compile`` decorators import torch._inductor: 1.5 s of CPU per rank, about a tenth of a tiny run's
#: start-up. The runs of ``tests/test_train_e2e.py`` (ZeRO-2 and ZeRO-3) keep the environment as a user has it.
FAST_START: dict[str, str] = {"TORCHDYNAMO_DISABLE": "1"}


def environment(cache: Path, as_user: bool = False, **extra: str) -> dict[str, str]:
    """This environment, offline, CPU accelerator, one thread per rank, data cached in ``cache``, plus ``extra``.

    Unless ``as_user``, also :data:`FAST_START`.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if not as_user:
        env.update(FAST_START)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HMOE_DS_CACHE=str(cache), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float = 300,
        watch: Callable[[int], None] | None = None) -> subprocess.CompletedProcess:
    """Run in its own session; on timeout (or ever after) kill the whole group: runner, mpirun, ranks.

    ``watch(pgid)``, if given, is called about every 0.2 s while the command runs
    (from another thread), with the process group of everything it started.
    """
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    watcher = None
    if watch is not None:
        def observe() -> None:
            while proc.poll() is None:
                watch(proc.pid)
                time.sleep(0.2)

        watcher = threading.Thread(target=observe, daemon=True)
        watcher.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if watcher is not None:
            watcher.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def write_configs(tmp: Path, experiment: dict[str, Any], ds: dict[str, Any]) -> tuple[Path, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "exp.yaml").write_text(yaml.safe_dump(experiment), encoding="utf-8")
    (tmp / "ds.json").write_text(json.dumps(ds), encoding="utf-8")
    return tmp / "exp.yaml", tmp / "ds.json"


def train(tmp: Path, *extra: str, experiment: dict[str, Any] = EXPERIMENT, ds: dict[str, Any] = DS_CONFIG,
          ranks: int = 2, cache: Path | None = None, env: dict[str, str] | None = None,
          timeout: float = 300, watch: Callable[[int], None] | None = None,
          as_user: bool = False) -> subprocess.CompletedProcess:
    """``deepspeed --num_accelerators <ranks> run/train.py`` into ``tmp/out``; ``extra`` are train.py arguments.

    The run's master port is ``tests.distributed.PORTS[-1]`` afterwards; ``watch`` as for :func:`run`;
    ``as_user`` as for :func:`environment`.
    """
    exp_file, ds_file = write_configs(tmp, experiment, ds)
    cmd = [str(DEEPSPEED), "--num_accelerators", str(ranks), "--master_port", str(free_port()), "run/train.py",
           "--config", str(exp_file), "--deepspeed_config", str(ds_file), "--set", f"run.output_dir={tmp / 'out'}",
           *extra]
    return run(cmd, environment(cache or tmp / "cache", as_user, **(env or {})), timeout, watch)


def output(proc: subprocess.CompletedProcess) -> str:
    """For assertion messages: the first traceback of every rank, then the tail of the output.

    A multi-rank failure usually ends with the *other* ranks' "connection closed"
    errors; the rank that failed first is what explains it, and is often far
    from the end of the output.
    """
    lines = (proc.stdout + proc.stderr).splitlines()
    firsts: list[str] = []
    for rank in sorted({line[1:line.index("]")] for line in lines if line.startswith("[rank")}):
        tagged = [line for line in lines if line.startswith(f"[{rank}]")]
        firsts.append(f"--- first lines of {rank}'s traceback ---\n" + "\n".join(tagged[:40]))
    return "\n".join(firsts) + "\n--- tail ---\n" + proc.stdout[-3000:] + proc.stderr[-3000:]


def read_metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a TensorBoard run directory, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    out = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    out["<images>"] = [(0, float(len(events.Tags()["images"])))]
    return out
