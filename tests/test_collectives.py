"""Rank-0 sections: a failure on rank 0 stops every rank at once, in start-up and in a checkpoint save.

Also the process-group helpers of :mod:`hmoe_ds.collectives` (rank, world size,
rank 0 first) with and without a process group.

Starts 2 ranks (gloo). Without the broadcast of the outcome, the second rank
would wait in a barrier until the collective timeout; ``run_distributed``'s
timeout turns such a hang into a failure.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from .distributed import run_distributed

def test_without_a_process_group_this_is_rank_0_of_1() -> None:
    import torch

    from hmoe_ds import collectives

    assert not collectives.is_distributed()
    assert (collectives.rank(), collectives.world_size()) == (0, 1)
    collectives.barrier()  # a no-op, not an error
    values = torch.tensor([1.0, 3.0])
    assert collectives.all_reduce_sum(values) is values and values.tolist() == [1.0, 3.0]
    assert collectives.all_reduce_max(values).tolist() == [1.0, 3.0]
    assert collectives.on_rank0(lambda: 7) == 7
    assert collectives.rank0_first(lambda: 8) == 8


def test_the_launch_rank_and_world_come_from_the_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from hmoe_ds import collectives

    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert (collectives.launch_rank(), collectives.launch_world_size()) == (0, 1)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")  # mpirun: RANK exists only after MPI discovery
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert (collectives.launch_rank(), collectives.launch_world_size()) == (3, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (collectives.launch_rank(), collectives.launch_world_size()) == (1, 2)


def _outcome(fn) -> str:
    try:
        return f"ok {fn()}"
    except Exception as exc:  # noqa: BLE001 - the type and message are what is tested
        return f"{type(exc).__name__}: {exc}"


def _first_then_the_others(rank: int, world_size: int, root: str) -> list[str]:
    """rank0_first: rank 0 builds a "cache" the others then read; a data error reaches every rank."""
    from hmoe_ds import collectives
    from hmoe_ds.errors import ExperimentError

    cache = Path(root) / "cache.txt"

    def build() -> str:
        if collectives.rank() == 0:
            cache.write_text("built by rank 0")
        return f"rank {collectives.rank()} of {collectives.world_size()} read {cache.read_text()!r}"

    def bad_data() -> str:
        raise ExperimentError("data.path: no such file")

    return [_outcome(lambda: collectives.rank0_first(build)), _outcome(lambda: collectives.rank0_first(bad_data)),
            f"distributed {collectives.is_distributed()}"]


def _sections(rank: int, world_size: int, root: str) -> list[str]:
    from hmoe_ds.collectives import on_rank0
    from hmoe_ds.errors import ExperimentError

    def value() -> int:
        return 42 if rank == 0 else -1  # only rank 0 runs it; everyone gets its result

    def mistake() -> None:
        raise ExperimentError("exp.yaml: run.train_steps=-1: must be an int >= 1")

    def crash() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    return [_outcome(lambda: on_rank0(value)), _outcome(lambda: on_rank0(mistake)), _outcome(lambda: on_rank0(crash)),
            *_first_then_the_others(rank, world_size, root)]


@pytest.mark.slow
@pytest.mark.distributed
def test_rank0_sections_give_every_rank_the_result_or_the_failure(tmp_path: Path) -> None:
    """on_rank0, then rank0_first, in one 2-rank run."""
    rank0, rank1 = run_distributed(_sections, world_size=2, timeout=240, root=str(tmp_path))
    assert rank0[0] == rank1[0] == "ok 42"
    assert rank0[1] == rank1[1] == "ExperimentError: exp.yaml: run.train_steps=-1: must be an int >= 1"
    assert rank0[2] == "OSError: [Errno 28] No space left on device"
    assert rank1[2] == "RuntimeError: rank 0 failed (OSError: [Errno 28] No space left on device); see its traceback"

    # rank0_first: rank 1 ran only after rank 0 had built the cache; a failure on rank 0 reached rank 1 first.
    assert rank0[3] == "ok rank 0 of 2 read 'built by rank 0'"
    assert rank1[3] == "ok rank 1 of 2 read 'built by rank 0'"
    assert rank0[4] == rank1[4] == "ExperimentError: data.path: no such file"
    assert rank0[5] == rank1[5] == "distributed True"


def _save_with_a_full_disk_on_rank0(rank: int, world_size: int, root: str) -> dict:
    import deepspeed
    import torch

    import hmoe_ds.checkpoint as ckpt
    import hmoe_ds.checkpoint.save as saving
    from hmoe_ds.modeling import HMoEForCausalLM, debug_config
    from hmoe_ds.training.trainer import param_groups

    torch.manual_seed(0)
    model = HMoEForCausalLM(debug_config(moe={"ep_size": 2}))
    config = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**6, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=config)
    state = {"loader": {}, "rng": ckpt.rng_state()}
    write = saving.atomic_safetensors

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if rank == 0:
        saving.atomic_safetensors = full_disk
    probe = torch.arange(8).reshape(1, 8)  # rank 0 writes the probe logits: the write that fails here
    failed = _outcome(lambda: ckpt.save_training_checkpoint(engine, Path(root), 1, rank_state=state, experiment={},
                                                            probe_ids=probe))
    saving.atomic_safetensors = write
    after_failure = {"marker": (Path(root) / "step_1" / ckpt.MARKER).exists(),
                     "latest": ckpt.read_latest(Path(root))}
    retried = _outcome(lambda: ckpt.save_training_checkpoint(engine, Path(root), 1, rank_state=state, experiment={},
                                                             probe_ids=probe))
    engine.destroy()
    return {"failed": failed, "after_failure": after_failure, "retried": retried}


@pytest.mark.slow
@pytest.mark.distributed
def test_a_failed_rank0_write_during_a_save_stops_every_rank_without_a_marker(tmp_path: Path) -> None:
    """2 ranks, EP=2, ZeRO-2: rank 0 cannot write its part of the checkpoint (the probe); the retry succeeds."""
    from hmoe_ds.checkpoint import find_resume_checkpoint

    rank0, rank1 = run_distributed(_save_with_a_full_disk_on_rank0, world_size=2, timeout=240, root=str(tmp_path))
    assert rank0["failed"] == "OSError: [Errno 28] No space left on device"
    assert rank1["failed"].startswith("RuntimeError: rank 0 failed (OSError: [Errno 28] No space left on device)")
    assert rank0["after_failure"] == rank1["after_failure"] == {"marker": False, "latest": None}
    assert rank0["retried"].startswith("ok") and rank1["retried"].startswith("ok")
    info, _ = find_resume_checkpoint(tmp_path)
    assert info is not None and info.tag == "step_1"
