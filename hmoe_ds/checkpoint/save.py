"""The save itself (collective): DeepSpeed's files, each rank's state and logical shard, then the marker.

The test-only hooks ``HMOE_DS_TEST_KILL_DURING_SAVE=<step>`` and
``HMOE_DS_TEST_KILL_DURING_STEP=<step>`` make one rank (``HMOE_DS_TEST_KILL_RANK``,
default 1) SIGKILL itself in the middle of that step's save (after DeepSpeed wrote
its first file on that rank) or in the middle of that optimizer step (after
the first backward). They exist to test crash safety and do nothing unless set.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from .. import collectives
from ..collectives import release_gathered_parameters
from ..naming import moe_layer_records
from ..shards import write_rank_shard
from .atomic_io import atomic_safetensors
from .layout import EXPERIMENT_FILE, PROBE_FILE, TOKENIZER_DIR, tag_for
from .marker import write_marker
from .rank_state import save_rank_state
from .rundir import prepare_tag_dir, write_latest
from .storage import CheckpointStorage, checkpoint_storage

KILL_DURING_SAVE_ENV = "HMOE_DS_TEST_KILL_DURING_SAVE"
KILL_DURING_STEP_ENV = "HMOE_DS_TEST_KILL_DURING_STEP"
KILL_RANK_ENV = "HMOE_DS_TEST_KILL_RANK"

#: What DeepSpeed's engine copies into the checkpoints directory on every save (``_copy_recovery_script``);
#: neither can read these MoE checkpoints, so each is replaced by :data:`RECOVERY_SCRIPT`.
DEEPSPEED_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
RECOVERY_SCRIPT = Path(__file__).with_name("zero_to_fp32_script.py")


@torch.no_grad()
def probe_logits(engine: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [1, T, V] (fp32, CPU) of the engine in eval mode; collective (every rank runs the forward)."""
    module = engine.module
    was_training = module.training
    engine.eval()
    try:
        out = engine(input_ids=input_ids.to(engine.device))
    finally:
        if was_training:
            engine.train()
        release_gathered_parameters(engine)
    return out.logits.detach().float().cpu()


def _kill_rank() -> int:
    return int(os.environ.get(KILL_RANK_ENV, "1"))


def _kill_requested(env: str, step: int, rank: int) -> bool:
    value = os.environ.get(env)
    return bool(value) and int(value) == step and rank == _kill_rank()


def _die(reason: str) -> None:
    print(f"[hmoe_ds test hook] rank {os.environ.get('RANK')}: SIGKILL {reason}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill_during_step(step: int, rank: int) -> None:
    """Test hook: SIGKILL this rank while it computes optimizer step ``step`` (1-based)."""
    if _kill_requested(KILL_DURING_STEP_ENV, step, rank):
        _die(f"during step {step}")


def arm_kill_during_save(engine: Any, step: int, rank: int) -> None:
    """Test hook: make this rank SIGKILL itself right after DeepSpeed wrote its first file of this save."""
    if not _kill_requested(KILL_DURING_SAVE_ENV, step, rank):
        return
    ckpt_engine = engine.checkpoint_engine
    original = ckpt_engine.save

    def save_then_die(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        _die(f"during the save of step {step}, after DeepSpeed wrote one file")
        return result

    ckpt_engine.save = save_then_die


def maybe_kill_before_marker(step: int, rank: int) -> None:
    """Test hook fallback: a rank that wrote no DeepSpeed file dies before the marker instead."""
    if _kill_requested(KILL_DURING_SAVE_ENV, step, rank):
        _die(f"during the save of step {step}, before the completion marker")


def replace_recovery_scripts(checkpoint_dir: Path) -> None:
    """Put hmoe-ds's consolidation script where DeepSpeed's ``zero_to_fp32.py`` (and ``zero_to_torch.py``) would be.

    DeepSpeed offers no option to skip the copy, so rank 0 overwrites the
    copies after the engine saved. ``zero_to_fp32.py`` is written even when
    DeepSpeed wrote none (ZeRO-0), so every run's ``checkpoints/`` has one that works.
    """
    for name in DEEPSPEED_RECOVERY_SCRIPTS:
        target = Path(checkpoint_dir) / name
        if name == "zero_to_fp32.py" or target.exists():
            shutil.copyfile(RECOVERY_SCRIPT, target)
            target.chmod(0o755)


def _versions() -> dict[str, str]:
    from importlib import metadata

    import deepspeed

    try:  # the distribution's version: works even when hmoe_ds/__init__.py was not what got imported
        ours = metadata.version("hmoe-ds")
    except metadata.PackageNotFoundError:
        ours = "unknown"
    return {"hmoe_ds": ours, "deepspeed": deepspeed.__version__, "torch": torch.__version__}


def save_training_checkpoint(engine: Any, checkpoint_dir: Path, step: int, *, rank_state: dict[str, Any],
                             experiment: dict[str, Any], tokenizer: Any | None = None,
                             probe_ids: torch.Tensor | None = None,
                             storage: CheckpointStorage | None = None) -> tuple[Path, list[str]]:
    """Write ``checkpoint_dir/step_<step>`` crash-safely; every rank calls it. Returns (directory, notes).

    Order (each stage starts only when every rank finished the previous one):
    remove a stale same-tag directory -> DeepSpeed's files (``save_latest=False``)
    + this rank's state file + this rank's logical shard -> probe, experiment, tokenizer (the writers)
    -> barrier -> marker -> ``latest``. A kill anywhere before the marker leaves
    a directory that resume skips; ``latest`` never names it. A failure in one of
    the writers' sections raises on every rank (:func:`hmoe_ds.collectives.on_rank0`).

    The writers are rank 0 for shared ``storage`` (the default), and each node's
    local rank 0 for node-local storage, each writing its node's directory and
    marker (:mod:`.storage`); ``tokenizer`` is needed on the writers only.
    """
    from ..modeling import logical_config  # lazily: it imports DeepSpeed

    import yaml

    checkpoint_dir = Path(checkpoint_dir)
    rank, world = collectives.rank(), collectives.world_size()
    storage = storage or checkpoint_storage(node_local=False)
    tag = tag_for(step)
    tag_dir = checkpoint_dir / tag

    def prepare() -> list[str]:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        note = prepare_tag_dir(tag_dir)
        return [note] if note else []

    notes = [note for node_notes in storage.on_writers(prepare) for note in node_notes]
    arm_kill_during_save(engine, step, rank)
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"step": step, "experiment": experiment},
                           save_latest=False)
    save_rank_state(tag_dir, rank, {**rank_state, "step": step, "rank": rank, "world_size": world})
    # This rank's logical shard: the weights and optimizer state it owns, nothing gathered.
    write_rank_shard(engine, tag_dir, rank)
    logits = probe_logits(engine, probe_ids) if probe_ids is not None else None

    def write_files() -> None:
        if logits is not None and probe_ids is not None:
            atomic_safetensors({"input_ids": probe_ids.cpu(), "logits": logits}, tag_dir / PROBE_FILE,
                                {"format": "pt"})
        (tag_dir / EXPERIMENT_FILE).write_text(yaml.safe_dump(experiment, sort_keys=False), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tag_dir / TOKENIZER_DIR))
        replace_recovery_scripts(checkpoint_dir)  # after the engine's save: DeepSpeed copied its scripts there

    def commit() -> None:
        cfg = engine.module.config
        meta = {
            "tag": tag,
            "step": step,
            "world_size": world,
            "zero_stage": int(engine.zero_optimization_stage()),
            "dtype": "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32",
            "model_config": json.loads(cfg.to_json_string(use_diff=False)),
            "logical_config": json.loads(logical_config(cfg).to_json_string(use_diff=False)),
            "moe_layers": moe_layer_records(engine.module),
            "shards": world,
            "storage": storage.describe(),  # node-local: which node, and the ranks whose files this directory holds
            "versions": _versions(),
        }
        write_marker(tag_dir, meta)
        write_latest(checkpoint_dir, tag)

    maybe_kill_before_marker(step, rank)
    # A failure in a writer's section (a full disk) stops every rank at once, without a marker, instead of
    # leaving the others waiting in a barrier.
    storage.on_writers(write_files)
    collectives.barrier()  # every rank's own files are complete before a marker says so
    # Node-local: each node commits its own marker. A node lost from here on leaves the tag marked on some nodes
    # only, which no resume takes (storage.agree_on_checkpoint: complete on every node).
    storage.on_writers(commit)
    return tag_dir, notes

