"""Run a function on N CPU ranks (gloo), like OLMo-core's ``run_distributed_test``.

Each rank is a fresh spawned process with the usual launcher environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
``DS_ACCELERATOR=cpu``, so ``deepspeed.init_distributed()`` works as under
the deepspeed launcher. Return values come back per rank; an exception on any
rank fails the test with that rank's traceback.
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


def _worker(rank: int, world_size: int, port: int, fn: Callable, kwargs: dict, queue) -> None:
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
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, kwargs, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
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
