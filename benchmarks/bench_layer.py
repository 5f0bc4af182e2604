"""HMoE layer forward+backward time against its physical floor, a plain per-expert loop and DeepSpeed's MoE.

Per configuration (T tokens, E experts, width d) all candidates are built in
one process on the same input and timed interleaved (see
:mod:`benchmarks.common`):

* ``HMoE``: the dropless layer, Top-2, expert sizes
  ``solve_expert_sizes(num_experts=E, homogeneous_hidden=2d)`` (arithmetic,
  the paper's main setting; 2d as in the paper's 0.4B model), with the expert
  path the layer picks itself (``expert_compute="auto"``: grouped GEMMs per
  width bucket on accelerators, one GEMM chain per expert on CPU;
  :mod:`hmoe_ds.experts`). ``HMoE grouped`` is the same layer forced onto the
  grouped GEMMs (``expert_compute="grouped"``), whose operator count does not
  grow with E.
* ``plain``: the obvious 40-line implementation a user could write
  (:class:`PlainLoopMoE`: softmax top-2, then per expert index-select, one
  SwiGLU chain, index-add of the gated output), with the same weights.
* ``floor``: one dense SwiGLU FFN whose hidden width is the expert
  parameters the HMoE layer activated per token on this batch divided by 3d
  (the ``RoutingStats`` of ``collect_routing_stats``): same expert FLOPs, no routing. The floor is the
  better of one matmul over all T rows and 2,048-row chunks (one big matmul
  falls out of cache at large T).
* ``DS-MoE``: ``deepspeed.moe.layer.MoE`` with E homogeneous SwiGLU experts
  (``hmoe_ds.experts.FFNExpert``) of width 2d, top-2, its defaults
  (capacity_factor 1.0, drop_tokens, second-expert sampling): the same
  activated parameters per token as HMoE top-2 under uniform routing.
* bf16 columns: ``HMoE`` and ``floor`` again with bf16 weights and inputs
  (router softmax, Top-K/Top-P and the losses stay fp32 inside the layer).

Operator counts come from ``torch.profiler`` over one forward+backward of the
layer: top-level ATen operators (those called from Python or by the autograd
engine, not the ones nested inside another ATen op, e.g. the per-group GEMMs
that ``grouped_mm`` runs on CPU), excluding view and metadata operators
(``view``, ``slice``, ``transpose``, ``empty``, ...) that launch no kernel.

Routers: all layers of a configuration share one router matrix, scaled so
that Top-P 0.6 would pick about 2 experts per token (a randomly initialised
router is nearly uniform; a trained one is sharp), so load imbalance is the
same for every candidate.

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


# Full mode: the rows. E=8 at 2k and 8k tokens (no slower than before the grouped path),
# E=32 and E=64 (fine-grained experts, where the per-expert loop fell behind), d in {256, 512}
# (~10-15 min on 2 CPU cores).
FULL_CONFIGS = [
    LayerConfig(2048, 8, 256),
    LayerConfig(8192, 8, 256),
    LayerConfig(8192, 8, 512),
    LayerConfig(2048, 32, 256),
    LayerConfig(8192, 32, 256),
    LayerConfig(2048, 32, 512),
    LayerConfig(8192, 32, 512),
    LayerConfig(2048, 64, 256),
    LayerConfig(8192, 64, 256),
    LayerConfig(2048, 64, 512),
]
QUICK_CONFIGS = [LayerConfig(2048, 8, 256)]

#: Options of the HMoE candidates: Top-2, the path the layer picks, and the loop forced.
HMOE_VARIANTS: dict[str, dict[str, Any]] = {
    "hmoe": dict(routing="top_k", top_k=2),
    "hmoe-grouped": dict(routing="top_k", top_k=2, expert_compute="grouped"),
}
FLOOR_CHUNK_ROWS = 2048


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


class PlainLoopMoE(nn.Module):
    """The obvious per-expert loop a user could write: the baseline the grouped design must beat.

    Softmax router, top-k with renormalised gates, then for each expert:
    index-select its tokens, one SwiGLU chain, index-add of the gated output.
    """

    def __init__(self, d_model: int, sizes: list[int], k: int = 2) -> None:
        super().__init__()
        from hmoe_ds.experts import FFNExpert

        self.k = k
        self.router = nn.Linear(d_model, len(sizes), bias=False)
        self.experts = nn.ModuleList(FFNExpert(d_model, h) for h in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.router(x).float(), dim=-1)
        gate, chosen = probs.topk(self.k, dim=-1)
        gate = gate / gate.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            out = out.index_add(0, token, expert(x[token]) * gate[token, slot, None].to(x.dtype))
        return out

    @classmethod
    def from_hmoe(cls, layer: nn.Module) -> "PlainLoopMoE":
        """Same router and expert weights as an ``ep_size=1`` HMoE layer."""
        plain = cls(layer.hidden_size, list(layer.expert_sizes), layer.config.top_k)
        with torch.no_grad():
            plain.router.weight.copy_(layer.moe_core.gate.wg.weight)
            for e, weights in layer.moe_core.local_expert_weights().items():
                expert = plain.experts[e]
                expert.w1.weight.copy_(weights["w1"])
                expert.w2.weight.copy_(weights["w2"])
                expert.w3.weight.copy_(weights["w3"])
        return plain


class ChunkedFloor(nn.Module):
    """The dense floor applied to ``FLOOR_CHUNK_ROWS``-row blocks (stays in cache at large T)."""

    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.ffn(chunk) for chunk in x.split(FLOOR_CHUNK_ROWS)])


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
    if kind == "floor-chunked":
        return ChunkedFloor(FFNExpert(cfg.d_model, int(job["hidden"])))
    weight = router_weight(cfg.experts, cfg.d_model, job["router_scale"])
    if kind in ("hmoe", "plain"):
        layer = HMoE(cfg.d_model, expert_sizes(cfg), **HMOE_VARIANTS[job.get("variant", "hmoe")])
        layer.deepspeed_moe.gate.wg.weight.data.copy_(weight)
        return layer if kind == "hmoe" else PlainLoopMoE.from_hmoe(layer)
    if kind == "ds":
        # drop_tokens=False: DeepSpeed's dropless mode, every expert padded to the busiest one's load.
        layer = MoE(cfg.d_model, FFNExpert(cfg.d_model, cfg.homogeneous_hidden), num_experts=cfg.experts, k=2,
                    drop_tokens=job.get("drop_tokens", True))
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
    dtype = getattr(torch, job["dtype"]) if "dtype" in job else default_dtype(device)
    module = build_module(job).to(device, dtype)
    x, g = make_inputs(job["tokens"], job["d_model"], device, dtype)
    return make_step(module, x, g)


#: Operators that only create views or metadata (no kernel); left out of the operator count.
_VIEW_OPS = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::slice", "aten::select",
    "aten::transpose", "aten::t", "aten::permute", "aten::expand", "aten::unsqueeze", "aten::squeeze",
    "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::narrow", "aten::as_strided", "aten::alias",
    "aten::detach", "aten::lift_fresh", "aten::empty", "aten::empty_like", "aten::empty_strided",
    "aten::new_empty", "aten::new_empty_strided", "aten::resize_", "aten::is_nonzero", "aten::item",
    "aten::_local_scalar_dense", "aten::result_type", "aten::contiguous", "aten::to", "aten::_to_copy_noop",
    "aten::view_as", "aten::chunk", "aten::numpy_T", "aten::matrix_H", "aten::mT",
}


def count_operators(step: StepFn) -> int:
    """Top-level, kernel-launching ATen operators in one call of ``step`` (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    count = 0
    for event in prof.events():
        if not event.name.startswith("aten::") or event.name in _VIEW_OPS:
            continue
        parent, nested = event.cpu_parent, False
        while parent is not None:
            if parent.name.startswith("aten::"):
                nested = True
                break
            parent = parent.cpu_parent
        count += not nested
    return count


def run(quick: bool = False, threads: int = 2, memory: bool = True, configs: list[LayerConfig] | None = None,
        bf16: bool = True) -> Table:
    """Measure every configuration and return the table."""
    setup_threads(threads)
    device = pick_device()
    dtype = default_dtype(device)
    configs = configs or (QUICK_CONFIGS if quick else FULL_CONFIGS)
    warmup, repeats = (1, 3) if quick else (2, 9)
    peak = peak_tflops(device)
    rows: list[list[Any]] = []
    for cfg in configs:
        base = dict(tokens=cfg.tokens, experts=cfg.experts, d_model=cfg.d_model)
        scale = calibrate_router_scale(cfg.experts, cfg.d_model)
        x, g = make_inputs(cfg.tokens, cfg.d_model, device, dtype)
        jobs: dict[str, dict[str, Any]] = {}
        modules: dict[str, nn.Module] = {}
        inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for variant in HMOE_VARIANTS:
            jobs[variant] = dict(base, kind="hmoe", variant=variant, router_scale=scale)
        layer = build_module(jobs["hmoe"]).to(device, dtype)
        from hmoe_ds import collect_routing_stats
        with torch.no_grad(), collect_routing_stats() as stats:
            layer(x)
        st = stats[0]
        act = st.activated_expert_params_per_token
        hidden = max(1, round(act / (3 * cfg.d_model)))
        path = layer.deepspeed_moe.experts
        path_label = f"grouped/{len(path.width_buckets)}" if path.runs_grouped(device, dtype) else "loop"
        jobs["plain"] = dict(base, kind="plain", router_scale=scale)
        jobs["floor"] = dict(base, kind="floor", hidden=hidden)
        jobs["floor-chunked"] = dict(base, kind="floor-chunked", hidden=hidden)
        jobs["ds"] = dict(base, kind="ds", router_scale=scale)
        jobs["ds-dropless"] = dict(base, kind="ds", router_scale=scale, drop_tokens=False)
        for name, job in jobs.items():
            modules[name] = layer if name == "hmoe" else build_module(job).to(device, dtype)
            inputs[name] = (x, g)
        if bf16:
            xb, gb = make_inputs(cfg.tokens, cfg.d_model, device, torch.bfloat16)
            for name in ("hmoe", "floor", "floor-chunked"):
                modules[f"{name} bf16"] = build_module(jobs[name]).to(device, torch.bfloat16)
                inputs[f"{name} bf16"] = (xb, gb)
        with torch.no_grad():
            modules["ds"](x)
        ds_counts = modules["ds"].deepspeed_moe.exp_counts.double()
        ds_capacity = max(4, math.ceil(2 * cfg.tokens / cfg.experts))  # top-2 at capacity_factor 1.0
        ds_dropped = float((ds_counts - ds_capacity).clamp(min=0).sum() / ds_counts.sum())

        steps = {name: make_step(m, *inputs[name]) for name, m in modules.items()}
        ops = {name: count_operators(steps[name]) for name in ("hmoe", "hmoe-grouped", "plain")}
        times = time_interleaved(steps, device, warmup=warmup, repeats=repeats)
        del modules, steps
        mem_jobs = {name: jobs[name] for name in ("hmoe", "hmoe-grouped", "plain", "floor", "ds")}
        mem = dict(zip(mem_jobs, run_memory_jobs("benchmarks.bench_layer", list(mem_jobs.values()), threads))) \
            if memory else {}
        t_h, t_g, t_p, t_ds = times["hmoe"], times["hmoe-grouped"], times["plain"], times["ds"]
        t_dsd = times["ds-dropless"]
        t_f = min(times["floor"], times["floor-chunked"])
        # The same ratio from each candidate's fastest sample: on a shared machine, noise only adds time.
        best_ratio = times.min_s["hmoe"] / min(times.min_s["floor"], times.min_s["floor-chunked"])
        t_hb = times["hmoe bf16"] if bf16 else float("nan")
        t_fb = min(times["floor bf16"], times["floor-chunked bf16"]) if bf16 else float("nan")
        flops = swiglu_train_flops(cfg.tokens, cfg.d_model, act / (3 * cfg.d_model))
        achieved = flops / t_h / 1e12
        rows.append([
            cfg.tokens, cfg.experts, cfg.d_model, "top-k", path_label, st.experts_per_token,
            1e3 * t_h, 1e3 * t_f, t_h / t_f, best_ratio, t_g / t_f, t_p / t_f, t_h / t_p,
            1e3 * t_ds, 100 * ds_dropped, t_h / t_ds, 1e3 * t_dsd, t_h / t_dsd,
            1e3 * t_hb, t_hb / t_fb,
            1e3 * achieved if peak is None else 100 * achieved / peak,
            mem.get("hmoe", float("nan")), mem.get("hmoe-grouped", float("nan")), mem.get("plain", float("nan")),
            mem.get("floor", float("nan")), mem.get("ds", float("nan")),
            ops["hmoe"], ops["hmoe-grouped"], ops["plain"], times.others_cpu_pct,
        ])
        print(f"  layer T={cfg.tokens} E={cfg.experts} d={cfg.d_model} done", flush=True)

    return Table(
        title="Layer forward+backward: HMoE vs dense floor, plain per-expert loop and DeepSpeed MoE",
        headers=[
            "T", "E", "d", "HMoE", "path", "exp/tok", "HMoE ms", "floor ms", "HMoE/floor", "HMoE/floor min", "grouped/floor",
            "plain/floor", "HMoE/plain", "DS-MoE ms", "DS drop %", "HMoE/DS", "DS dropless ms", "HMoE/DS dropless",
            "bf16 HMoE ms", "bf16 HMoE/floor",
            "HMoE GFLOP/s" if peak is None else "HMoE MFU %",
            "HMoE MiB", "grouped MiB", "plain MiB", "floor MiB", "DS MiB", "ops HMoE", "ops grouped", "ops plain",
            "others CPU %",
        ],
        rows=rows,
        notes=[
            f"median of {repeats} interleaved samples after {warmup} warm-up step(s); ms per forward+backward; "
            f"{dtype} unless marked bf16; HMoE/floor min: the ratio of the fastest samples",
            "HMoE: Top-2, expert_compute='auto'; path: what that runs here (grouped/<width buckets> or loop); "
            "grouped/floor: the same layer with expert_compute='grouped'",
            "plain: the 40-line per-expert loop (index-select, SwiGLU, index-add), same weights",
            "floor: dense SwiGLU of width (activated expert params per token) / 3d, better of one matmul and "
            f"{FLOOR_CHUNK_ROWS}-row chunks",
            "DS-MoE: deepspeed.moe.layer.MoE, E experts of width 2d, top-2, capacity_factor 1.0, defaults "
            "(it drops the assignments over capacity: DS drop %); DS dropless: the same with drop_tokens=False "
            "(every expert padded to the busiest one's load), the same work as the dropless HMoE",
            "bf16: HMoE and floor with bf16 weights and inputs (router, Top-K and losses in fp32 inside the layer)",
            "HMoE GFLOP/s: useful expert FLOPs (18 T d h_act) / HMoE time" if peak is None
            else f"MFU against a peak of {peak:.0f} TFLOP/s",
            "MiB: peak memory of one fwd+bwd above weights+input (activations, temporaries, gradients); "
            "CPU: RSS high-water mark in a fresh worker process" if memory else "memory not measured (--no-memory)",
            "ops: top-level kernel-launching ATen operators of one fwd+bwd (torch.profiler; views excluded)",
            "others CPU %: share of the machine's CPU used by other processes while timing (contention; "
            "above ~10% the MoE rows are inflated more than the dense floor)",
        ],
    )
