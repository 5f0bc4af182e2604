#!/usr/bin/env python
"""The HMoE paper's main comparison (Table 1) at small scale, in one command.

    .venv/bin/python run/experiments/paper_comparison.py [--scale S] [--steps N] [--out DIR] [--seeds N]
        [--arms moe_topk,moe_topp,hmoe_topk,hmoe_topp,hmoe_topp_matched | all] [--num-ranks R]
        [--set KEY=VALUE ...] [--zero-shot [--zero-shot-limit N]] [--resume | --report-only]

Trains every arm of ``configs/arms.yaml`` (default: homogeneous MoE Top-K/Top-P, HMoE Top-K/Top-P and
HMoE Top-P at the activated parameters of MoE Top-K) with ``run/train.py`` through the deepspeed
launcher, one run after the other, once per seed (``--seeds N``: seeds base, base+1, ..., base+N-1),
on the same tokenised data, batch and token budget and with equal total parameters; evaluates each
final checkpoint on the whole validation split with ``run/eval.py`` (and, with ``--zero-shot``, zero-shot
with ``run/zero_shot.py``); then writes to ``--out``:

    results.md                the tables: per arm (mean +- std over seeds), HMoE-vs-MoE differences with
                              95% confidence intervals, and every run
    results.csv               one row per run (arm x seed)
    arms.csv                  one row per arm (means and standard deviations over seeds, training FLOPs)
    comparisons.csv           one row per HMoE-vs-MoE pair and metric (difference, paired and Welch intervals)
    val_loss.png              validation loss (and activated expert parameters) vs training tokens
    expert_share.png          share of routed (token, expert) pairs per expert vs its size, per arm
    summary.json              everything above plus the set-up (data cache, seeds, commands, timings)
    <arm>/                    the run (one seed), or <arm>/seed<S>/ per seed (two or more seeds): metrics.jsonl,
                              TensorBoard, checkpoint, eval_final.json, and zero_shot.json (``--zero-shot``,
                              or an lm-evaluation-harness result put there by hand)
    logs/<run>.{train,eval}.log

What a seed changes: ``run.seed``, i.e. the initial weights and the order of the training batches (and
any random draw in training; the arms' dropless routing makes none). The tokeniser, the train/validation
split (``data.seed``) and so the validation set stay fixed, and run ``i`` of every arm shares its seed,
so arms are compared paired by seed.

``--scale`` (default 1: the 2-core CPU size) sets the model shape, batch, sequence length, steps and
learning rate from one number; see :func:`plan_for_scale` and the README next to this file.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BASE_YAML = HERE / "configs" / "base.yaml"
ARMS_YAML = HERE / "configs" / "arms.yaml"
DS_JSON = HERE / "configs" / "ds_base.json"
NUM_EXPERTS = 8
#: Optimizer steps of the --scale 1 run: ~1.2M training tokens (0.9 epoch of the default corpus).
BASE_STEPS = 600
EVAL_NAME = "eval_final.json"
#: Where a zero-shot evaluation of a run is looked for (``<run dir>/zero_shot.json``); see :func:`read_zero_shot`.
ZERO_SHOT_NAME = "zero_shot.json"


def log(message: str) -> None:
    print(f"[paper_comparison] {message}", flush=True)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ScalePlan:
    """Everything ``--scale`` decides (formulas in :func:`plan_for_scale`)."""

    scale: float
    hidden_size: int
    num_layers: int
    num_heads: int
    expert_hidden: int  # h: the homogeneous experts' FFN size; HMoE sizes sum to 8h
    block_size: int
    global_batch: int  # sequences per optimizer step (all ranks)
    micro_batch: int  # sequences per rank per forward
    num_ranks: int
    steps: int
    eval_every: int
    lr: float
    warmup_steps: int
    size_multiple: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.block_size

    def overrides(self) -> list[str]:
        """The scale-dependent ``--set`` overrides shared by every arm."""
        return [
            f"model.hidden_size={self.hidden_size}",
            f"model.num_hidden_layers={self.num_layers}",
            f"model.num_attention_heads={self.num_heads}",
            f"model.max_position_embeddings={self.block_size}",
            f"data.block_size={self.block_size}",
            f"run.train_steps={self.steps}",
            f"run.eval_every={self.eval_every}",
        ]

    def ds_config(self, base: dict[str, Any]) -> dict[str, Any]:
        """``base`` (the DeepSpeed JSON) with the batch triple and the warm-up schedule of this plan."""
        cfg = json.loads(json.dumps(base))
        cfg["train_batch_size"] = self.global_batch
        cfg["train_micro_batch_size_per_gpu"] = self.micro_batch
        cfg["gradient_accumulation_steps"] = self.global_batch // (self.micro_batch * self.num_ranks)
        cfg["optimizer"]["params"]["lr"] = self.lr
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": self.lr,
                                                           "warmup_num_steps": self.warmup_steps,
                                                           "warmup_type": "linear"}}
        return cfg


def plan_for_scale(scale: float, num_ranks: int, steps: int | None = None, micro_batch: int | None = None,
                   size_multiple: int = 16) -> ScalePlan:
    """The model/batch/schedule of ``--scale S``.

    * width d = 64 * round(2S) (128 at S=1, 768 at S=6 = the paper's 0.4B width);
      heads of 32 dims up to d=256, of 64 above (12 heads at d=768, as in the paper);
    * layers = round(2 + 2S), at most 12 (4 at S=1, 12 from S=5 = the paper's depth);
    * homogeneous expert size h = 2d, so 8 experts sum to 16d (12,288 at S=6 = the paper's 0.4B sum);
    * sequence length = 128 * S (multiple of 32, >= 32) and global batch = 16 * S sequences
      (rounded to a multiple of the ranks), so tokens per step grow as S^2;
    * steps = 600 * S (``--steps`` overrides); warm-up 1/16 of the steps (at most 1000, then constant
      learning rate, like the paper); peak lr = 1e-3 / sqrt(S).
    """
    if not scale > 0:
        raise SystemExit(f"--scale={scale}: must be > 0")
    if num_ranks < 1:
        raise SystemExit(f"--num-ranks={num_ranks}: must be >= 1")
    if micro_batch is not None and micro_batch < 1:
        raise SystemExit(f"--micro-batch={micro_batch}: must be >= 1 (or left out: global batch / ranks)")
    d = 64 * max(1, round(2 * scale))
    heads = d // 32 if d <= 256 else d // 64
    layers = max(2, min(12, round(2 + 2 * scale)))
    block = max(32, 32 * round(128 * scale / 32))
    batch = max(num_ranks, num_ranks * round(16 * scale / num_ranks))
    total_steps = steps if steps is not None else max(1, round(BASE_STEPS * scale))
    if total_steps < 1:
        raise SystemExit(f"--steps={total_steps}: must be >= 1")
    micro = micro_batch if micro_batch is not None else batch // num_ranks
    if batch % (micro * num_ranks):
        raise SystemExit(f"--micro-batch={micro}: the global batch {batch} must be a multiple of "
                         f"micro batch x ranks = {micro * num_ranks}")
    return ScalePlan(scale=scale, hidden_size=d, num_layers=layers, num_heads=heads, expert_hidden=2 * d,
                     block_size=block, global_batch=batch, micro_batch=micro, num_ranks=num_ranks,
                     steps=total_steps, eval_every=max(1, total_steps // 8), lr=1e-3 / math.sqrt(scale),
                     warmup_steps=max(1, min(1000, total_steps // 16)), size_multiple=size_multiple)


@dataclass
class Arm:
    """One model of the comparison (an entry of ``configs/arms.yaml``)."""

    name: str
    label: str
    experts: str  # uniform | arithmetic | hybrid | dense
    settings: dict[str, Any] = field(default_factory=dict)

    def expert_sizes(self, plan: ScalePlan) -> list[int] | None:
        """FFN sizes of the 8 experts (``None`` for the dense arm); they sum to 8h for every MoE arm."""
        from hmoe_ds.sizes import solve_expert_sizes

        if self.experts == "dense":
            return None
        if self.experts == "uniform":
            return [plan.expert_hidden] * NUM_EXPERTS
        return solve_expert_sizes(num_experts=NUM_EXPERTS, homogeneous_hidden=plan.expert_hidden,
                                  distribution=self.experts, multiple=plan.size_multiple)

    def overrides(self, plan: ScalePlan) -> list[str]:
        """This arm's ``--set`` overrides (on top of the plan's): expert sizes and its own settings."""
        sizes = self.expert_sizes(plan)
        out = [f"model.dense_intermediate_size={2 * plan.expert_hidden}"] if sizes is None else [
            f"model.moe.expert_sizes={json.dumps(sizes)}"]
        out += [f"{key}={json.dumps(value)}" for key, value in self.settings.items()]
        return out


@dataclass(frozen=True)
class Pair:
    """An HMoE arm and the homogeneous MoE arm it is compared with (``pairs`` in ``configs/arms.yaml``)."""

    hmoe: str
    moe: str
    note: str = ""


def load_pairs(path: Path) -> list[Pair]:
    """The HMoE-vs-MoE pairs of ``path``; a pair is reported when both of its arms were run."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    pairs = [Pair(hmoe=p["hmoe"], moe=p["moe"], note=p.get("note", "")) for p in raw.get("pairs") or []]
    unknown = sorted({name for p in pairs for name in (p.hmoe, p.moe)} - set(raw["arms"]))
    if unknown:
        raise SystemExit(f"{path}: pairs name unknown arm(s) {unknown}")
    return pairs


def seeds_for(base: int, count: int) -> list[int]:
    """The seeds of ``--seeds count``: base, base + 1, ..., base + count - 1 (the same for every arm)."""
    if count < 1:
        raise SystemExit(f"--seeds={count}: must be >= 1")
    if base < 0:
        raise SystemExit(f"--seed={base}: must be >= 0")
    return [base + i for i in range(count)]


def run_name(arm: str, seed: int, multi_seed: bool) -> str:
    """A run's name in logs and tables: the arm, plus ``.seed<S>`` when there are several seeds."""
    return f"{arm}.seed{seed}" if multi_seed else arm


def run_path(out: Path, arm: str, seed: int, multi_seed: bool) -> Path:
    """``<out>/<arm>`` for a single seed (the layout of earlier versions), ``<out>/<arm>/seed<S>`` otherwise."""
    return out / arm / f"seed{seed}" if multi_seed else out / arm


def load_arms(path: Path, selection: str | None) -> list[Arm]:
    """Arms named in ``selection`` (comma list, ``all``, or ``None`` = the file's ``default``)."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    table = {name: Arm(name=name, label=spec.get("label", name), experts=spec["experts"],
                       settings=dict(spec.get("set") or {})) for name, spec in raw["arms"].items()}
    for arm in table.values():
        if arm.experts not in ("uniform", "arithmetic", "hybrid", "geometric", "dense"):
            raise SystemExit(f"{path}: arm {arm.name}: experts={arm.experts!r}; allowed: uniform, arithmetic, "
                             "hybrid, geometric, dense")
    names = list(table) if selection == "all" else (
        [n.strip() for n in selection.split(",") if n.strip()] if selection else raw["default"])
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise SystemExit(f"--arms: unknown arm(s) {unknown}; known: {', '.join(table)} (or 'all')")
    return [table[n] for n in names]


# --------------------------------------------------------------------------- running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    """The environment of run/env.sh (hmoe_ds.env): CPU accelerator when no GPU, offline hubs."""
    from hmoe_ds.env import configure_environment

    configure_environment()
    return dict(os.environ)


def prepare_data(overrides: list[str]) -> dict[str, Any]:
    """Build (or reuse) the tokenised dataset once, here, so every arm reads the very same cache entry."""
    import datasets

    from hmoe_ds.data import build_lm_datasets
    from hmoe_ds.training.experiment import load_experiment

    datasets.disable_progress_bars()
    data = build_lm_datasets(load_experiment(BASE_YAML, overrides).data_config())
    return {"cache_path": str(data.cache_path.resolve()), "num_train_blocks": len(data.train),
            "num_val_blocks": len(data.validation), "num_train_tokens": int(data.num_train_tokens),
            "vocab_size": len(data.tokenizer),
            **{k: data.manifest.get(k) for k in ("corpus", "corpus_fingerprint", "tokenizer",
                                                 "tokenizer_fingerprint", "block_size", "seed")}}


def run_logged(cmd: list[str], log_path: Path, env: dict[str, str], progress: Path | None, steps: int) -> float:
    """Run ``cmd`` (cwd = repo) with its output in ``log_path``; report progress from metrics.jsonl."""
    start = time.monotonic()
    with log_path.open("w", encoding="utf-8") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        last_report = start
        try:
            while proc.poll() is None:
                time.sleep(2)
                if progress is not None and time.monotonic() - last_report > 60:
                    last_report = time.monotonic()
                    log(f"  ... {_progress(progress, steps)} ({time.monotonic() - start:.0f} s)")
        finally:  # interrupted (Ctrl-C) or failed: never leave a training run behind
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-30:])
        raise SystemExit(f"command failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    return elapsed


def _progress(metrics: Path, steps: int) -> str:
    from hmoe_ds.training.metrics import read_jsonl

    if not metrics.is_file():
        return "starting"
    records = read_jsonl(metrics)
    train = [r for r in records if "train/lm_loss" in r]
    if not train:
        return "step 0"
    r = train[-1]
    return f"step {r['step']}/{steps}, train loss {r['train/lm_loss']:.3f}"


def train_and_eval(arm: Arm, seed: int, args: argparse.Namespace, plan: ScalePlan, common: list[str], out: Path,
                   env: dict[str, str], multi_seed: bool) -> dict[str, float]:
    """Train one arm with one seed through the deepspeed launcher, then evaluate its checkpoint; return wall times."""
    name = run_name(arm.name, seed, multi_seed)
    directory = run_path(out, arm.name, seed, multi_seed)
    eval_json = directory / EVAL_NAME
    timings = _read_json(out / "logs" / f"{name}.timing.json") or {}
    if args.resume and eval_json.is_file():
        log(f"{name}: already trained and evaluated, skipped (--resume)")
        if args.zero_shot and not (directory / ZERO_SHOT_NAME).is_file():
            timings["zero_shot_wall_s"] = round(zero_shot(name, directory, args, out, env), 1)
            (out / "logs" / f"{name}.timing.json").write_text(json.dumps(timings) + "\n", encoding="utf-8")
        return timings
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_accelerators", str(plan.num_ranks), "--master_port", str(free_port()),
           "run/train.py", "--config", str(BASE_YAML), "--deepspeed_config", str(out / "ds_config.json"),
           "--set", *common, *arm.overrides(plan), f"run.seed={seed}", f"run.output_dir={directory}",
           f"run.run_name={name}"]
    if args.resume:
        cmd.append("--resume")
    log(f"{name}: training ({arm.label}, seed {seed}); log {out / 'logs' / (name + '.train.log')}")
    train_s = run_logged(cmd, out / "logs" / f"{name}.train.log", env, directory / "metrics.jsonl", plan.steps)
    cmd = [sys.executable, "run/eval.py", str(directory), "--output", str(eval_json)]
    eval_s = run_logged(cmd, out / "logs" / f"{name}.eval.log", env, None, 0)
    result = _read_json(eval_json) or {}
    log(f"{name}: trained in {train_s:.0f} s ({train_s / plan.steps:.2f} s/step incl. start-up and "
        f"evaluations), evaluated in {eval_s:.0f} s: val loss {result.get('loss', float('nan')):.4f}")
    timings = {"train_wall_s": round(train_s, 1), "eval_wall_s": round(eval_s, 1)}
    if args.zero_shot:
        timings["zero_shot_wall_s"] = round(zero_shot(name, directory, args, out, env), 1)
    (out / "logs" / f"{name}.timing.json").write_text(json.dumps(timings) + "\n", encoding="utf-8")
    return timings


def check_zero_shot_ready() -> None:
    """Before the first run: ``--zero-shot`` needs lm-evaluation-harness and the prepared task data."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise SystemExit("--zero-shot: lm-evaluation-harness is not installed; `pip install -e .[eval]` "
                         "(run/setup.sh does it)")
    from hmoe_ds.eval_tasks import EvalDataMissing, check_prepared

    try:
        check_prepared()
    except EvalDataMissing as exc:
        raise SystemExit(f"--zero-shot: {exc}") from None


def zero_shot(name: str, directory: Path, args: argparse.Namespace, out: Path, env: dict[str, str]) -> float:
    """``run/zero_shot.py`` on the run's final checkpoint (the shipped BIG-bench tasks) into ``<run>/zero_shot.json``."""
    cmd = [sys.executable, "run/zero_shot.py", str(directory), "--output", str(directory / ZERO_SHOT_NAME)]
    if args.zero_shot_limit is not None:
        cmd += ["--limit", str(args.zero_shot_limit)]
    seconds = run_logged(cmd, out / "logs" / f"{name}.zero_shot.log", env, None, 0)
    found = read_zero_shot(directory / ZERO_SHOT_NAME) or {}
    log(f"{name}: zero-shot in {seconds:.0f} s: mean acc {found.get('acc', float('nan')):.4f} over "
        f"{len(found.get('tasks', {}))} tasks")
    return seconds


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# --------------------------------------------------------------------------- collecting


def read_zero_shot(path: Path) -> dict[str, Any] | None:
    """Zero-shot accuracies of a run from ``<run dir>/zero_shot.json``, or ``None`` when there is none.

    The file is what ``run/zero_shot.py`` writes (``{"tasks": {task: {"acc": ..., "acc_norm": ...,
    "examples": ...}}}``; a group's aggregate row, without ``examples``, is skipped) or
    lm-evaluation-harness's results layout, ``{"results": {task: {"acc,none": ...,
    "acc_norm,none": ..., ...}}}`` (keys without the ``,none`` filter suffix, or the task table at the top
    level, are accepted too). Tasks without an ``acc`` are skipped (e.g. a group's aggregate). Returns the
    per-task values and their unweighted means over tasks, as the paper's average column.
    """
    raw = _read_json(path)
    if raw is None:
        return None
    ours = isinstance(raw, dict) and isinstance(raw.get("tasks"), dict)  # run/zero_shot.py's summary
    table = (raw["tasks"] if ours else raw.get("results", raw)) if isinstance(raw, dict) else None
    tasks: dict[str, dict[str, float]] = {}
    for task, metrics in (table or {}).items():
        if not isinstance(metrics, dict):
            continue
        if ours and "examples" not in metrics:  # a group's aggregate (it has no examples of its own)
            continue
        found = {}
        for metric in ("acc", "acc_norm"):
            value = metrics.get(metric, metrics.get(f"{metric},none"))
            if isinstance(value, (int, float)):
                found[metric] = float(value)
        if "acc" in found:
            tasks[str(task)] = found
    if not tasks:
        raise SystemExit(f"{path}: no task with an 'acc' (or 'acc,none') value; expected lm-evaluation-harness's "
                         '{"results": {task: {"acc,none": ..., "acc_norm,none": ...}}}')
    norms = [m["acc_norm"] for m in tasks.values() if "acc_norm" in m]
    return {"tasks": tasks, "acc": _mean(m["acc"] for m in tasks.values()),
            "acc_norm": _mean(norms) if len(norms) == len(tasks) else float("nan")}


def training_flops(activated_params: float, train_tokens: int, num_layers: int, context: int, hidden: int
                   ) -> float:
    """Training FLOPs by the standard approximation of Kaplan et al. (2020, Sec. 2.1).

    The paper's budgets are training FLOPs; its exact count is not reproduced here, so this is the usual
    one, with the activated (not the total) parameters, since compute per token depends on them:

    C = 6 N D + 6 n_layer n_ctx d D: 2 FLOPs per multiply-accumulate, times 3 for the forward and the
    backward pass, over the D training tokens, for the N parameters a token activates (here the
    activated parameters per token averaged over training, embeddings/LM head included) and for the
    attention scores and weighted values (2 n_layer n_ctx d per token forward; n_ctx = the sequence length).
    """
    return 6.0 * train_tokens * (activated_params + num_layers * context * hidden)


def collect(arm: Arm, seed: int, out: Path, timings: dict[str, float], multi_seed: bool) -> dict[str, Any]:
    """One table row from a run's saved files (what the run actually used, not what was intended)."""
    from hmoe_ds.modeling import HMoEConfig, parameter_summary
    from hmoe_ds.sizes import expert_param_count
    from hmoe_ds.training.metrics import read_jsonl

    run_dir = run_path(out, arm.name, seed, multi_seed)
    exp = yaml.safe_load((run_dir / "experiment.yaml").read_text(encoding="utf-8"))
    ds = _read_json(run_dir / "ds_config.json")
    config = HMoEConfig.from_json_file(str(run_dir / "model_config.json"))
    params = parameter_summary(config)
    records = read_jsonl(run_dir / "metrics.jsonl")
    ev = _read_json(run_dir / EVAL_NAME)
    tokens_per_step = int(ds["train_batch_size"]) * int(exp["data"]["block_size"])
    val = [(r["step"] * tokens_per_step, r["val/loss"]) for r in records if r.get("val/loss") is not None]
    train = [r for r in records if "train/lm_loss" in r]
    is_moe = config.moe_layer_frequency > 0
    layers = ev.get("moe_layers") or []
    expert_act = sum(layer["activated_expert_params_per_token"] for layer in layers)
    tail = train[len(train) * 3 // 4:] or train  # the last quarter of training
    train_tokens = int(exp["run"]["train_steps"]) * tokens_per_step
    # Training compute follows what the router activated during training (Top-P starts with most experts
    # on), so its N is the mean over the logged training steps, not the measurement after training.
    train_act = _mean(r.get("moe/activated_params_per_token") for r in train) if is_moe else \
        float(params["total_params"])
    zero_shot = read_zero_shot(run_dir / ZERO_SHOT_NAME)
    return {
        "arm": arm.name,
        "run": run_name(arm.name, seed, multi_seed),
        "label": arm.label,
        "routing": (f"top_k k={config.moe['top_k']}" if config.moe["routing"] == "top_k"
                    else f"top_p p={config.moe['top_p']}") if is_moe else "dense",
        "expert_sizes": " ".join(map(str, config.moe["expert_sizes"])) if is_moe else
        f"dense FFN {config.dense_intermediate_size}",
        "losses": _loss_label(config.moe) if is_moe else "-",
        "total_params": int(params["total_params"]),
        "non_expert_params": int(params["non_expert_params"]),
        "activated_params_per_token": float(ev["activated_params_per_token"]) if is_moe else
        float(params["total_params"]),
        "activated_expert_params_per_token": float(expert_act) if is_moe else  # dense: every FFN, every token
        float(config.num_hidden_layers * expert_param_count(config.hidden_size, config.dense_intermediate_size)),
        "mean_experts_per_token": float(ev["mean_experts_per_token"]) if is_moe else float("nan"),
        "train_activated_params_last_quarter": _mean(r.get("moe/activated_params_per_token") for r in tail),
        "train_experts_per_token_last_quarter": _mean(r.get("moe/mean_experts_per_token") for r in tail),
        "train_activated_params_mean": train_act,
        "train_flops": training_flops(train_act, train_tokens, config.num_hidden_layers,
                                      int(exp["data"]["block_size"]), config.hidden_size),
        "zero_shot_acc": zero_shot["acc"] if zero_shot else float("nan"),
        "zero_shot_acc_norm": zero_shot["acc_norm"] if zero_shot else float("nan"),
        "_zero_shot_tasks": zero_shot["tasks"] if zero_shot else {},
        "final_val_loss": float(ev["loss"]),
        "final_val_ppl": float(ev["ppl"]),
        "step0_val_loss": val[0][1] if val and val[0][0] == 0 else float("nan"),
        "val_tokens": int(ev["tokens"]),
        "train_steps": int(exp["run"]["train_steps"]),
        "train_tokens": train_tokens,
        "seed": int(exp["run"]["seed"]),
        "data_cache": str(exp["data"].get("tokenized_cache")),
        "train_batch_size": int(ds["train_batch_size"]),
        "micro_batch": int(ds["train_micro_batch_size_per_gpu"]),
        "block_size": int(exp["data"]["block_size"]),
        "train_wall_s": timings.get("train_wall_s", float("nan")),
        "eval_wall_s": timings.get("eval_wall_s", float("nan")),
        # for the plots (not in the CSV)
        "_val_curve": val,
        "_train_curve": [(r["step"] * tokens_per_step, r.get("moe/activated_params_per_token"),
                          r.get("moe/mean_experts_per_token")) for r in train],
        "_layers": layers,
        "_non_expert": int(params["non_expert_params"]),
    }


def _loss_label(moe: dict[str, Any]) -> str:
    names = {"load_balance_coef": "LB", "p_penalty_coef": "P-Pen", "entropy_coef": "Ent", "z_loss_coef": "z"}
    return ", ".join(f"{short} {moe[key]:g}" for key, short in names.items() if moe.get(key)) or "none"


def _mean(values: Any) -> float:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def consistency(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Checks that the comparison is fair: for each seed, identical data order and budget in every arm;
    the same seeds in every arm; equal total parameters in the MoE arms."""
    keys = ("data_cache", "train_batch_size", "micro_batch", "block_size", "train_steps", "train_tokens")
    identical = {k: len({r[k] for r in rows}) == 1 for k in keys}
    seeds = {arm: sorted(r["seed"] for r in rows if r["arm"] == arm) for arm in dict.fromkeys(r["arm"] for r in rows)}
    identical["seeds"] = len({tuple(v) for v in seeds.values()}) == 1
    moe_totals = {r["total_params"] for r in rows if r["routing"] != "dense"}
    return {"identical_data_order_and_budget": all(identical.values()), "identical": identical, "seeds": seeds,
            "equal_total_params_moe_arms": len(moe_totals) <= 1, "moe_total_params": sorted(moe_totals)}


# --------------------------------------------------------------------------- statistics over seeds
#
# The standard library has no Student t distribution (and scipy is not a dependency), so its CDF is
# written here through the regularised incomplete beta function and inverted by bisection; the tests
# check it against tabulated quantiles and the closed forms for 1 and 2 degrees of freedom.

#: Confidence level of every interval in the report.
CONFIDENCE = 0.95
ONE_SEED = "n/a (1 seed)"


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (valid, and fast, for x < (a + 1) / (a + b + 2)).

    I_x(a, b) = x^a (1-x)^b / (a B(a, b)) / (1 + d1 / (1 + d2 / (1 + ...))), with
    d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)) and d_{2m} = m(b-m) x / ((a+2m-1)(a+2m));
    evaluated by the modified Lentz method (Press et al., Numerical Recipes, section 6.4).
    """
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for j in range(1, 10_000):
        m = j // 2
        if j % 2:
            coef = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            coef = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + coef * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + coef / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            return f
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"regularized_incomplete_beta(a={a}, b={b}, x={x}): need a, b > 0 and 0 <= x <= 1")
    if x in (0.0, 1.0):
        return x
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) / a / _incomplete_beta_fraction(a, b, x)
    # the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) keeps the fraction in its fast region
    return 1.0 - math.exp(log_front) / b / _incomplete_beta_fraction(b, a, 1.0 - x)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom (not necessarily an integer)."""
    if not df > 0:
        raise ValueError(f"t_cdf: df={df} must be > 0")
    tail = 0.5 * regularized_incomplete_beta(df / 2, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` > 0 degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p={p} must be in (0, 1)")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator; ``None`` for a single value)."""
    if not values:
        return float("nan"), None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass(frozen=True)
class Difference:
    """``a - b`` with a two-sided confidence interval; ``low``/``high`` are ``None`` when not estimable."""

    estimate: float
    low: float | None
    high: float | None
    df: float | None
    n: int
    method: str  # "paired" | "welch"

    @property
    def distinguishable(self) -> bool | None:
        """Whether the interval excludes zero (``None``: no interval, e.g. one seed)."""
        if self.low is None or self.high is None:
            return None
        return self.low > 0 or self.high < 0


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = CONFIDENCE) -> Difference:
    """Mean of the per-seed differences a_s - b_s over the seeds both have, with a paired t interval.

    mean(d) +- t_{(1+level)/2, n-1} * sd(d) / sqrt(n). The seed fixes the initial weights of every
    parameter the arms share (``hmoe_ds.initialization`` seeds each by its logical name) and the order
    of the training batches, so runs with the same seed are paired, and their common part cancels.
    """
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    mean, sd = mean_std(diffs)
    if sd is None:
        return Difference(mean, None, None, None, len(diffs), "paired")
    half = t_quantile((1 + level) / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return Difference(mean, mean - half, mean + half, float(len(diffs) - 1), len(diffs), "paired")


def welch_difference(a: list[float], b: list[float], level: float = CONFIDENCE) -> Difference:
    """mean(a) - mean(b) with Welch's t interval (independent samples, unequal variances).

    se^2 = s_a^2/n_a + s_b^2/n_b, with the Welch-Satterthwaite degrees of freedom
    se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1)).
    """
    (mean_a, sd_a), (mean_b, sd_b) = mean_std(a), mean_std(b)
    estimate = mean_a - mean_b
    if sd_a is None or sd_b is None:
        return Difference(estimate, None, None, None, min(len(a), len(b)), "welch")
    va, vb = sd_a ** 2 / len(a), sd_b ** 2 / len(b)
    if va + vb == 0:  # both samples constant: the difference is exact
        return Difference(estimate, estimate, estimate, float(len(a) + len(b) - 2), min(len(a), len(b)), "welch")
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile((1 + level) / 2, df) * math.sqrt(va + vb)
    return Difference(estimate, estimate - half, estimate + half, df, min(len(a), len(b)), "welch")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per arm (in run order): means and standard deviations over its seeds."""
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        runs = [r for r in rows if r["arm"] == arm]
        first = runs[0]
        agg = {k: first[k] for k in ("arm", "label", "routing", "expert_sizes", "losses", "total_params",
                                     "train_tokens")}
        agg["seeds"] = " ".join(str(r["seed"]) for r in runs)
        agg["num_seeds"] = len(runs)
        for key in ("final_val_loss", "zero_shot_acc", "zero_shot_acc_norm"):
            values = [r[key] for r in runs if not math.isnan(r[key])]
            # a metric some seeds lack is not averaged over the others: it would mix different samples
            mean, sd = mean_std(values) if len(values) == len(runs) else (float("nan"), None)
            agg[f"{key}_mean"], agg[f"{key}_std"] = mean, (float("nan") if sd is None else sd)
        for key in ("activated_params_per_token", "activated_expert_params_per_token", "mean_experts_per_token",
                    "train_activated_params_mean", "train_flops", "final_val_ppl"):
            agg[key] = _mean(r[key] for r in runs)
        out.append(agg)
    return out


#: The metrics compared between arms: (row key, name in the tables, digits).
COMPARED = (("final_val_loss", "val loss", 4), ("zero_shot_acc", "zero-shot acc", 4))


def compare(rows: list[dict[str, Any]], pairs: list[Pair]) -> list[dict[str, Any]]:
    """For each pair whose arms both ran and each metric both have for every seed: HMoE - MoE.

    The reported interval is paired by seed (:func:`paired_difference`); Welch's interval
    (:func:`welch_difference`), which ignores the pairing, is kept next to it for reference.
    """
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r
    result = []
    for pair in pairs:
        if pair.hmoe not in by_arm or pair.moe not in by_arm:
            continue
        hmoe, moe = by_arm[pair.hmoe], by_arm[pair.moe]
        for key, metric, _ in COMPARED:
            a = {s: r[key] for s, r in hmoe.items() if not math.isnan(r[key])}
            b = {s: r[key] for s, r in moe.items() if not math.isnan(r[key])}
            if len(a) < len(hmoe) or len(b) < len(moe) or not set(a) & set(b):
                continue  # e.g. no zero-shot results: nothing to compare
            paired = paired_difference(a, b)
            welch = welch_difference(list(a.values()), list(b.values()))
            result.append({
                "hmoe": pair.hmoe, "moe": pair.moe, "note": pair.note, "metric": metric, "key": key,
                "hmoe_label": next(iter(hmoe.values()))["label"], "moe_label": next(iter(moe.values()))["label"],
                "hmoe_mean": mean_std(list(a.values()))[0], "moe_mean": mean_std(list(b.values()))[0],
                "difference": paired.estimate, "num_seeds": paired.n,
                "ci_low": paired.low, "ci_high": paired.high, "df": paired.df,
                "distinguishable": paired.distinguishable,
                "welch_difference": welch.estimate, "welch_ci_low": welch.low, "welch_ci_high": welch.high,
                "welch_df": welch.df, "welch_distinguishable": welch.distinguishable,
                "activated_params_ratio": _mean(r["activated_params_per_token"] for r in hmoe.values())
                / _mean(r["activated_params_per_token"] for r in moe.values()),
                "train_flops_ratio": _mean(r["train_flops"] for r in hmoe.values())
                / _mean(r["train_flops"] for r in moe.values()),
            })
    return result


# --------------------------------------------------------------------------- writing

COLUMNS = ["arm", "run", "label", "routing", "expert_sizes", "losses", "total_params", "activated_params_per_token",
           "activated_expert_params_per_token", "mean_experts_per_token", "final_val_loss", "final_val_ppl",
           "zero_shot_acc", "zero_shot_acc_norm", "step0_val_loss", "train_activated_params_last_quarter",
           "train_experts_per_token_last_quarter", "train_activated_params_mean", "train_flops", "train_tokens",
           "train_steps", "seed", "data_cache", "train_wall_s", "eval_wall_s"]
ARM_COLUMNS = ["arm", "label", "routing", "expert_sizes", "losses", "num_seeds", "seeds", "total_params",
               "activated_params_per_token", "activated_expert_params_per_token", "mean_experts_per_token",
               "train_activated_params_mean", "train_tokens", "train_flops", "final_val_loss_mean",
               "final_val_loss_std", "final_val_ppl", "zero_shot_acc_mean", "zero_shot_acc_std",
               "zero_shot_acc_norm_mean", "zero_shot_acc_norm_std"]
COMPARISON_COLUMNS = ["hmoe", "moe", "metric", "num_seeds", "hmoe_mean", "moe_mean", "difference", "ci_low", "ci_high",
                      "df", "distinguishable", "welch_difference", "welch_ci_low", "welch_ci_high", "welch_df",
                      "welch_distinguishable", "activated_params_ratio", "train_flops_ratio", "note"]


def write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str]) -> None:
    """``rows`` as CSV; NaN and ``None`` (not measured / not estimable) are empty cells."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row[k] is None or (isinstance(row[k], float) and math.isnan(row[k]))
                                 else row[k]) for k in columns})


def _m(value: float) -> str:
    return "-" if math.isnan(value) else f"{value / 1e6:.3f}M"


def mean_pm_std(mean: float, std: float, num_seeds: int, digits: int) -> str:
    """``4.5556 ± 0.0123`` (``4.5556 (1 seed)`` for a single seed; ``-`` when not measured)."""
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} (1 seed)" if num_seeds < 2 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def interval_text(low: float | None, high: float | None, digits: int) -> str:
    """``[-0.0312, 0.0051]``, or ``n/a (1 seed)`` when there is no interval."""
    return ONE_SEED if low is None or high is None else f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def verdict(distinguishable: bool | None, difference: float) -> str:
    """Whether the 95% interval excludes zero, and which way the difference goes."""
    if distinguishable is None:
        return ONE_SEED
    return ("yes: HMoE " + ("higher" if difference > 0 else "lower")) if distinguishable else "no"


def markdown_table(arms: list[dict[str, Any]]) -> str:
    """Per arm: parameters, training FLOPs, and validation loss / zero-shot accuracy as mean ± std over seeds."""
    lines = ["| model | routing | aux losses | seeds | total params | activated params/token "
             "| activated expert params/token | experts/token | training FLOPs | val loss (mean ± std) "
             "| zero-shot acc (mean ± std) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    best = min(a["final_val_loss_mean"] for a in arms)
    for a in arms:
        loss = mean_pm_std(a["final_val_loss_mean"], a["final_val_loss_std"], a["num_seeds"], 4)
        ept = "-" if math.isnan(a["mean_experts_per_token"]) else f"{a['mean_experts_per_token']:.2f}"
        lines.append(
            f"| {a['label']} | {a['routing']} | {a['losses']} | {a['num_seeds']} | {_m(a['total_params'])} "
            f"| {_m(a['activated_params_per_token'])} | {_m(a['activated_expert_params_per_token'])} | {ept} "
            f"| {a['train_flops']:.3g} | {'**' + loss + '**' if a['final_val_loss_mean'] == best else loss} "
            f"| {mean_pm_std(a['zero_shot_acc_mean'], a['zero_shot_acc_std'], a['num_seeds'], 4)} |")
    return "\n".join(lines)


def comparison_table(comparisons: list[dict[str, Any]]) -> str:
    """Per HMoE-vs-MoE pair and metric: the difference of means and its 95% interval, paired by seed."""
    lines = ["| HMoE arm | vs MoE arm | metric | seeds | HMoE | MoE | difference (HMoE - MoE) "
             f"| {CONFIDENCE:.0%} CI (paired by seed) | distinguishable from 0 at {CONFIDENCE:.0%} "
             "| activated params HMoE / MoE | training FLOPs HMoE / MoE |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    digits = {key: d for key, _, d in COMPARED}
    for c in comparisons:
        d = digits[c["key"]]
        lines.append(
            f"| {c['hmoe_label']} | {c['moe_label']} | {c['metric']} | {c['num_seeds']} | {c['hmoe_mean']:.{d}f} "
            f"| {c['moe_mean']:.{d}f} | {c['difference']:+.{d}f} | {interval_text(c['ci_low'], c['ci_high'], d)} "
            f"| {verdict(c['distinguishable'], c['difference'])} | {c['activated_params_ratio']:.3f} "
            f"| {c['train_flops_ratio']:.3f} |")
    return "\n".join(lines)


def runs_table(rows: list[dict[str, Any]]) -> str:
    """Every run (arm x seed)."""
    lines = ["| run | seed | activated params/token | experts/token | val loss | val ppl | zero-shot acc |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ept = "-" if math.isnan(r["mean_experts_per_token"]) else f"{r['mean_experts_per_token']:.2f}"
        acc = "-" if math.isnan(r["zero_shot_acc"]) else f"{r['zero_shot_acc']:.4f}"
        lines.append(f"| {r['run']} | {r['seed']} | {_m(r['activated_params_per_token'])} | {ept} "
                     f"| {r['final_val_loss']:.4f} | {r['final_val_ppl']:.2f} | {acc} |")
    return "\n".join(lines)


def write_markdown(summary: dict[str, Any], path: Path) -> None:
    plan, data = summary["plan"], summary["data"]
    check = summary["consistency"]
    seeds = summary["seeds"]
    comparisons = comparison_table(summary["comparisons"]) if summary["comparisons"] else \
        "(no HMoE-vs-MoE pair of configs/arms.yaml among the arms run)"
    text = f"""# HMoE paper comparison, small scale (--scale {plan['scale']:g})

Model: {plan['num_layers']} layers, d={plan['hidden_size']}, {plan['num_heads']} heads, 8 experts per layer
(homogeneous h={plan['expert_hidden']}; HMoE sizes sum to 8h), vocabulary {data['vocab_size']}.
Training: {plan['steps']} steps x {plan['global_batch']} sequences x {plan['block_size']} tokens
= {plan['steps'] * plan['tokens_per_step']:,} tokens per run ({plan['num_ranks']} ranks), peak lr {plan['lr']:.2g},
AdamW (0.9, 0.999), weight decay 1e-5, warm-up {plan['warmup_steps']} steps then constant.
Seeds: {', '.join(map(str, seeds))} ({len(seeds)} run(s) per arm; a seed sets the initial weights and the order
of the training batches; run i of every arm has the same seed).
Data: {data['corpus']}; {data['num_train_tokens']:,} training tokens, validation {data['num_val_blocks']} blocks
(the same split for every seed; every evaluation and the table use the whole validation split); cache
`{data['cache_path']}`.
Identical data order (per seed) and budget in every arm: {check['identical_data_order_and_budget']};
equal total parameters in the MoE arms: {check['equal_total_params_moe_arms']}.

{markdown_table(summary['arms_table'])}

Activated parameters per token are measured on the validation split after training (run/eval.py):
non-expert parameters (embeddings, attention, norms, routers) plus, per MoE layer, the parameters of
the experts each token was routed to. Training FLOPs = 6 x N x D + 6 x layers x sequence length x d x D
(Kaplan et al. 2020), with D the training tokens and N the activated parameters per token averaged over
the logged training steps. Zero-shot accuracy is the mean over tasks of `acc` in each run's
`{ZERO_SHOT_NAME}` (lm-evaluation-harness results), `-` where a run has none.

{comparisons}

Differences are HMoE minus MoE (lower loss / higher accuracy is better). The interval is Student's t over
the per-seed differences (paired by seed, {len(seeds) - 1} degrees of freedom); `comparisons.csv` also has
Welch's interval, which ignores the pairing. With one seed there is no estimate of the noise, so no interval.

Every run:

{runs_table(summary['runs'])}

Machine: {summary['machine']['summary']}. Wall time: {summary['wall_s'] / 60:.1f} min for the whole command.
"""
    path.write_text(text, encoding="utf-8")


def plot(rows: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """The curves of every run (one colour per arm, one line per seed) and the expert shares of each arm's
    first seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = out / "val_loss.png"
    fig, (full, zoom, act) = plt.subplots(1, 3, figsize=(16, 4.5))
    colours = {arm: f"C{i}" for i, arm in enumerate(dict.fromkeys(r["arm"] for r in rows))}
    labelled: set[str] = set()
    for r in rows:
        style = {"color": colours[r["arm"]], "label": None if r["arm"] in labelled else r["label"]}
        labelled.add(r["arm"])
        points = [(t / 1e6, v) for t, v in r["_val_curve"]]
        full.plot(*zip(*points), marker="o", markersize=3, **style)
        late = [p for p in points if p[0] >= points[-1][0] / 2] or points
        zoom.plot(*zip(*late), marker="o", markersize=3, **style)
        train = [(t / 1e6, a - r["_non_expert"]) for t, a, _ in r["_train_curve"] if a is not None]
        if train:
            act.plot(*zip(*train), **style)
    for ax, title, ylabel in ((full, "validation loss (whole validation split)", "validation loss"),
                              (zoom, "validation loss, second half of training", "validation loss"),
                              (act, "activated expert parameters (training batches)",
                               "activated expert params / token (all layers)")):
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    shares = out / "expert_share.png"
    first_seed = {}
    for r in rows:
        first_seed.setdefault(r["arm"], r)
    moe = [r for r in first_seed.values() if r["_layers"]]
    cols = 2 if len(moe) in (2, 4) else min(3, max(1, len(moe)))
    nrows = max(1, math.ceil(len(moe) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, moe):
        sizes = r["_layers"][0]["expert_sizes"]
        order = sorted(range(len(sizes)), key=lambda e: (sizes[e], e))
        xs = list(range(len(sizes)))
        for i, layer in enumerate(r["_layers"]):
            ax.plot(xs, [layer["token_fraction"][e] for e in order], color="grey", alpha=0.5, linewidth=1,
                    marker=".", label="per layer" if i == 0 else None)
        mean = [sum(layer["token_fraction"][e] for layer in r["_layers"]) / len(r["_layers"]) for e in order]
        ax.plot(xs, mean, color="C3", marker="o", linewidth=2, label="mean over layers")
        ax.axhline(1 / len(sizes), color="black", linestyle="--", linewidth=1, label="uniform")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"e{e}\n{sizes[e]}" for e in order], fontsize=7)
        ax.set_xlabel("expert (index / FFN size, ascending size)")
        ax.set_ylabel("share of routed tokens")
        ax.set_title(f"{r['label']}, seed {r['seed']}\n{r['mean_experts_per_token']:.2f} experts/token", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(moe):]:
        ax.axis("off")
    fig.suptitle("share of (token, expert) assignments per expert vs expert size, validation split, after training",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(shares, dpi=110)
    plt.close(fig)
    return curves, shares


def machine() -> dict[str, Any]:
    import deepspeed
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": cores, "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "summary": f"{cores} cores ({cpu}){', ' + gpu if gpu else ', no GPU'}, torch {torch.__version__}, "
                       f"DeepSpeed {deepspeed.__version__}"}


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="size knob (1 = the 2-core CPU run; see README)")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per arm (default {BASE_STEPS} x scale)")
    p.add_argument("--out", default="outputs/paper_comparison", help="output directory (default %(default)s)")
    p.add_argument("--arms", default=None, help="comma list of arms from configs/arms.yaml, or 'all' "
                                                "(default: the file's `default` list)")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs per arm, with seeds base, base+1, ... (default 1; 3 or more for intervals that can "
                        "tell a difference from noise)")
    p.add_argument("--seed", type=int, default=None,
                   help="base seed (default: run.seed of configs/base.yaml, 1234)")
    p.add_argument("--num-ranks", type=int, default=2, help="data-parallel ranks per arm (default 2)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per rank per forward (default: the global batch / ranks, no accumulation)")
    p.add_argument("--size-multiple", type=int, default=16,
                   help="expert sizes are multiples of this (default 16: the exact arithmetic shape at --scale 1)")
    p.add_argument("--ds-config", default=str(DS_JSON), help="base DeepSpeed JSON (batch and lr are filled in)")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help="extra run/train.py overrides for every arm, e.g. --set data.max_chars=200000")
    p.add_argument("--zero-shot", action="store_true",
                   help="also evaluate every run zero-shot (run/zero_shot.py, the shipped BIG-bench tasks; needs "
                        "the eval extra) into <run>/zero_shot.json; with --resume, runs without one get one")
    p.add_argument("--zero-shot-limit", type=int, default=None, metavar="N",
                   help="examples per zero-shot task (default: all, ~9,600 over the five tasks)")
    p.add_argument("--resume", action="store_true",
                   help="keep runs (arm x seed) already evaluated in --out, train the others")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild the tables and plots from --out (pass the same --arms and --seeds)")
    return p


def main() -> int:
    args = build_parser().parse_args()
    start = time.monotonic()
    os.chdir(REPO)
    os.environ.update(child_env())  # before hmoe_ds (and so deepspeed) is imported
    plan = plan_for_scale(args.scale, args.num_ranks, args.steps, args.micro_batch, args.size_multiple)
    arms = load_arms(ARMS_YAML, args.arms)
    pairs = load_pairs(ARMS_YAML)
    out = Path(args.out).resolve()
    user_sets = [s for group in args.set for s in group]
    if any(s.split("=", 1)[0].strip() == "run.seed" for s in user_sets):
        raise SystemExit("--set run.seed=...: the seeds are set per run; use --seed BASE (and --seeds N)")
    base_seed = args.seed if args.seed is not None else int(yaml.safe_load(BASE_YAML.read_text())["run"]["seed"])
    seeds = seeds_for(base_seed, args.seeds)
    multi_seed = len(seeds) > 1
    if out.exists() and any(out.iterdir()) and not (args.resume or args.report_only):
        raise SystemExit(f"--out {out} is not empty; pass --resume to keep its finished arms, "
                         "--report-only to redo the table, or choose another --out")
    if args.zero_shot and not args.report_only:
        check_zero_shot_ready()
    (out / "logs").mkdir(parents=True, exist_ok=True)

    sizes = {arm.name: arm.expert_sizes(plan) for arm in arms}
    log(f"scale {plan.scale:g}: d={plan.hidden_size}, {plan.num_layers} layers, {plan.num_heads} heads, "
        f"h={plan.expert_hidden}; {plan.steps} steps x {plan.tokens_per_step:,} tokens; seeds {seeds}; arms: "
        + ", ".join(f"{a.name} {sizes[a.name] or 'dense'}" for a in arms))
    common = plan.overrides() + user_sets
    data = prepare_data(common)
    common.append(f"data.tokenized_cache={data['cache_path']}")
    log(f"data: {data['num_train_tokens']:,} training tokens, cache {data['cache_path']}")

    from hmoe_ds.errors import ExperimentError
    from hmoe_ds.training.experiment import load_ds_config, load_experiment

    try:  # every arm's experiment is validated before the first one starts
        for arm in arms:
            load_experiment(BASE_YAML, common + arm.overrides(plan))
        ds_config = plan.ds_config(load_ds_config(args.ds_config))
    except ExperimentError as exc:
        raise SystemExit(f"error: {exc}") from None
    (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n", encoding="utf-8")

    timings: dict[tuple[str, int], dict[str, float]] = {}
    env = child_env()
    todo = [(arm, seed) for seed in seeds for arm in arms]  # seed-major: a stopped run still has paired seeds
    for i, (arm, seed) in enumerate(todo, 1):
        log(f"run {i}/{len(todo)}")
        name = run_name(arm.name, seed, multi_seed)
        timings[arm.name, seed] = (_read_json(out / "logs" / f"{name}.timing.json") or {}) if args.report_only \
            else train_and_eval(arm, seed, args, plan, common, out, env, multi_seed)

    rows = [collect(arm, seed, out, timings[arm.name, seed], multi_seed) for arm in arms for seed in seeds]
    check = consistency(rows)
    arms_table = aggregate(rows)
    comparisons = compare(rows, pairs)
    previous = _read_json(out / "summary.json") or {}
    wall = time.monotonic() - start if not args.report_only else previous.get("wall_s", float("nan"))
    summary = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "plan": {**asdict(plan), "tokens_per_step": plan.tokens_per_step},
        "seeds": seeds,
        "data": data,
        "arms": {arm.name: {"label": arm.label, "experts": arm.experts, "expert_sizes": sizes[arm.name],
                            "overrides": common + arm.overrides(plan)} for arm in arms},
        "consistency": check,
        "machine": machine(),
        "wall_s": wall,
        "arms_table": arms_table,
        "comparisons": comparisons,
        "runs": [{k: v for k, v in r.items() if not k.startswith("_")} | {"zero_shot_tasks": r["_zero_shot_tasks"]}
                 for r in rows],
    }
    write_csv(rows, out / "results.csv", COLUMNS)
    write_csv(arms_table, out / "arms.csv", ARM_COLUMNS)
    write_csv(comparisons, out / "comparisons.csv", COMPARISON_COLUMNS)
    write_markdown(summary, out / "results.md")
    curves, shares = plot(rows, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")

    print("\n" + markdown_table(arms_table) + "\n")
    if comparisons:
        print(comparison_table(comparisons) + "\n")
    if not (check["identical_data_order_and_budget"] and check["equal_total_params_moe_arms"]):
        log(f"WARNING: the arms are not comparable: {check}")
    log(f"finished in {wall / 60:.1f} min")
    for name, path in (("tables (Markdown)", out / "results.md"), ("runs (CSV)", out / "results.csv"),
                       ("arms (CSV)", out / "arms.csv"), ("comparisons (CSV)", out / "comparisons.csv"),
                       ("loss curves", curves), ("expert share vs size", shares),
                       ("set-up + numbers", out / "summary.json"), ("runs", out)):
        print(f"  {name:22s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
