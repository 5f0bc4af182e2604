"""HMoE layer forward+backward time against its physical floor and DeepSpeed's MoE.

Per configuration (T tokens, E experts, width d) all candidates are built in
one process on the same input and timed interleaved (see
:mod:`benchmarks.common`):

* ``HMoE top-k`` / ``HMoE top-p``: the dropless layer, expert sizes
  ``solve_expert_sizes(num_experts=E, homogeneous_hidden=2d)`` (arithmetic,
  the paper's main setting; 2d as in the paper's 0.4B model), Top-K=2 and
  Top-P 0.6 (with the entropy loss on). ``HMoE top-k cf1.25`` is the capacity
  path (``capacity_factor=1.25``).
* ``floor``: one dense SwiGLU FFN whose hidden width is the expert
  parameters the HMoE variant actually activated per token on this batch
  divided by 3d (``layer.last_stats``): same expert FLOPs, no routing — the
  physical floor of the expert math.
* ``DS-MoE``: ``deepspeed.moe.layer.MoE`` with E homogeneous SwiGLU experts
  (``hmoe_ds.experts.FFNExpert``) of width 2d, top-2, its defaults
  (capacity_factor 1.0, drop_tokens, use_rts — unused by its top-2 gate —
  and second-expert sampling): the same activated parameters per token as the
  HMoE top-k layer under uniform routing.

Routers: all layers of a configuration share one router matrix, scaled so
that Top-P 0.6 picks about 2 experts per token (a randomly initialised router
is nearly uniform, and Top-P would then pick most experts; a trained router
with the entropy loss is sharp). The same matrix is used for Top-K and
DeepSpeed, so load imbalance is identical.

Run: ``python -m benchmarks.run_all --only layer [--quick]``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .common import (
    StepFn,
    Table,
    default_dtype,
    peak_tflops,
    pick_device,
    run_memory_jobs,
    setup_threads,
    swiglu_train_flops,
    time_interleaved,
)

SEED = 1234
TOP_P = 0.6
TARGET_TOP_P_EXPERTS = 2.0


@dataclass(frozen=True)
class LayerConfig:
    """One point of the grid."""

    tokens: int
    experts: int
    d_model: int

    @property
    def homogeneous_hidden(self) -> int:
        return 2 * self.d_model


# Full mode: a subset of tokens {2k, 8k, 16k} x experts {8, 16, 64} x d {256, 512, 1024}
# that covers every value of each axis and keeps T * d^2 (the cost) bounded
# (~15 min on 2 CPU cores). The target is 8 experts at 8k tokens.
FULL_CONFIGS = [
    LayerConfig(8192, 8, 256),
    LayerConfig(8192, 8, 512),
    LayerConfig(2048, 8, 1024),
    LayerConfig(16384, 8, 256),
    LayerConfig(8192, 16, 256),
    LayerConfig(2048, 16, 512),
    LayerConfig(2048, 16, 1024),
    LayerConfig(8192, 64, 256),
    LayerConfig(16384, 64, 256),
    LayerConfig(2048, 64, 512),
]
QUICK_CONFIGS = [LayerConfig(2048, 8, 256)]

HMOE_VARIANTS: dict[str, dict[str, Any]] = {
    "top-k": dict(routing="top_k", top_k=2),
    "top-p": dict(routing="top_p", top_p=TOP_P, entropy_coef=0.03),
    "top-k cf1.25": dict(routing="top_k", top_k=2, capacity_factor=1.25),
}


def expert_sizes(cfg: LayerConfig) -> list[int]:
    from hmoe_ds.sizes import solve_expert_sizes

    return solve_expert_sizes(num_experts=cfg.experts, homogeneous_hidden=cfg.homogeneous_hidden)


def router_weight(experts: int, d_model: int, scale: float) -> torch.Tensor:
    """A fixed Gaussian router ``[E, d]`` giving logits of standard deviation ~``scale``."""
    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(experts, d_model, generator=gen) * (scale / math.sqrt(d_model))


@functools.lru_cache(maxsize=None)
def calibrate_router_scale(experts: int, d_model: int, target: float = TARGET_TOP_P_EXPERTS) -> float:
    """Router scale at which Top-P 0.6 picks ``target`` experts per token on average (bisection)."""
    from hmoe_ds.routing import top_p_mask

    x = torch.randn(2048, d_model, generator=torch.Generator().manual_seed(SEED + 2))
    lo, hi = 0.01, 100.0
    for _ in range(25):
        mid = math.sqrt(lo * hi)
        probs = torch.softmax(x @ router_weight(experts, d_model, mid).t(), dim=1)
        if top_p_mask(probs, TOP_P).sum(dim=1).double().mean().item() > target:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def make_inputs(tokens: int, d_model: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer input (requires grad, as inside a model) and the upstream gradient."""
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(tokens, d_model, generator=gen).to(device, dtype).requires_grad_(True)
    g = torch.randn(tokens, d_model, generator=gen).to(device, dtype)
    return x, g


def build_module(job: dict[str, Any]) -> nn.Module:
    """Build one candidate (on CPU, fp32) from a JSON-able job description."""
    from deepspeed.moe.layer import MoE

    from hmoe_ds import HMoE
    from hmoe_ds.experts import FFNExpert

    cfg = LayerConfig(job["tokens"], job["experts"], job["d_model"])
    torch.manual_seed(SEED)
    kind = job["kind"]
    if kind == "floor":
        return FFNExpert(cfg.d_model, int(job["hidden"]))
    weight = router_weight(cfg.experts, cfg.d_model, job["router_scale"])
    if kind == "hmoe":
        layer = HMoE(cfg.d_model, expert_sizes(cfg), **HMOE_VARIANTS[job["variant"]])
        layer.deepspeed_moe.gate.wg.weight.data.copy_(weight)
        return layer
    if kind == "ds":
        layer = MoE(cfg.d_model, FFNExpert(cfg.d_model, cfg.homogeneous_hidden), num_experts=cfg.experts, k=2)
        layer.deepspeed_moe.gate.wg.weight.data.copy_(weight)
        return layer
    raise ValueError(f"unknown candidate kind {kind!r}")


def make_step(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> StepFn:
    """One training step's layer work: forward, backward (output grad + aux loss), drop the grads."""
    params = list(module.parameters())

    def step() -> None:
        out = module(x)
        if isinstance(out, tuple):
            y, l_aux = out[0], out[1]
            if l_aux.requires_grad:
                torch.autograd.backward([y, l_aux], [g, torch.ones_like(l_aux)])
            else:
                y.backward(g)
        else:
            out.backward(g)
        for p in params:
            p.grad = None
        x.grad = None

    return step


def build_step(job: dict[str, Any], device: torch.device) -> StepFn:
    """Entry point of the memory worker."""
    dtype = default_dtype(device)
    module = build_module(job).to(device, dtype)
    x, g = make_inputs(job["tokens"], job["d_model"], device, dtype)
    return make_step(module, x, g)


def run(quick: bool = False, threads: int = 2, memory: bool = True, configs: list[LayerConfig] | None = None) -> Table:
    """Measure every configuration and return the table."""
    setup_threads(threads)
    device = pick_device()
    dtype = default_dtype(device)
    configs = configs or (QUICK_CONFIGS if quick else FULL_CONFIGS)
    warmup, repeats = (1, 3) if quick else (2, 5)
    peak = peak_tflops(device)
    rows: list[list[Any]] = []
    for cfg in configs:
        base = dict(tokens=cfg.tokens, experts=cfg.experts, d_model=cfg.d_model)
        scale = calibrate_router_scale(cfg.experts, cfg.d_model)
        x, g = make_inputs(cfg.tokens, cfg.d_model, device, dtype)
        jobs: dict[str, dict[str, Any]] = {}
        modules: dict[str, nn.Module] = {}
        stats: dict[str, Any] = {}
        for variant in HMOE_VARIANTS:
            job = dict(base, kind="hmoe", variant=variant, router_scale=scale)
            layer = build_module(job).to(device, dtype)
            with torch.no_grad():
                layer(x)
            st = layer.last_stats
            stats[variant] = dict(
                act=st.activated_expert_params_per_token,
                experts_per_token=st.experts_per_token,
                dropped=st.dropped_assignments / max(1, int(st.selected_per_expert.sum())),
            )
            hidden = max(1, round(stats[variant]["act"] / (3 * cfg.d_model)))
            stats[variant]["hidden"] = hidden
            jobs[f"hmoe {variant}"], modules[f"hmoe {variant}"] = job, layer
            floor_job = dict(base, kind="floor", hidden=hidden)
            jobs[f"floor {variant}"], modules[f"floor {variant}"] = floor_job, build_module(floor_job).to(device, dtype)
        ds_job = dict(base, kind="ds", router_scale=scale)
        jobs["ds"], modules["ds"] = ds_job, build_module(ds_job).to(device, dtype)
        with torch.no_grad():
            modules["ds"](x)
        ds_counts = modules["ds"].deepspeed_moe.exp_counts.double()
        ds_capacity = max(4, math.ceil(2 * cfg.tokens / cfg.experts))  # top-2 at capacity_factor 1.0
        ds_dropped = float((ds_counts - ds_capacity).clamp(min=0).sum() / ds_counts.sum())

        times = time_interleaved(
            {name: make_step(m, x, g) for name, m in modules.items()}, device, warmup=warmup, repeats=repeats
        )
        del modules
        mem = dict(zip(jobs, run_memory_jobs("benchmarks.bench_layer", list(jobs.values()), threads))) if memory else {}
        ds_act = 2 * 3 * cfg.d_model * cfg.homogeneous_hidden
        for variant in HMOE_VARIANTS:
            s = stats[variant]
            t_h, t_f, t_ds = times[f"hmoe {variant}"], times[f"floor {variant}"], times["ds"]
            flops = swiglu_train_flops(cfg.tokens, cfg.d_model, s["act"] / (3 * cfg.d_model))
            achieved = flops / t_h / 1e12
            rows.append([
                cfg.tokens, cfg.experts, cfg.d_model, variant, s["experts_per_token"], 100 * s["dropped"],
                s["act"] / ds_act, 1e3 * t_h, 1e3 * t_f, t_h / t_f, 1e3 * t_ds, 100 * ds_dropped, t_h / t_ds,
                1e3 * achieved if peak is None else 100 * achieved / peak,
                mem.get(f"hmoe {variant}", float("nan")), mem.get(f"floor {variant}", float("nan")),
                mem.get("ds", float("nan")), times.others_cpu_pct,
            ])
        print(f"  layer T={cfg.tokens} E={cfg.experts} d={cfg.d_model} done", flush=True)

    return Table(
        title="Layer forward+backward: HMoE vs dense floor vs DeepSpeed MoE",
        headers=[
            "T", "E", "d", "HMoE", "exp/tok", "drop %", "act/DS", "HMoE ms", "floor ms", "HMoE/floor",
            "DS-MoE ms", "DS drop %", "HMoE/DS", "HMoE GFLOP/s" if peak is None else "HMoE MFU %",
            "HMoE MiB", "floor MiB", "DS MiB", "others CPU %",
        ],
        rows=rows,
        notes=[
            f"median of {repeats} interleaved samples after {warmup} warm-up step(s); ms per forward+backward",
            "floor: dense SwiGLU FFN of width (activated expert params per token) / 3d, measured per variant",
            "DS-MoE: deepspeed.moe.layer.MoE, E experts of width 2d, top-2, capacity_factor 1.0, defaults",
            "act/DS: activated expert params per token of the HMoE variant / DS-MoE's nominal 2 x 6d^2",
            "HMoE GFLOP/s: useful expert FLOPs (18 T d h_act) / HMoE time" if peak is None
            else f"MFU against a peak of {peak:.0f} TFLOP/s",
            "MiB: peak memory of one fwd+bwd above weights+input (activations, temporaries, gradients); "
            "CPU: RSS high-water mark in a fresh worker process" if memory else "memory not measured (--no-memory)",
            "others CPU %: share of the machine's CPU used by other processes while timing (contention; "
            "above ~10% the MoE rows are inflated more than the dense floor)",
        ],
    )
