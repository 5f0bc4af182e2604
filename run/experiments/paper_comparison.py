#!/usr/bin/env python
"""The HMoE paper's main comparison (Table 1) at small scale, in one command.

    .venv/bin/python run/experiments/paper_comparison.py [--scale S] [--steps N] [--out DIR]
        [--arms moe_topk,moe_topp,hmoe_topk,hmoe_topp | all] [--num-ranks R] [--set KEY=VALUE ...] [--resume]

Trains every arm of ``configs/arms.yaml`` (default: homogeneous MoE Top-K/Top-P and HMoE Top-K/Top-P)
with ``run/train.py`` through the deepspeed launcher, one arm after the other, on the same tokenised
data, seed, batch and token budget and with equal total parameters; evaluates each final checkpoint
on the whole validation split with ``run/eval.py``; then writes to ``--out``:

    results.csv, results.md   the table (validation loss/ppl, measured activated parameters, experts/token, ...)
    val_loss.png              validation loss (and activated expert parameters) vs training tokens
    expert_share.png          share of routed (token, expert) pairs per expert vs its size, per arm
    summary.json              everything above plus the set-up (data cache, seeds, commands, timings)
    <arm>/                    each run (metrics.jsonl, TensorBoard, checkpoint, eval_final.json)
    logs/<arm>.{train,eval}.log

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


def train_and_eval(arm: Arm, args: argparse.Namespace, plan: ScalePlan, common: list[str], out: Path,
                   env: dict[str, str]) -> dict[str, float]:
    """Train one arm through the deepspeed launcher, then evaluate its checkpoint; return wall times."""
    run_dir = out / arm.name
    eval_json = run_dir / EVAL_NAME
    timings = _read_json(out / "logs" / f"{arm.name}.timing.json") or {}
    if args.resume and eval_json.is_file():
        log(f"{arm.name}: already trained and evaluated, skipped (--resume)")
        return timings
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_accelerators", str(plan.num_ranks), "--master_port", str(free_port()),
           "run/train.py", "--config", str(BASE_YAML), "--deepspeed_config", str(out / "ds_config.json"),
           "--set", *common, *arm.overrides(plan), f"run.output_dir={run_dir}", f"run.run_name={arm.name}"]
    if args.resume:
        cmd.append("--resume")
    log(f"{arm.name}: training ({arm.label}); log {out / 'logs' / (arm.name + '.train.log')}")
    train_s = run_logged(cmd, out / "logs" / f"{arm.name}.train.log", env, run_dir / "metrics.jsonl", plan.steps)
    cmd = [sys.executable, "run/eval.py", str(run_dir), "--output", str(eval_json)]
    eval_s = run_logged(cmd, out / "logs" / f"{arm.name}.eval.log", env, None, 0)
    result = _read_json(eval_json) or {}
    log(f"{arm.name}: trained in {train_s:.0f} s ({train_s / plan.steps:.2f} s/step incl. start-up and "
        f"evaluations), evaluated in {eval_s:.0f} s: val loss {result.get('loss', float('nan')):.4f}")
    timings = {"train_wall_s": round(train_s, 1), "eval_wall_s": round(eval_s, 1)}
    (out / "logs" / f"{arm.name}.timing.json").write_text(json.dumps(timings) + "\n", encoding="utf-8")
    return timings


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# --------------------------------------------------------------------------- collecting


def collect(arm: Arm, out: Path, timings: dict[str, float]) -> dict[str, Any]:
    """One table row from the arm's saved files (what the run actually used, not what was intended)."""
    from hmoe_ds.modeling import HMoEConfig, parameter_summary
    from hmoe_ds.sizes import expert_param_count
    from hmoe_ds.training.metrics import read_jsonl

    run_dir = out / arm.name
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
    return {
        "arm": arm.name,
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
        "final_val_loss": float(ev["loss"]),
        "final_val_ppl": float(ev["ppl"]),
        "step0_val_loss": val[0][1] if val and val[0][0] == 0 else float("nan"),
        "val_tokens": int(ev["tokens"]),
        "train_steps": int(exp["run"]["train_steps"]),
        "train_tokens": int(exp["run"]["train_steps"]) * tokens_per_step,
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
    """Checks that the comparison is fair: identical data order and budget, equal total parameters."""
    keys = ("seed", "data_cache", "train_batch_size", "micro_batch", "block_size", "train_steps", "train_tokens")
    identical = {k: len({r[k] for r in rows}) == 1 for k in keys}
    moe_totals = {r["total_params"] for r in rows if r["routing"] != "dense"}
    return {"identical_data_order_and_budget": all(identical.values()), "identical": identical,
            "equal_total_params_moe_arms": len(moe_totals) <= 1, "moe_total_params": sorted(moe_totals)}


# --------------------------------------------------------------------------- writing

COLUMNS = ["arm", "label", "routing", "expert_sizes", "losses", "total_params", "activated_params_per_token",
           "activated_expert_params_per_token", "mean_experts_per_token", "final_val_loss", "final_val_ppl",
           "step0_val_loss", "train_activated_params_last_quarter", "train_experts_per_token_last_quarter",
           "train_tokens", "train_steps", "seed", "data_cache", "train_wall_s", "eval_wall_s"]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(row[k], float) and math.isnan(row[k]) else row[k]) for k in COLUMNS})


def _m(value: float) -> str:
    return "-" if math.isnan(value) else f"{value / 1e6:.3f}M"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | routing | aux losses | expert sizes | total params | activated params/token "
             "| activated expert params/token | experts/token | val loss | val ppl |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    best = min(r["final_val_loss"] for r in rows)
    for r in rows:
        loss = f"{r['final_val_loss']:.4f}"
        ept = "-" if math.isnan(r["mean_experts_per_token"]) else f"{r['mean_experts_per_token']:.2f}"
        lines.append(
            f"| {r['label']} | {r['routing']} | {r['losses']} | {r['expert_sizes']} | {_m(r['total_params'])} "
            f"| {_m(r['activated_params_per_token'])} | {_m(r['activated_expert_params_per_token'])} | {ept} "
            f"| {'**' + loss + '**' if r['final_val_loss'] == best else loss} | {r['final_val_ppl']:.2f} |")
    return "\n".join(lines)


def write_markdown(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    plan, data = summary["plan"], summary["data"]
    check = summary["consistency"]
    text = f"""# HMoE paper comparison, small scale (--scale {plan['scale']:g})

Model: {plan['num_layers']} layers, d={plan['hidden_size']}, {plan['num_heads']} heads, 8 experts per layer
(homogeneous h={plan['expert_hidden']}; HMoE sizes sum to 8h), vocabulary {data['vocab_size']}.
Training: {plan['steps']} steps x {plan['global_batch']} sequences x {plan['block_size']} tokens
= {plan['steps'] * plan['tokens_per_step']:,} tokens per arm ({plan['num_ranks']} ranks), peak lr {plan['lr']:.2g},
AdamW (0.9, 0.999), weight decay 1e-5, warm-up {plan['warmup_steps']} steps then constant, seed {summary['seed']}.
Data: {data['corpus']}; {data['num_train_tokens']:,} training tokens, validation {data['num_val_blocks']} blocks
(every evaluation and the table use the whole validation split); cache `{data['cache_path']}`.
Identical data order and budget in every arm: {check['identical_data_order_and_budget']};
equal total parameters in the MoE arms: {check['equal_total_params_moe_arms']}.

{markdown_table(summary['rows'])}

Activated parameters per token are measured on the validation split after training (run/eval.py):
non-expert parameters (embeddings, attention, norms, routers) plus, per MoE layer, the parameters of
the experts each token was routed to. Machine: {summary['machine']['summary']}.
Wall time: {summary['wall_s'] / 60:.1f} min for the whole command.
"""
    path.write_text(text, encoding="utf-8")


def plot(rows: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = out / "val_loss.png"
    fig, (full, zoom, act) = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in rows:
        points = [(t / 1e6, v) for t, v in r["_val_curve"]]
        full.plot(*zip(*points), marker="o", markersize=3, label=r["label"])
        late = [p for p in points if p[0] >= points[-1][0] / 2] or points
        zoom.plot(*zip(*late), marker="o", markersize=3, label=r["label"])
        train = [(t / 1e6, a - r["_non_expert"]) for t, a, _ in r["_train_curve"] if a is not None]
        if train:
            act.plot(*zip(*train), label=r["label"])
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
    moe = [r for r in rows if r["_layers"]]
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
        ax.set_title(f"{r['label']}\n{r['mean_experts_per_token']:.2f} experts/token", fontsize=9)
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
                                                "(default: moe_topk,moe_topp,hmoe_topk,hmoe_topp)")
    p.add_argument("--num-ranks", type=int, default=2, help="data-parallel ranks per arm (default 2)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per rank per forward (default: the global batch / ranks, no accumulation)")
    p.add_argument("--size-multiple", type=int, default=16,
                   help="expert sizes are multiples of this (default 16: the exact arithmetic shape at --scale 1)")
    p.add_argument("--ds-config", default=str(DS_JSON), help="base DeepSpeed JSON (batch and lr are filled in)")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help="extra run/train.py overrides for every arm, e.g. --set data.max_chars=200000")
    p.add_argument("--resume", action="store_true", help="keep arms already evaluated in --out, train the others")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plots from --out")
    return p


def main() -> int:
    args = build_parser().parse_args()
    start = time.monotonic()
    os.chdir(REPO)
    os.environ.update(child_env())  # before hmoe_ds (and so deepspeed) is imported
    plan = plan_for_scale(args.scale, args.num_ranks, args.steps, args.micro_batch, args.size_multiple)
    arms = load_arms(ARMS_YAML, args.arms)
    out = Path(args.out).resolve()
    user_sets = [s for group in args.set for s in group]
    if out.exists() and any(out.iterdir()) and not (args.resume or args.report_only):
        raise SystemExit(f"--out {out} is not empty; pass --resume to keep its finished arms, "
                         "--report-only to redo the table, or choose another --out")
    (out / "logs").mkdir(parents=True, exist_ok=True)

    sizes = {arm.name: arm.expert_sizes(plan) for arm in arms}
    log(f"scale {plan.scale:g}: d={plan.hidden_size}, {plan.num_layers} layers, {plan.num_heads} heads, "
        f"h={plan.expert_hidden}; {plan.steps} steps x {plan.tokens_per_step:,} tokens; arms: "
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

    timings: dict[str, dict[str, float]] = {}
    env = child_env()
    for i, arm in enumerate(arms, 1):
        log(f"arm {i}/{len(arms)}")
        timings[arm.name] = (_read_json(out / "logs" / f"{arm.name}.timing.json") or {}) if args.report_only \
            else train_and_eval(arm, args, plan, common, out, env)

    rows = [collect(arm, out, timings[arm.name]) for arm in arms]
    check = consistency(rows)
    previous = _read_json(out / "summary.json") or {}
    wall = time.monotonic() - start if not args.report_only else previous.get("wall_s", float("nan"))
    summary = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "plan": {**asdict(plan), "tokens_per_step": plan.tokens_per_step},
        "seed": rows[0]["seed"],
        "data": data,
        "arms": {arm.name: {"label": arm.label, "experts": arm.experts, "expert_sizes": sizes[arm.name],
                            "overrides": common + arm.overrides(plan)} for arm in arms},
        "consistency": check,
        "machine": machine(),
        "wall_s": wall,
        "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
    }
    write_csv(rows, out / "results.csv")
    write_markdown(rows, summary, out / "results.md")
    curves, shares = plot(rows, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")

    print("\n" + markdown_table(rows) + "\n")
    if not (check["identical_data_order_and_budget"] and check["equal_total_params_moe_arms"]):
        log(f"WARNING: the arms are not comparable: {check}")
    log(f"finished in {wall / 60:.1f} min")
    for name, path in (("table (Markdown)", out / "results.md"), ("table (CSV)", out / "results.csv"),
                       ("loss curves", curves), ("expert share vs size", shares),
                       ("set-up + numbers", out / "summary.json"), ("runs", out)):
        print(f"  {name:22s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
