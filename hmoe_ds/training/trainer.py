"""The training loop on DeepSpeed: plan -> set up -> train/log/evaluate/save -> clean exit.

Read it top-down in :func:`run_training`:

1. :func:`plan_run` validates everything a user can get wrong (YAML, ``--set``,
   the DeepSpeed JSON, the batch arithmetic for the launched world size) before
   any process group exists, so a mistake costs seconds, prints one message
   (rank 0) and leaves the disk untouched.
2. :func:`set_up` (every rank) locks and vets the output directory, builds the
   data, decides where to start (:class:`StartPoint`: a checkpoint to resume, or
   ``run.init_from``, checked before any model exists), builds the engine,
   calls :func:`resume` (the one place a checkpoint is loaded; it returns the
   step to continue from) and returns a :class:`TrainState`.
3. :func:`train_loop`: forward, backward, step; at each optimizer-step boundary
   log (:func:`log_metrics`), evaluate (:func:`validate`) and save
   (:func:`save_checkpoint`) on schedule, or stop early on a signal.
4. :func:`finish`: the final report, engine and lock released.

The optimisation itself (batch sizes, accumulation, precision, optimizer,
scheduler, ZeRO, clipping) is entirely DeepSpeed's, from the JSON.

Step counting: one *step* is one optimizer step (a global batch), counted at
``engine.is_gradient_accumulation_boundary()``; ``run.train_steps``,
``log_every``, ``eval_every`` and ``save_every`` are in steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from hmoe_ds import collectives
from hmoe_ds.checkpoint import (
    PROBE_TOKENS,
    CheckpointStorage,
    agree_on_checkpoint,
    atomic_write_text,
    check_storage_is_node_local,
    checkpoint_dir_names,
    checkpoint_info,
    checkpoint_storage,
    find_resume_checkpoint,
    maybe_kill_during_step,
    read_latest,
    rng_state,
    save_training_checkpoint,
)
from hmoe_ds.collectives import on_rank0
from hmoe_ds.distributed_env import leave_the_report_to_rank0
from hmoe_ds.errors import ExperimentError

from . import memlog
from .guard import maybe_poison_loss
from .experiment import (
    Experiment,
    check_required,
    effective_ds_config,
    load_ds_config,
    load_experiment,
    node_local_checkpoints,
    tensorboard_dir,
    zero_stage,
)

__all__ = ["StartPoint", "TrainPlan", "TrainState", "check_output_dir", "load_datasets", "plan_run", "resume",
           "run_training", "set_up", "train_loop"]

CHECKPOINTS = "checkpoints"


def log0(message: str) -> None:
    """Print on rank 0 only (tqdm-safe)."""
    if collectives.launch_rank() == 0:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


# --------------------------------------------------------------------------- plan (no process group, no writes)


@dataclass
class TrainPlan:
    """Everything validated before any process group exists."""

    exp: Experiment
    ds_path: Path
    ds_config: dict[str, Any]  # effective: batch triple spelled out, TensorBoard filled in
    warnings: list[str]
    resume: str | None  # None, "auto" (newest complete checkpoint) or a checkpoint tag
    world_size: int  # the ranks launched, as the launcher's environment says; every world-size check uses it


def plan_run(config: str, ds_path: str | None, overrides: list[str], resume: str | None,
             world_size: int) -> TrainPlan:
    """Read and cross-check the experiment and the DeepSpeed JSON for ``world_size`` ranks (no side effects)."""
    if not ds_path:
        raise ExperimentError("--deepspeed_config is required, e.g. --deepspeed_config ds_configs/cpu_default.json")
    exp = load_experiment(config, overrides)
    check_required(exp)  # an empty or near-empty YAML would train the 0.4B defaults for hours
    ds = load_ds_config(ds_path)
    from deepspeed.accelerator import get_accelerator

    cfg, warnings = effective_ds_config(
        ds, ds_path, exp, world_size, fp16_supported=bool(get_accelerator().is_fp16_supported())
    )
    return TrainPlan(exp=exp, ds_path=Path(ds_path), ds_config=cfg, warnings=warnings, resume=resume,
                     world_size=world_size)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def latest_checkpoint_tag(output_dir: Path) -> str | None:
    """Tag named in ``<output_dir>/checkpoints/latest``, if any (written only after the checkpoint is complete)."""
    return read_latest(output_dir / CHECKPOINTS)


def latest_checkpoint(output_dir: Path) -> str | None:
    """Deprecated alias of :func:`latest_checkpoint_tag` (it returns a tag, not a checkpoint); removed next release."""
    warnings.warn("latest_checkpoint is deprecated (it returns a tag); use latest_checkpoint_tag", DeprecationWarning,
                  stacklevel=2)
    return latest_checkpoint_tag(output_dir)


def check_output_dir(exp: Experiment, resume: str | bool | None, world_size: int | None = None, *,
                     choose_checkpoint: bool = True) -> tuple[str | None, list[str]]:
    """Decide what the output directory allows: (checkpoint tag to resume from, notes). Writes nothing.

    ``resume``: ``None``/``False`` = a new run; ``"auto"``/``True`` = the newest
    complete checkpoint, or from scratch when there is none; any other string
    names the checkpoint to resume from, which must exist and be complete.
    A directory holding a different experiment, or checkpoints of this one, is
    an error unless resuming; so is a non-empty directory that is no run.
    ``world_size`` is deprecated and ignored (the output directory does not
    depend on it; whether a checkpoint fits this world is
    :func:`hmoe_ds.checkpoint.check_compatible`'s call). ``choose_checkpoint=False``
    vets the directory only and returns no tag: with node-local checkpoints the
    nodes choose together (:func:`hmoe_ds.checkpoint.agree_on_checkpoint`).
    """
    from .rundir_lock import HOLDER_FILE

    if world_size is not None:
        warnings.warn("check_output_dir(world_size=...) is deprecated and ignored: the output directory does not "
                      "depend on the world size (a checkpoint of another one resumes elastically)",
                      DeprecationWarning, stacklevel=2)
    resume = "auto" if resume is True else (resume or None)
    out = exp.output_dir
    notes: list[str] = []
    # The run lock's holder record (this run's, or a killed run's) does not make a directory a run.
    if not out.exists() or (out.is_dir() and not any(p.name != HOLDER_FILE for p in out.iterdir())):
        if resume not in (None, "auto"):
            raise ExperimentError(f"--resume {resume}: run.output_dir={out} holds no run; pass --resume (newest "
                                  "checkpoint) or point run.output_dir at the run to continue")
        if resume:
            notes.append(f"--resume: {out} holds no run yet; starting from scratch")
        return None, notes
    if not out.is_dir():
        raise ExperimentError(f"{exp.source}: run.output_dir={out} is a file; choose a directory path")
    saved_path = out / "experiment.yaml"
    if not saved_path.is_file():
        raise ExperimentError(
            f"{exp.source}: run.output_dir={out} exists, is not empty and holds no experiment.yaml, so it is not an "
            "hmoe-ds run; refusing to write into it. Choose another run.output_dir (or --set run.output_dir=...)"
        )
    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        saved = {}
    old, new = _flat(saved), _flat(exp.to_dict())
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    checkpoints = out / CHECKPOINTS
    present = checkpoint_dir_names(checkpoints)
    if changed and not resume:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise ExperimentError(
            f"{exp.source}: run.output_dir={out} holds a different run (its experiment.yaml differs: {shown}{more}). "
            "Choose another run.output_dir, delete the directory, or pass --resume to continue it with these settings"
        )
    if present and not resume:
        # Complete or not: an interrupted run's directory is still someone's work, never overwritten silently.
        name = read_latest(checkpoints) or present[-1]
        raise ExperimentError(
            f"{exp.source}: run.output_dir={out} already holds checkpoint '{name}' of this run. Pass --resume to "
            "continue from it, or choose another run.output_dir"
        )
    if not choose_checkpoint:
        info = None
    elif resume == "auto":
        info, skipped = find_resume_checkpoint(checkpoints)
        notes.extend(f"--resume: {note}" for note in skipped)
    else:
        info = checkpoint_info(checkpoints, resume) if resume else None
    if changed:
        notes.append(f"--resume with changed settings: {', '.join(changed)}")
    if resume and not info and choose_checkpoint:
        notes.append(f"--resume: no complete checkpoint in {checkpoints}; starting from scratch")
    return (info.tag if info else None), notes


# --------------------------------------------------------------------------- building blocks


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _threads_per_rank() -> None:
    """Without OMP_NUM_THREADS, torch on each of N local ranks would use every core: share them instead."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, int(os.environ.get("LOCAL_SIZE", "1")))))


def quiet_deepspeed() -> None:
    """Keep the progress bar readable: DeepSpeed's INFO chatter and two known-harmless warnings off.

    ``HMOE_DS_VERBOSE=1`` restores DeepSpeed's INFO logging (config dump, timings).
    """
    import warnings

    if os.environ.get("HMOE_DS_VERBOSE") == "1":
        return
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.setLevel(logging.WARNING)
    # Logged once per rank while the engine is built, before the scheduler's first step: not a problem.
    ds_logger.addFilter(lambda record: "before it has started" not in record.getMessage())
    # ZeRO-1/2 inside DeepSpeed call a torch collective that torch 2.13 marks deprecated.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def param_groups(model: torch.nn.Module, weight_decay: float | None) -> list[dict[str, Any]]:
    """Decay matrices, not norms/biases; MoE parameters split into their own groups (DeepSpeed requires it)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups: list[dict[str, Any]] = [{"name": "decay", "params": decay}]
    if weight_decay is not None:
        groups[0]["weight_decay"] = weight_decay
    if no_decay:
        groups.append({"name": "no_decay", "params": no_decay, "weight_decay": 0.0})
    return split_params_into_different_moe_groups_for_optimizer(groups)


def moe_frontend_for(ds_config: dict[str, Any]) -> str:
    """The MoE layer front-end the DeepSpeed config needs: ``autoep`` under ZeRO-3, else ``moe``.

    DeepSpeed partitions expert parameters under ZeRO-3 only on AutoEP layers and
    refuses its native ``MoE`` there; the math of both front-ends is the same, so
    a user switches ZeRO stage by editing the JSON only.
    """
    return "autoep" if zero_stage(ds_config) == 3 else "moe"


def model_config_for(exp: Experiment, ds_config: dict[str, Any], vocab_size: int) -> Any:
    """The ``HMoEConfig`` :func:`build_engine` builds: the experiment's, with the front-end the ZeRO stage needs."""
    model_cfg = exp.model_config(vocab_size)
    model_cfg.moe = {**model_cfg.moe, "frontend": moe_frontend_for(ds_config)}
    return model_cfg


def build_model(model_cfg: Any, ds_config: dict[str, Any], seed: int,
                init_weights: Callable[[torch.nn.Module], None] | None = None) -> torch.nn.Module:
    """The ``HMoEForCausalLM`` a run trains: built partitioned under ZeRO-3, initialised from ``seed``.

    Under ZeRO stage 3 the model is constructed inside ``deepspeed.zero.Init``,
    so each module's parameters are partitioned as soon as the module exists
    (experts over their expert-data-parallel group): no rank ever holds more
    than its partition plus the module being built. HF's own initialisation
    is skipped (it would draw from the global RNG, differently per front-end,
    and cannot see partitioned values); :func:`hmoe_ds.initialization.initialize_parameters`
    then writes every rank's part of every parameter from ``(seed, logical
    name)``, so the initial model is identical under every ZeRO stage, EP
    size, placement and world size. ``init_weights(model)`` (e.g. ``run.init_from``)
    runs last.
    """
    import contextlib

    import deepspeed
    from transformers.initialization import no_init_weights

    from hmoe_ds.initialization import initialize_parameters
    from hmoe_ds.modeling import HMoEForCausalLM

    partitioned = (deepspeed.zero.Init(config_dict_or_path=ds_config) if zero_stage(ds_config) == 3
                   else contextlib.nullcontext())
    with partitioned, no_init_weights():
        model = HMoEForCausalLM(model_cfg)
    model.tie_weights()  # no_init_weights also skipped HF's tying
    initialize_parameters(model, seed)
    if init_weights is not None:
        init_weights(model)
    return model


def build_engine(exp: Experiment, ds_config: dict[str, Any], vocab_size: int, training: bool = True,
                 init_weights: Callable[[torch.nn.Module], None] | None = None) -> tuple[Any, Any]:
    """(engine, HMoEConfig): the model of :func:`build_model`, wrapped by ``deepspeed.initialize``.

    ``init_weights(model)`` runs before ``deepspeed.initialize``: ZeRO copies the
    module's weights into its optimizer partitions there, so weights loaded
    later would be overwritten by the first step.
    """
    import deepspeed

    model_cfg = model_config_for(exp, ds_config, vocab_size)
    model = build_model(model_cfg, ds_config, exp.run.seed, init_weights)
    wd = ((ds_config.get("optimizer") or {}).get("params") or {}).get("weight_decay")
    params = param_groups(model, wd) if training else list(model.parameters())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    return engine, model_cfg


def load_datasets(exp: Experiment) -> Any:
    """The experiment's tokenised datasets: rank 0 builds (and caches) them first, then the others load them.

    A data mistake (a missing file, a bad value) is an :class:`ExperimentError`
    on every rank, its message naming the ``data.`` key. Collective
    (:func:`hmoe_ds.collectives.rank0_first`); used by the trainer and ``run/eval.py``.
    """
    from hmoe_ds.data import build_lm_datasets

    def build() -> Any:
        try:
            return build_lm_datasets(exp.data_config())
        except (ValueError, FileNotFoundError) as exc:  # the data module's user-facing errors
            raise ExperimentError(str(exc).replace("DataConfig.", "data.")) from None

    return collectives.rank0_first(build)


# --------------------------------------------------------------------------- the run


def run_training(args: argparse.Namespace) -> int:
    """The whole run; returns the process exit code. ``args`` from ``run/train.py``'s parser."""
    quiet_deepspeed()
    try:
        plan = plan_run(args.config, args.deepspeed_config, [s for group in args.set for s in group],
                        args.resume, collectives.launch_world_size())
    except ExperimentError as exc:
        if collectives.launch_rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        else:
            leave_the_report_to_rank0()
        return 2
    _threads_per_rank()
    from hmoe_ds.distributed_env import init_distributed, shutdown_distributed

    # MPI discovery (mpirun without RANK etc.) would otherwise always pick port 29500 and ignore MASTER_PORT;
    # a lone process without MASTER_PORT gets a free port. init_distributed also unlinks DeepSpeed's /dev/shm
    # segments of this run once every rank mapped them.
    port = os.environ.get("MASTER_PORT")
    init_distributed(**({"distributed_port": int(port)} if port else {}))
    finished = False
    try:
        code = _train(plan)
        finished = True
        return code
    except ExperimentError as exc:
        if collectives.launch_rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        elif getattr(exc, "local", False):  # an error only this rank met (its own write failed)
            print(f"error (rank {collectives.launch_rank()}): {exc}", file=sys.stderr, flush=True)
        else:
            leave_the_report_to_rank0()
        return 2
    except RuntimeError as exc:
        if not _peer_lost(exc):
            raise
        # Another rank failed first and printed why; this rank's collective only lost its peer.
        print(f"rank {collectives.launch_rank()}: stopping: another rank of this run ended (its error is above)",
              file=sys.stderr, flush=True)
        return 1
    finally:
        # Only a finished run synchronises: after a failure a peer may be stuck elsewhere and never arrive.
        shutdown_distributed(synchronize=finished)


# How gloo (and the TCP store) report a collective whose peer process is gone.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
              "connection closed")


def _peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank went away (gloo's errors)."""
    text = str(exc)
    return any(marker in text for marker in _PEER_LOST)


# --------------------------------------------------------------------------- set-up


@dataclass(frozen=True)
class StartPoint:
    """Where a run starts, decided by rank 0 before any model exists (:func:`_prepare_start`).

    ``tag``: the checkpoint of this run to resume (``None``: a fresh start);
    ``elastic``: it was saved with another layout (world size, ZeRO stage, EP
    size, placement) and loads from its logical shards; ``init_from``: for a
    fresh start, the weights directory ``run.init_from`` resolved to.
    """

    tag: str | None = None
    elastic: bool = False
    init_from: str | None = None


@dataclass
class TrainState:
    """What :func:`set_up` builds and :func:`train_loop` uses; one per run, on every rank."""

    plan: TrainPlan
    engine: Any  # the DeepSpeed engine (model, optimizer, LR scheduler)
    model_config: Any  # the HMoEConfig the engine's model was built from
    data: Any  # hmoe_ds.data.LMDatasets: train/validation splits and the tokenizer
    train_iter: Any  # hmoe_ds.data.TrainBatchIterator: this rank's micro-batches, resumable
    micro_batch: int  # sequences per rank per forward
    writer: Any  # hmoe_ds.training.metrics.MetricsWriter: metrics.jsonl + TensorBoard (rank 0)
    accumulator: Any  # hmoe_ds.training.metrics.TrainAccumulator: the log window's loss, routing, throughput
    guard: Any  # hmoe_ds.training.guard.StepGuard: NaN/Inf checks, and the per-step stop all-reduce
    watch: Any  # hmoe_ds.training.signals.StopWatch: SIGTERM / runner exit -> stop at the next step
    lock: Any  # hmoe_ds.training.rundir_lock.RunDirLock: held by the checkpoint writers for the run's life
    storage: CheckpointStorage  # shared or node-local checkpoints, and who writes each directory
    start_step: int  # 0, or the step of the checkpoint resumed
    rank: int
    world_size: int
    non_expert_params: int  # for the activated-parameter scalars
    placements: list[Any]  # per MoE layer: which logical expert each EP rank holds (load per EP rank)
    layer_tags: list[Any]  # per MoE layer: hmoe_ds.training.metrics.LayerTags, the scalar tags that can change
    tb_dir: Path | None
    probe_ids: torch.Tensor | None  # a validation sequence each checkpoint stores the logits of (export checks)
    first_val: float | None = None  # validation loss at step 0, when evaluated
    last_val: float | None = None
    bar: Any = field(default=None)  # tqdm progress bar (rank 0), opened by train_loop's caller

    @property
    def model(self) -> torch.nn.Module:
        """The ``HMoEForCausalLM`` the engine trains."""
        return self.engine.module

    @property
    def checkpoints(self) -> Path:
        """``<run.output_dir>/checkpoints``."""
        return self.plan.exp.output_dir / CHECKPOINTS

    def close(self) -> None:
        """Close the progress bar, the metrics writer and the stop watch (every rank, success or not)."""
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        self.watch.close()


def set_up(plan: TrainPlan) -> TrainState:
    """Every rank: lock and vet the output directory, build data and engine, resume; collective.

    Nothing is written before every check passed (:func:`_prepare_start` is the
    first write), so a refused start leaves the output directory as it was.
    """
    import datasets

    from hmoe_ds.data import TrainBatchIterator
    from hmoe_ds.modeling import parameter_summary

    from .guard import StepGuard
    from .metrics import MetricsWriter, StepAlignedMonitor, TrainAccumulator, constant_facts, layer_tags
    from .replacement import measured_placement_experiment
    from .rundir_lock import RunDirLock
    from .signals import StopWatch

    exp, run = plan.exp, plan.exp.run
    rank, world = collectives.rank(), collectives.world_size()
    # Shared checkpoints: rank 0 owns the output directory. Node-local: each node's local rank 0 owns its node's
    # (lock, vetting, set-asides, the common checkpoint files), after checking that no other node sees it.
    storage = checkpoint_storage(node_local_checkpoints(plan.ds_config, str(plan.ds_path)))
    check_storage_is_node_local(storage, exp.output_dir)
    lock = RunDirLock(exp.output_dir)  # held until the process ends, before anything is written
    storage.on_writers(lambda: _take_lock(lock))
    watch = StopWatch().start()  # SIGTERM, or the deepspeed runner exiting: stop at the next step boundary
    tag = _vet_output_dirs(plan, storage)
    # placement: measured: re-place experts from the load logged up to that checkpoint (hmoe_ds.training.replacement)
    exp = plan.exp = on_rank0(lambda: measured_placement_experiment(plan.exp, tag, CHECKPOINTS))
    run = exp.run

    datasets.disable_progress_bars()
    data = load_datasets(exp)
    micro = int(plan.ds_config["train_micro_batch_size_per_gpu"])  # as resolved for the engine
    # Before anything is written or built: a micro-batch the data cannot fill is one line, not a later traceback.
    try:
        train_iter = TrainBatchIterator(data.train, micro, rank=rank, world_size=world, seed=run.seed)
    except ValueError as exc:
        raise ExperimentError(f"{plan.ds_path}: train_micro_batch_size_per_gpu={micro} on {world} ranks: {exc}") \
            from None
    # Every directory's writer checks and claims it; the decision (same everywhere) is node 0's.
    start = storage.on_writers(lambda: _prepare_start(plan, len(data.tokenizer), tag, storage))[0]
    init_weights = None
    if start.init_from is not None:
        from hmoe_ds.export import load_logical_weights, resolve_source

        source = resolve_source(start.init_from)
        init_weights = lambda model: load_logical_weights(model, source)  # noqa: E731
    _seed(run.seed)  # identical initial weights on every rank
    engine, model_cfg = build_engine(exp, plan.ds_config, len(data.tokenizer), init_weights=init_weights)
    memlog.mark("build")  # HMOE_DS_MEMORY_LOG only: peak RSS per phase (benchmarks/bench_memory.py)
    _seed(run.seed + rank)  # different router noise per rank from here on
    step = resume(engine, train_iter, exp.output_dir / CHECKPOINTS, start, run.seed)

    summary = parameter_summary(engine.module)
    tb_dir = tensorboard_dir(plan.ds_config)
    # DeepSpeed's own Train/Samples/* events onto the step axis of ours (hmoe_ds.training.metrics)
    engine.monitor = StepAlignedMonitor(engine.monitor, engine.train_batch_size())
    writer = MetricsWriter(exp.output_dir, engine.monitor, tb_dir, is_writer=rank == 0, append=start.tag is not None)
    moe_layers = [layer for _, layer in engine.module.moe_layers()]
    tags = [layer_tags(layer.config, run.per_expert_metrics) for layer in moe_layers]
    placements = [layer.placement for layer in moe_layers]  # per-EP-rank load tags
    writer.write_layout([layer.config.expert_sizes for layer in moe_layers], tags)
    if moe_layers:  # a dense model has no routing constants
        writer.write_text("run/constants", constant_facts([layer.config for layer in moe_layers], tags, placements,
                                                          [layer.moe_core.expert_params for layer in moe_layers]))
    if rank == 0:
        model_cfg.to_json_file(str(exp.output_dir / "model_config.json"))
        data.tokenizer.save_pretrained(str(exp.output_dir / "tokenizer"))
    block = int(data.train[0]["input_ids"].shape[-1])
    log0(
        f"model: {summary['total_params']:,} parameters on this rank ({summary['expert_params']:,} in experts), "
        f"~{summary['activated_params_per_token']:,.0f} activated/token (uniform-router estimate)\n"
        f"data: {data.num_train_tokens:,} train tokens, {len(data.validation)} validation blocks of {block}\n"
        f"batch: {engine.train_batch_size()} sequences/step = {micro} per rank x "
        f"{engine.gradient_accumulation_steps()} accumulation x {world} ranks "
        f"({engine.train_batch_size() * block:,} tokens/step)\n"
        f"run: {exp.output_dir}  (TensorBoard: {tb_dir or 'disabled'})"
    )
    probe_ids = (torch.as_tensor(data.validation[0]["input_ids"])[:PROBE_TOKENS].reshape(1, -1).long()
                 if len(data.validation) else None)
    return TrainState(
        plan=plan, engine=engine, model_config=model_cfg, data=data, train_iter=train_iter, micro_batch=micro,
        writer=writer, accumulator=TrainAccumulator(),
        guard=StepGuard(run.on_nonfinite, engine.device, lambda: _last_checkpoint_path(exp.output_dir)),
        watch=watch, lock=lock, storage=storage, start_step=step, rank=rank, world_size=world,
        non_expert_params=int(summary["non_expert_params"]), placements=placements, layer_tags=tags,
        tb_dir=tb_dir, probe_ids=probe_ids)


def _vet_output_dirs(plan: TrainPlan, storage: CheckpointStorage) -> str | None:
    """Every rank: the checkpoint tag to resume from (``None``: a fresh start), once each output directory is vetted.

    Shared: rank 0 vets the directory and chooses. Node-local: each node's
    local rank 0 vets its own, then the nodes agree on the newest checkpoint
    complete on all of them (:func:`hmoe_ds.checkpoint.agree_on_checkpoint`). Writes nothing.
    """
    if not storage.node_local:
        return on_rank0(lambda: _vet_output_dir(plan))
    storage.on_writers(lambda: _vet_output_dir(plan, choose_checkpoint=False))
    resume = "auto" if plan.resume is True else plan.resume
    tag, notes = agree_on_checkpoint(storage, plan.exp.output_dir / CHECKPOINTS, resume)
    if collectives.rank() == 0:
        for line in notes:
            print(f"warning: --resume: {line}", file=sys.stderr, flush=True)
    return tag


def _vet_output_dir(plan: TrainPlan, choose_checkpoint: bool = True) -> str | None:
    """Rank 0 (each node's local rank 0 when node-local): what the output directory allows; prints the notes.

    Returns the checkpoint tag to resume from when ``choose_checkpoint``. Writes nothing.
    """
    from hmoe_ds.runner import check_runner_world

    try:  # plain `deepspeed --hostfile missing ...` falls back to local ranks with one warning: refuse that
        runner_note = check_runner_world(plan.world_size)
    except ValueError as exc:  # LaunchError, HostfileError
        raise ExperimentError(str(exc)) from None
    tag, notes = check_output_dir(plan.exp, plan.resume, choose_checkpoint=choose_checkpoint)
    notes += [runner_note] if runner_note else []
    for line in plan.warnings + notes:
        print(f"warning: {line}", file=sys.stderr, flush=True)
    return tag


def _prepare_start(plan: TrainPlan, vocab_size: int, tag: str | None, storage: CheckpointStorage) -> StartPoint:
    """The writer of the output directory (rank 0; each node's local rank 0 when node-local), before any model
    exists: check where the run starts, then (only then) make the directory this run's.

    Checks: is the checkpoint ``tag`` (or ``run.init_from``) usable by this run?
    A checkpoint of another world size, ZeRO stage, EP size or placement resumes
    elastically. The checkpoint itself was verified by :func:`check_output_dir`.
    Every mismatch (structure, expert sizes or count, shapes) is one
    ``CheckpointError`` here, not a failure halfway through ``load_checkpoint``
    on every rank.

    Then the writes: when resuming from step n, checkpoints after n (an abandoned
    branch) are moved aside and the metrics of steps after n are dropped from
    ``metrics.jsonl`` and TensorBoard, since this run computes them again; a
    ``--resume`` that found no verified checkpoint moves whatever checkpoint
    directories are there aside. Then ``experiment.yaml`` and ``ds_config.json``
    are (re)written.
    """
    from hmoe_ds.checkpoint import (check_compatible, read_marker, set_aside_newer_checkpoints,
                                    set_aside_unusable_checkpoints, truncate_metrics)
    from hmoe_ds.export import check_structure, resolve_source

    from .metrics import purge_tensorboard_after

    exp = plan.exp
    model_cfg = model_config_for(exp, plan.ds_config, vocab_size)
    checkpoints = exp.output_dir / CHECKPOINTS
    start, resume_step = StartPoint(), None
    if tag is not None:
        marker = read_marker(checkpoints / tag)
        changes = check_compatible(marker, checkpoints / tag, world_size=plan.world_size, model_config=model_cfg,
                                   zero_stage=zero_stage(plan.ds_config), storage=storage.describe())
        if exp.run.init_from:
            print(f"warning: run.init_from={exp.run.init_from} ignored: resuming from {checkpoints / tag}",
                  file=sys.stderr, flush=True)
        if changes:
            print(f"warning: --resume: elastic resume ({'; '.join(changes)}): weights and optimizer state come from "
                  "the checkpoint's logical shards", file=sys.stderr, flush=True)
        start, resume_step = StartPoint(tag=tag, elastic=bool(changes)), int(marker["step"])
    elif exp.run.init_from:
        source = resolve_source(exp.run.init_from)
        check_structure(source, model_cfg)
        print(f"initialising weights from {source.describe()}", flush=True)
        start = StartPoint(init_from=str(source.path))

    notes: list[str] = []
    if resume_step is None and plan.resume:
        # --resume found no verified checkpoint: whatever checkpoint directories are there (interrupted, damaged,
        # unreadable marker) are someone's work, so they and their metrics.jsonl move aside before this run saves.
        notes += [f"--resume: {note}" for note in set_aside_unusable_checkpoints(
            checkpoints, with_files=(exp.output_dir / "metrics.jsonl",))]
    if resume_step is not None:
        notes += [f"--resume: {note}" for note in set_aside_newer_checkpoints(checkpoints, resume_step)]
        tb_dir = tensorboard_dir(plan.ds_config)
        if tb_dir is not None and tb_dir.is_dir():
            purge_tensorboard_after(tb_dir, resume_step)
        dropped = truncate_metrics(exp.output_dir / "metrics.jsonl", resume_step)
        if dropped:
            notes.append(f"dropped {dropped} metrics.jsonl record(s) after step {resume_step} (the steps this run "
                         "computes again)")
    for line in notes:
        print(f"warning: {line}", file=sys.stderr, flush=True)
    exp.output_dir.mkdir(parents=True, exist_ok=True)
    header = f"# Resolved experiment (defaults filled, --set applied); source: {exp.source}\n"
    atomic_write_text(exp.output_dir / "experiment.yaml", header + yaml.safe_dump(exp.to_dict(), sort_keys=False))
    atomic_write_text(exp.output_dir / "ds_config.json", json.dumps(plan.ds_config, indent=2) + "\n")
    return start


def resume(engine: Any, train_iter: Any, checkpoints: Path, start: StartPoint, seed: int) -> int:
    """Load ``start``'s checkpoint (if any) into the engine and the data iterator; return the step to start from.

    A fresh start returns 0 and loads nothing. Exact resume (same world size and
    layout): DeepSpeed's own files plus this rank's loader/RNG file, bit for
    bit. Elastic resume: weights, fp32 master values and optimizer moments from
    the logical shards into this run's layout
    (:func:`hmoe_ds.shards.load_sharded_state`), the LR scheduler and step
    counters from DeepSpeed's rank-0 file, and the data position carried over in
    samples (the same global batches follow, as long as the global batch size is
    unchanged). Router noise is re-seeded, the one thing that cannot continue
    exactly across a change of world size. Collective.
    """
    from hmoe_ds.checkpoint import load_rank_state, restore_cpu_adam_step_state, set_rng_state

    if start.tag is None:
        return 0
    rank, world = collectives.rank(), collectives.world_size()
    tag_dir = checkpoints / start.tag
    if start.elastic:
        step = _restore_elastic(engine, train_iter, tag_dir)
        _seed(seed + world * step + rank)
    else:
        load_path, _ = engine.load_checkpoint(str(checkpoints), tag=start.tag)
        if load_path is None:  # DeepSpeed returns (None, None) instead of raising when it finds no state
            raise ExperimentError(f"{tag_dir}: DeepSpeed found no model state to load")
        state = load_rank_state(tag_dir, rank)
        try:
            train_iter.load_state_dict(state["loader"])
        except ValueError as exc:  # e.g. another micro batch size or other data: the batches would differ
            raise ExperimentError(f"{tag_dir}: {exc}") from None
        set_rng_state(state["rng"])  # the routers' noise continues as if never stopped
        step = int(state["step"])
    restore_cpu_adam_step_state(engine)  # ZeRO-Offload's Adam: bias correction as if never stopped
    log0(f"resumed from {tag_dir} at step {step}{' (elastic)' if start.elastic else ''}")
    memlog.mark("resume", step)
    return step


def _restore_elastic(engine: Any, train_iter: Any, tag_dir: Path) -> int:
    from hmoe_ds.checkpoint import load_rank_state
    from hmoe_ds.shards import ShardReader, load_sharded_state

    load_sharded_state(engine, ShardReader(tag_dir))
    state = load_rank_state(tag_dir, 0)
    step = int(state["step"])
    # DeepSpeed's rank-0 model-states file (ZeRO 0-2, or ZeRO-3's) holds the scheduler; expert files do not.
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    ds_files = [tag_dir / name for name in names if (tag_dir / name).is_file()]
    if engine.lr_scheduler is not None and ds_files:
        # mmap: under ZeRO 0-2 this file holds the whole dense model; only the scheduler's few bytes are read
        client = torch.load(ds_files[0], map_location="cpu", mmap=True, weights_only=False)
        if client.get("lr_scheduler") is not None:
            scheduler = engine.lr_scheduler
            scheduler.load_state_dict(client["lr_scheduler"])
            # Exact resume restores the optimizer's param_groups (their lr) from DeepSpeed's files; here they are
            # fresh, holding the schedule's first lr, so set the lr the schedule is at.
            for group, lr in zip(engine.optimizer.param_groups, scheduler.get_lr()):
                group["lr"] = lr
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()
    try:
        train_iter.load_global_state(state["loader"])
    except ValueError as exc:
        raise ExperimentError(f"{tag_dir}: {exc}") from None
    return step


# --------------------------------------------------------------------------- the loop


def _train(plan: TrainPlan) -> int:
    """Set up, train until ``run.train_steps`` (or a stop request), finish; returns the exit code (every rank)."""
    from tqdm import tqdm

    state = set_up(plan)
    run = plan.exp.run
    try:
        if state.start_step == 0 and run.eval_at_start:
            state.first_val = state.last_val = validate(state, 0)
        state.bar = tqdm(total=run.train_steps, initial=state.start_step, desc=run.run_name,
                         disable=state.rank != 0 or not run.progress_bar, dynamic_ncols=True, file=sys.stderr)
        step, stopped_by = train_loop(state)
    finally:
        state.close()
    return finish(state, step, stopped_by)


def train_loop(s: TrainState) -> tuple[int, str | None]:
    """Train from ``s.start_step`` to ``run.train_steps``; returns (last step, what stopped it early or ``None``)."""
    run, engine = s.plan.exp.run, s.engine
    step = logged_at = s.start_step  # the accumulator's window starts at logged_at
    engine.train()
    while step < run.train_steps:
        batch = next(s.train_iter)
        input_ids, labels = batch["input_ids"].to(engine.device), batch["labels"].to(engine.device)
        out = engine(input_ids=input_ids, labels=labels)
        loss = maybe_poison_loss(out.loss, step + 1, s.rank)  # test-only hook; the loss itself unless set
        s.guard.observe_loss(loss)
        engine.backward(loss)
        maybe_kill_during_step(step + 1, s.rank)  # test-only crash hook; no-op unless its env var is set
        boundary = engine.is_gradient_accumulation_boundary()  # must be asked before step()
        engine.step()
        s.accumulator.update(out, input_ids.numel())
        if not boundary:
            continue
        step += 1
        memlog.mark("train", step)
        s.bar.update(1)
        # One all-reduce per step: a non-finite loss on any rank, and a stop request on any rank.
        skipped, stop = s.guard.end_step(step, engine.get_global_grad_norm(), s.watch.requested)
        if skipped:  # run.on_nonfinite: skip (stop mode has raised)
            _after_skipped_step(s, step)
        final = step == run.train_steps
        if step % run.log_every == 0 or final:
            log_metrics(s, step, steps_in_window=step - logged_at)
            logged_at = step
        paused = time.perf_counter()
        if (run.eval_every and step % run.eval_every == 0) or final:
            s.last_val = validate(s, step)
        if (run.save_every and step % run.save_every == 0) or final or (stop and run.save_on_signal):
            s.guard.check_parameters(engine.module, step, "refusing to save them")
            save_checkpoint(s, step)
        s.accumulator.exclude_time(time.perf_counter() - paused)  # throughput counts training time only
        if stop and not final:
            return step, s.watch.reason or "a stop request on another rank"
    return step, None


def _after_skipped_step(s: TrainState, step: int) -> None:
    s.guard.check_parameters(s.engine.module, step, "skipping cannot undo an update that already reached them "
                             "(DeepSpeed drops such updates itself under ZeRO 1-2, or with fp16/bf16)")
    log0(f"step {step}: non-finite loss or gradient norm; step skipped ({s.guard.skipped} so far)")


def log_metrics(s: TrainState, step: int, steps_in_window: int) -> None:
    """Reduce the window's training statistics over ranks and write them (metrics.jsonl, TensorBoard, the bar)."""
    from .metrics import ep_load_scalars, format_postfix, routing_scalars

    scalars, loads = s.accumulator.reduce()
    scalars.update(s.guard.scalars())
    scalars["train/lr"] = float(s.engine.get_lr()[0])
    grad_norm = s.engine.get_global_grad_norm()
    if grad_norm is not None:
        scalars["train/grad_norm"] = float(grad_norm)
    scalars.update(routing_scalars(loads, s.non_expert_params, tags=s.layer_tags))
    scalars.update(ep_load_scalars(loads, s.placements, steps_in_window, s.world_size, tags=s.layer_tags))
    # metrics.jsonl keeps every routing tag (placement: measured and simulate_cluster read the per-expert shares)
    every = {**routing_scalars(loads, s.non_expert_params),
             **ep_load_scalars(loads, s.placements, steps_in_window, s.world_size)}
    s.writer.write(step, scalars, record_only={k: v for k, v in every.items() if k not in scalars})
    s.writer.write_load_histograms(step, loads)
    s.bar.set_postfix(format_postfix(scalars), refresh=False)


def validate(s: TrainState, at: int) -> float:
    """Validation loss and expert load at step ``at``, written and logged; returns the loss. Collective."""
    from hmoe_ds.data import EvalBatchIterator

    from .evaluate import evaluate

    run = s.plan.exp.run
    loader = EvalBatchIterator(s.data.validation, s.micro_batch, rank=s.rank, world_size=s.world_size)
    result = evaluate(s.engine, loader, run.eval_batches, s.engine.device)
    s.writer.write(at, result.scalars())
    s.writer.write_expert_load(at, result.loads, f"{run.run_name}: validation expert load, step {at}")
    log0(f"step {at}: val/loss {result.loss:.4f}  val/ppl {result.ppl:.2f}")
    memlog.mark("eval", at)
    return result.loss


def save_checkpoint(s: TrainState, at: int) -> None:
    """Save the checkpoint of step ``at`` (collective); a full disk is one :class:`ExperimentError`."""
    exp = s.plan.exp
    started = time.perf_counter()
    try:
        tag_dir, notes = save_training_checkpoint(
            s.engine, s.checkpoints, at,
            rank_state={"loader": s.train_iter.state_dict(), "rng": rng_state()},
            experiment=exp.to_dict(), tokenizer=s.data.tokenizer if s.storage.writer else None,
            probe_ids=s.probe_ids, storage=s.storage)
    except (OSError, RuntimeError) as exc:
        full = disk_full_error(exc, s.checkpoints, at, _last_checkpoint_path(exp.output_dir))
        if full is None:
            raise
        # Raised by this rank's own write (DeepSpeed's files are written by every rank): say it here, since
        # the other ranks may not have failed. A rank-0 failure relayed by on_rank0 is printed by rank 0.
        full.local = s.rank != 0 and not str(exc).startswith("rank 0 failed")  # type: ignore[attr-defined]
        raise full from None
    for note in notes:
        log0(f"note: {note}")
    log0(f"step {at}: checkpoint saved to {tag_dir} ({time.perf_counter() - started:.2f} s)")
    memlog.mark("save", at)


def finish(s: TrainState, step: int, stopped_by: str | None) -> int:
    """Report, destroy the engine, release the run lock; returns the exit code (143 when stopped early)."""
    from .signals import EXIT_CODE

    exp = s.plan.exp
    if stopped_by is not None:
        saved = (f"checkpoint saved: {_last_checkpoint_path(exp.output_dir)}; --resume continues from it"
                 if exp.run.save_on_signal else "no checkpoint saved (run.save_on_signal is false)")
        log0(f"stopped after step {step} ({stopped_by}); {saved}")
    elif s.rank == 0:
        _final_report(exp, s.tb_dir, s.first_val, s.last_val, step)
    s.engine.destroy()
    if s.lock.held:  # rank 0, or each node's local rank 0 with node-local checkpoints
        s.lock.release()
    return EXIT_CODE if stopped_by is not None else 0


# --------------------------------------------------------------------------- reporting


_DISK_FULL = ("No space left on device", "iostream error", "file write failed", "inline_container.cc",
              "Disk quota exceeded")


def disk_full_error(exc: BaseException, checkpoints: Path, step: int, last: str | None) -> ExperimentError | None:
    """A one-line error for a save that ran out of disk, or ``None`` if ``exc`` is something else.

    DeepSpeed's own writes go through torch's zip writer, which reports a full
    disk as ``basic_ios::clear: iostream error`` / ``enforce fail at
    inline_container.cc`` without the word "space"; ``errno`` ENOSPC/EDQUOT
    covers plain Python writes.
    """
    import errno as errno_codes

    seen: BaseException | None = exc
    matched = False
    while seen is not None and not matched:
        matched = getattr(seen, "errno", None) in (errno_codes.ENOSPC, errno_codes.EDQUOT) or any(
            marker in str(seen) for marker in _DISK_FULL)
        seen = seen.__cause__ or seen.__context__
    if not matched:
        return None
    try:
        import shutil

        where = checkpoints if checkpoints.exists() else checkpoints.parent
        free = f"{shutil.disk_usage(where).free / 2**20:,.1f} MiB free now"
    except OSError:
        free = "free space unknown"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    kept = f"the last complete checkpoint, {last}, is intact" if last else "no earlier checkpoint exists"
    return ExperimentError(
        f"step {step}: the checkpoint could not be written to {checkpoints}: the disk is full, or the write "
        f"failed ({free}; "
        f"{first[:160]}). The partial save has no completion marker, so resume skips it and {kept}. Free space "
        "(or point run.output_dir at a larger disk) and run again with --resume")


def _take_lock(lock: Any) -> None:
    """Rank 0: lock the output directory for this run (an error names the run holding it)."""
    note = lock.acquire(" ".join(sys.argv))
    if note:
        print(f"warning: {note}", file=sys.stderr, flush=True)


def _last_checkpoint_path(output_dir: Path) -> str | None:
    tag = latest_checkpoint_tag(output_dir)
    return str(output_dir / CHECKPOINTS / tag) if tag else None


def _final_report(exp: Experiment, tb_dir: Path | None, first: float | None, last: float | None, step: int) -> None:
    lines = [f"done: {step} steps"]
    if first is not None and last is not None:
        lines.append(f"validation loss {first:.4f} (step 0) -> {last:.4f} (step {step})")
    elif last is not None:
        lines.append(f"validation loss {last:.4f} (step {step})")
    lines.append(f"checkpoint:  {exp.output_dir / CHECKPOINTS}  (latest: {latest_checkpoint_tag(exp.output_dir)})")
    lines.append(f"metrics:     {exp.output_dir / 'metrics.jsonl'}")
    if tb_dir is not None:
        lines.append(f"TensorBoard: tensorboard --logdir {tb_dir.parent}   then open http://localhost:6006")
    print("\n".join(lines), flush=True)

