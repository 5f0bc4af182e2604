"""Routing + dispatch + combine cost as tokens and experts grow (no expert math).

Every layer's experts are replaced by the identity (HMoE: the experts
module's forward returns its rows; DeepSpeed: ``nn.Identity`` experts), so what is timed (forward+backward) is the
router, the auxiliary losses, the grouping of (token, expert) assignments and
the weighted combine. Candidates, per (T tokens, E experts), width d:

* ``HMoE top-k``: dropless Top-K=2; ``HMoE top-p``: Top-P 0.6, router scaled
  to ~2 experts per token (as in :mod:`benchmarks.bench_layer`).
* ``DS MOELayer``: ``deepspeed.moe.layer.MoE`` top-2, capacity_factor 1.0
  (DeepSpeed 0.19.8 dispatches through ``_sparse_encode``/``_sparse_decode``:
  an ``[E, C, d]`` buffer, C = 2T/E).
* ``DS einsum``: the GShard path still in ``deepspeed.moe.sharded_moe``
  (``top2gating(..., sparse_routes=False)`` builds ``[T, E, C]`` combine
  weights and a dispatch mask; dispatch ``einsum("sec,sm->ecm")`` and combine
  ``einsum("sec,ecm->sm")``), which DeepSpeed's ``MOELayer`` used before its
  sparse rewrite. With C = 2T/E it is O(T x E x C) = O(T^2): run only up to
  ``EINSUM_MAX_TOKENS``.
* gate forward only: HMoE (router, route, P-Penalty, ``plan_dispatch``) and
  DeepSpeed's ``TopKGate`` (as ``MOELayer`` calls it).

A least-squares fit ``t = a + b * (T x chosen experts) + c * (T x E)`` (``+
e * T x E x C`` for the einsum path) is printed per candidate: ``b`` is the
cost per (token x chosen expert), ``c`` the per-(token x expert) router cost.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .bench_layer import SEED, calibrate_router_scale, make_inputs, make_step, router_weight
from .common import StepFn, Table, default_dtype, pick_device, run_memory_jobs, setup_threads, time_interleaved

EINSUM_MAX_TOKENS = 4096
CAPACITY_FACTOR = 1.0
MIN_CAPACITY = 4

FULL_D = 256
FULL_GRID = [(t, 16) for t in (1024, 2048, 4096, 8192, 16384, 32768)] + [(4096, e) for e in (8, 32, 64, 128)]
QUICK_D = 128
QUICK_GRID = [(t, 8) for t in (512, 1024, 2048)] + [(1024, 32)]

CANDIDATES = ("HMoE top-k", "HMoE top-p", "DS MOELayer", "DS einsum")


class GShardEinsumMoE(nn.Module):
    """DeepSpeed's dense top-2 path: ``top2gating(sparse_routes=False)`` + GShard einsums, identity experts."""

    def __init__(self, d_model: int, experts: int) -> None:
        super().__init__()
        self.wg = nn.Linear(d_model, experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from deepspeed.moe.sharded_moe import top2gating

        logits = F.linear(x.float(), self.wg.weight.float())
        l_aux, combine_sec, dispatch_sec, _ = top2gating(logits, CAPACITY_FACTOR, MIN_CAPACITY, drop_tokens=True)
        dispatched_ecm = torch.einsum("sec,sm->ecm", dispatch_sec.type_as(x), x)
        expert_out_ecm = dispatched_ecm  # identity experts
        return torch.einsum("sec,ecm->sm", combine_sec.type_as(x), expert_out_ecm), l_aux


def _sizes(experts: int, d_model: int) -> list[int]:
    from hmoe_ds.sizes import solve_expert_sizes

    return solve_expert_sizes(num_experts=experts, homogeneous_hidden=2 * d_model)


def build_module(job: dict[str, Any]) -> nn.Module:
    """One candidate with identity experts (CPU, fp32)."""
    from deepspeed.moe.layer import MoE

    from hmoe_ds import HMoE

    torch.manual_seed(SEED)
    d, e = job["d_model"], job["experts"]
    weight = router_weight(e, d, job["router_scale"])
    name = job["candidate"]
    if name.startswith("HMoE"):
        opts = dict(routing="top_k", top_k=2) if name == "HMoE top-k" else dict(routing="top_p", top_p=0.6, entropy_coef=0.03)
        layer = HMoE(d, _sizes(e, d), **opts)
        # Identity experts; the layer itself gathers the rows and scatter-adds them back (at ep_size 1 the
        # built-in experts would do both inside their forward, which this replaces), so those are measured.
        layer.deepspeed_moe.experts_route_tokens = False
        layer.deepspeed_moe.experts.forward = lambda x_RD, counts, **_: x_RD  # ignores output_grad_is_scratch
        layer.deepspeed_moe.gate.wg.weight.data.copy_(weight)
        return layer
    if name == "DS MOELayer":
        layer = MoE(d, nn.Identity(), num_experts=e, k=2, capacity_factor=CAPACITY_FACTOR, min_capacity=MIN_CAPACITY)
        layer.deepspeed_moe.gate.wg.weight.data.copy_(weight)
        return layer
    if name == "DS einsum":
        layer = GShardEinsumMoE(d, e)
        layer.wg.weight.data.copy_(weight)
        return layer
    raise ValueError(f"unknown candidate {name!r}")


def build_step(job: dict[str, Any], device: torch.device) -> StepFn:
    """Entry point of the memory worker."""
    dtype = default_dtype(device)
    module = build_module(job).to(device, dtype)
    x, g = make_inputs(job["tokens"], job["d_model"], device, dtype)
    return make_step(module, x, g)


def gate_forward_steps(hmoe: nn.Module, ds: nn.Module, x: torch.Tensor) -> dict[str, StepFn]:
    """Forward-only gating of HMoE (route + P-Penalty + plan) and of DeepSpeed's ``TopKGate``."""
    from hmoe_ds import losses as L
    from hmoe_ds.dispatch import plan_dispatch
    from hmoe_ds.routing import route

    block = hmoe.deepspeed_moe
    sizes_E = L.normalized_expert_sizes(block.config.expert_sizes, device=x.device)

    @torch.no_grad()
    def hmoe_gate() -> None:
        r = route(block.gate(x), method="top_k", top_k=2)
        L.p_penalty_loss(probs_TE=r.probs_TE, mask_TE=r.mask_TE, expert_sizes_E=sizes_E)
        plan_dispatch(r, capacity=None)

    @torch.no_grad()
    def ds_gate() -> None:
        ds.deepspeed_moe.gate(x, None, True)  # as MOELayer.forward calls it (sparse routes)

    return {"gate HMoE": hmoe_gate, "gate DS": ds_gate}


def _lstsq(features: list[list[float]], times: list[float]) -> tuple[list[float], float, float]:
    """Least squares with an intercept on *relative* errors (rows weighted by 1/t), as the grid spans
    two orders of magnitude; returns (coefficients, R^2, max relative residual)."""
    a = torch.tensor([[1.0] + f for f in features], dtype=torch.float64)
    t = torch.tensor(times, dtype=torch.float64).unsqueeze(1)
    scale = a.abs().max(dim=0).values.clamp(min=1e-30)
    coef = torch.linalg.lstsq(a / scale / t, t / t).solution.squeeze(1) / scale
    pred = (a @ coef.unsqueeze(1)).squeeze(1)
    resid = t.squeeze(1) - pred
    r2 = 1.0 - float(resid.square().sum() / (t - t.mean()).square().sum().clamp(min=1e-30))
    return coef.tolist(), r2, float((resid.abs() / t.squeeze(1)).max())


def run(quick: bool = False, threads: int = 2, memory: bool = True) -> list[Table]:
    """Measure the grid; return the per-configuration table and the fit table."""
    setup_threads(threads)
    device = pick_device()
    dtype = default_dtype(device)
    d = QUICK_D if quick else FULL_D
    grid = QUICK_GRID if quick else FULL_GRID
    einsum_max = 1024 if quick else EINSUM_MAX_TOKENS
    warmup, repeats = (1, 3) if quick else (2, 5)
    rows: list[list[Any]] = []
    fit_data: dict[str, list[tuple[list[float], float]]] = {c: [] for c in CANDIDATES}
    scales = {e: calibrate_router_scale(e, d) for e in sorted({e for _, e in grid})}
    mem_jobs: list[dict[str, Any]] = []
    mem_index: dict[tuple[int, int, str], int] = {}
    for tokens, experts in grid:
        x, g = make_inputs(tokens, d, device, dtype)
        names = [c for c in CANDIDATES if c != "DS einsum" or tokens <= einsum_max]
        jobs = {c: dict(candidate=c, tokens=tokens, experts=experts, d_model=d, router_scale=scales[experts]) for c in names}
        modules = {c: build_module(job).to(device, dtype) for c, job in jobs.items()}
        from hmoe_ds import collect_routing_stats
        with torch.no_grad(), collect_routing_stats() as stats:
            modules["HMoE top-p"](x)
        k_top_p = stats[0].experts_per_token
        capacity = max(MIN_CAPACITY, math.ceil(CAPACITY_FACTOR * 2 * tokens / experts))
        steps = {c: make_step(m, x, g) for c, m in modules.items()}
        steps.update(gate_forward_steps(modules["HMoE top-k"], modules["DS MOELayer"], x.detach()))
        times = time_interleaved(steps, device, warmup=warmup, repeats=repeats)
        del modules, steps
        chosen = {"HMoE top-k": 2.0, "HMoE top-p": k_top_p, "DS MOELayer": 2.0, "DS einsum": 2.0}
        for c in names:
            feats = [tokens * chosen[c], float(tokens * experts)]
            if c == "DS einsum":
                feats.append(float(tokens * experts * capacity))
            fit_data[c].append((feats, times[c]))
            mem_index[(tokens, experts, c)] = len(mem_jobs)
            mem_jobs.append(jobs[c])
        ms = lambda c: 1e3 * times[c] if c in times else float("nan")  # noqa: E731
        per_pair = lambda c: 1e9 * times[c] / (tokens * chosen[c]) if c in times else float("nan")  # noqa: E731
        rows.append([
            tokens, experts, k_top_p, ms("HMoE top-k"), ms("HMoE top-p"), ms("DS MOELayer"), ms("DS einsum"),
            per_pair("HMoE top-k"), per_pair("DS MOELayer"), per_pair("DS einsum"), ms("gate HMoE"), ms("gate DS"),
            times.others_cpu_pct,
        ])
        print(f"  scaling T={tokens} E={experts} done", flush=True)

    headers = [
        "T", "E", "top-p exp/tok", "HMoE-k ms", "HMoE-p ms", "DS ms", "DS-einsum ms",
        "HMoE-k ns/(T*k)", "DS ns/(T*k)", "DS-einsum ns/(T*k)", "gate fwd HMoE ms", "gate fwd DS ms",
        "others CPU %",
    ]
    notes = [
        f"d={d}; forward+backward with identity experts; median of {repeats} interleaved samples after {warmup} "
        f"warm-up(s); DS-einsum skipped (n/a) above T={einsum_max} (its [T,E,C] tensors grow as T^2)",
        "ns/(T*k): time per (token x chosen expert); flat along a column = linear in T x k",
        "gate fwd: forward only; HMoE = router + route + P-Penalty + plan_dispatch; DS = TopKGate as MOELayer calls it",
        "others CPU %: share of the machine's CPU used by other processes while timing (contention)",
    ]
    if memory:
        peaks = run_memory_jobs("benchmarks.bench_scaling", mem_jobs, threads)
        for row, (tokens, experts) in zip(rows, grid):
            row += [peaks[mem_index[(tokens, experts, c)]] if (tokens, experts, c) in mem_index else float("nan")
                    for c in CANDIDATES]
        headers += ["HMoE-k MiB", "HMoE-p MiB", "DS MiB", "DS-einsum MiB"]
        notes.append("MiB: peak memory of one fwd+bwd above weights+input, RSS high-water mark in one fresh worker "
                     "process (peak counter reset between candidates)")
    per_config = Table("Routing + dispatch + combine scaling (identity experts)", headers, rows, notes)

    fit_rows: list[list[Any]] = []
    for c in CANDIDATES:
        data = fit_data[c]
        if len(data) <= len(data[0][0]) + 1:  # need more points than unknowns
            continue
        coef, r2, max_rel = _lstsq([f for f, _ in data], [t for _, t in data])
        fit_rows.append([
            c, 1e3 * coef[0], 1e9 * coef[1], 1e9 * coef[2], 1e9 * coef[3] if len(coef) > 3 else float("nan"),
            r2, 100 * max_rel,
        ])
    fit = Table(
        "Fit t = a + b*(T x chosen experts) + c*(T x E) [+ e*(T x E x C)]",
        ["candidate", "a ms", "b ns/(T*k)", "c ns/(T*E)", "e ns/(T*E*C)", "R^2", "max |resid| %"],
        fit_rows,
        ["weighted least squares (relative error) over all grid points of the candidate; a linear cost in T x k shows as b dominating "
         "with a high R^2; DeepSpeed's einsum path needs the T x E x C term"],
    )
    return [per_config, fit]
