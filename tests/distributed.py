"""Run a function on N CPU ranks (gloo), like OLMo-core's ``run_distributed_test``.

Each rank is a new process with the usual launcher environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), the test process's other
variables and ``DS_ACCELERATOR=cpu``, so ``deepspeed.init_distributed()`` works
as under the deepspeed launcher. Return values come back per rank; an exception
on any rank fails the test with that rank's traceback.

The ranks are forked from one fork server per test session (``multiprocessing``'s
"forkserver" start method) that has imported torch, DeepSpeed, transformers and
hmoe-ds once (:data:`PRELOAD`): a spawned rank spent 5-8 s of CPU importing
them, 2-4 ranks at a time on a 2-core machine. The server is a fresh
interpreter that only imports (no process group, no tensor work, no Python
thread), under the environment a rank imports them in (:data:`SERVER_ENV`);
forking a process that has imported torch is what DataLoader workers do on
Linux. Each rank then creates its own gloo group, as under the launcher.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import io
import multiprocessing as mp


#: Every port :func:`free_port` handed out in this test session, in order. A run's MASTER_PORT is part of the
#: names DeepSpeed gives its /dev/shm segments, so ``tests/conftest.py`` tells this session's leftovers from
#: those of other people's concurrent runs by these ports.
PORTS: list[int] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    PORTS.append(port)
    return port


#: What the fork server imports before it forks any rank: what nearly every distributed test needs. Muon's module
#: is DeepSpeed's ZeRO optimizer check's (``zero.utils.is_zero_supported_optimizer``), whose ``@torch.compile``
#: decorators import torch._inductor (1.5 s of CPU per rank otherwise).
PRELOAD = ["torch", "torch.distributed", "deepspeed", "deepspeed.runtime.engine",
           "deepspeed.runtime.zero.muon.muon_optimizer", "hmoe_ds", "hmoe_ds.distributed_env", "hmoe_ds.modeling"]
#: The fork server's environment while it imports: what :func:`_worker` sets before a rank imports anything
#: (thread pools sized at import, e.g. OpenBLAS's, are sized as in a rank that imported them itself).
SERVER_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
_CONTEXT = None


def _context():
    """The session's forkserver context; its server, started on first use, has imported :data:`PRELOAD`."""
    global _CONTEXT
    if _CONTEXT is None:
        from multiprocessing import forkserver

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        saved = {key: os.environ.get(key) for key in SERVER_ENV}
        os.environ.update(SERVER_ENV)
        try:
            forkserver.ensure_running()  # the server inherits this environment
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        _CONTEXT = ctx
    return _CONTEXT


def _worker(rank: int, world_size: int, port: int, fn: Callable, kwargs: dict, queue,
            environ: dict[str, str], output: str) -> None:
    # The fork server's stdout/stderr are those of the test that started it: write to a file the parent
    # copies into the current test's output instead.
    with open(output, "wb", buffering=0) as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
    os.environ.clear()  # the test process's environment now, not the fork server's at its start
    os.environ.update(environ)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
    )
    finished = False
    try:
        import torch

        from hmoe_ds.distributed_env import init_distributed

        torch.set_num_threads(1)
        # As the entry points: DeepSpeed's /dev/shm segments (made when LOCAL_SIZE says all ranks are local) unlinked.
        init_distributed(dist_backend="gloo", verbose=False)
        result = fn(rank=rank, world_size=world_size, **kwargs)
        # Serialised to bytes: tensors sent as shared-memory handles would die with this process.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
        finished = True
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        from hmoe_ds.distributed_env import shutdown_distributed

        try:
            shutdown_distributed(synchronize=finished)
        except Exception:  # noqa: BLE001 - the result (or error) is already reported
            pass


def run_distributed(fn: Callable[..., Any], world_size: int, timeout: float = 300.0, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank=..., world_size=..., **kwargs)`` on ``world_size`` gloo ranks; return results by rank."""
    import sys
    import tempfile

    ctx = _context()
    queue = ctx.SimpleQueue()
    port = free_port()
    environ = dict(os.environ)
    outputs = tempfile.TemporaryDirectory(prefix="run_distributed_")
    paths = [os.path.join(outputs.name, f"rank{r}.txt") for r in range(world_size)]
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, kwargs, queue, environ, paths[r]))
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        return _collect(procs, queue, world_size, timeout)
    finally:
        for r, path in enumerate(paths):  # into this test's captured output, shown when it fails
            if os.path.exists(path) and os.path.getsize(path):
                with open(path, errors="replace") as f:
                    sys.stderr.write(f"--- output of rank {r} ---\n{f.read()}")
        outputs.cleanup()


def _collect(procs: list, queue, world_size: int, timeout: float) -> list[Any]:
    results: dict[int, Any] = {}
    errors: list[str] = []
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            break
        if queue.empty():
            if not any(p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.05)
            continue
        rank, status, payload = queue.get()
        if status == "ok":
            import torch

            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            errors.append(f"rank {rank}:\n{payload}")
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        raise AssertionError("distributed test failed\n" + "\n".join(errors))
    if len(results) != world_size:
        raise AssertionError(f"only ranks {sorted(results)} of {world_size} reported (timeout {timeout}s or crash)")
    return [results[r] for r in range(world_size)]
