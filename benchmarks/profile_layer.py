"""Where does the HMoE layer's time go? Phase split, op profile, and prototyped fixes.

    .venv/bin/python -m benchmarks.profile_layer [--tokens 8192 --experts 8 --d-model 256 --threads 2]

1. Phases, forward+backward, timed interleaved in one process:
   ``floor`` (dense SwiGLU of the same activated width; also applied to E
   token blocks, to show the cache effect of its big intermediates), ``HMoE`` (the real
   layer, Top-K=2), ``experts only`` (the same per-expert FFNs on
   pre-grouped contiguous rows, plus the concatenation: what
   ``HeteroExperts.forward`` does), ``experts only, packed`` (the same with
   ``PackedHeteroExperts``, the ZeRO-3/AutoEP front-end's storage) and
   ``routing only`` (the layer with identity experts: router, losses, plan,
   gather, combine). ``HMoE ~= experts only + routing only``.
2. ``torch.profiler`` self-time per op for one HMoE step.
3. Prototypes of changes to ``hmoe_ds`` (applied here by monkeypatching,
   nothing in ``hmoe_ds/`` is edited), each timed against the unmodified
   layer in the same process; see :data:`PROTOTYPES`.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .bench_layer import LayerConfig, build_module, calibrate_router_scale, make_inputs, make_step
from .common import Table, default_dtype, pick_device, setup_threads, time_interleaved


# --------------------------------------------------------------------------- prototypes


def _fused_gate_up_forward(
    self: Any, x_RD: torch.Tensor, counts: Sequence[int], *, output_grad_is_scratch: bool = False
) -> torch.Tensor:  # noqa: D401
    """Prototype: one [2h, d] GEMM for gate+up per expert (w1 and w3 concatenated), output preallocated.

    Plain autograd, so ``output_grad_is_scratch`` (the layer's offer of its gradient buffer) is ignored.
    """
    chunks = torch.split(x_RD, list(counts), dim=0)
    outputs = []
    for expert, chunk in zip(self.deepspeed_experts, chunks):
        h = expert.ffn_size
        gate_up = F.linear(chunk, torch.cat([expert.w1.weight, expert.w3.weight], dim=0))
        outputs.append(F.linear(F.silu(gate_up[:, :h]) * gate_up[:, h:], expert.w2.weight))
    return torch.cat(outputs, dim=0)


@contextlib.contextmanager
def fused_gate_up() -> Iterator[None]:
    """Patch ``HeteroExperts.forward`` with :func:`_fused_gate_up_forward` (SwiGLU only)."""
    from hmoe_ds.experts import HeteroExperts
    from hmoe_ds.moe_core import MoECore

    original = HeteroExperts.forward
    # The prototype takes grouped rows: the layer gathers and scatter-adds around it (no TokenRoute).
    original_route = MoECore.experts_route_tokens
    MoECore.experts_route_tokens = False  # type: ignore[misc]
    HeteroExperts.forward = _fused_gate_up_forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        HeteroExperts.forward = original  # type: ignore[method-assign]
        MoECore.experts_route_tokens = original_route  # type: ignore[misc]


PROTOTYPES: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "fused gate+up GEMM": fused_gate_up,
}


class _PatchedStep:
    """A step that runs with a monkeypatch active only while it runs (so it interleaves with the baseline)."""

    def __init__(self, step: Callable[[], None], patch: Callable[[], contextlib.AbstractContextManager[None]]):
        self.step, self.patch = step, patch

    def __call__(self) -> None:
        with self.patch():
            self.step()


# --------------------------------------------------------------------------- phases


def _experts_only_step(
    layer: nn.Module, x: torch.Tensor, g: torch.Tensor, experts: nn.Module | None = None
) -> Callable[[], None]:
    """Per-expert FFNs on pre-grouped rows with the same counts as the layer's routing, + concatenation."""
    from hmoe_ds import collect_routing_stats
    with torch.no_grad(), collect_routing_stats() as stats:
        layer(x)
    counts = stats[0].assignments_per_expert.tolist()
    experts = experts if experts is not None else layer.deepspeed_moe.experts
    x_rows = x.detach().repeat(2, 1)[: sum(counts)].clone().requires_grad_(True)
    g_rows = g.repeat(2, 1)[: sum(counts)]
    params = list(experts.parameters())

    def step() -> None:
        experts(x_rows, counts).backward(g_rows)
        for p in params:
            p.grad = None
        x_rows.grad = None

    return step


class _TokenChunked(nn.Module):
    """The dense floor applied to ``chunks`` consecutive token blocks (same FLOPs, cache-sized intermediates)."""

    def __init__(self, ffn: nn.Module, chunks: int) -> None:
        super().__init__()
        self.ffn, self.chunks = ffn, chunks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.ffn(c) for c in x.chunk(self.chunks, dim=0)], dim=0)


def _packed_like(layer: nn.Module) -> nn.Module:
    """``PackedHeteroExperts`` holding the same expert weights as ``layer``'s module list."""
    from hmoe_ds.experts import PackedHeteroExperts

    packed = PackedHeteroExperts(layer.hidden_size, layer.expert_sizes, layer.config.activation, "loop")
    with torch.no_grad():
        for dst, src in zip(packed.per_expert_weights(), layer.deepspeed_moe.experts.per_expert_weights()):
            for d_view, s_view in zip(dst, src):
                if d_view is not None:
                    d_view.copy_(s_view)
    return packed


def run(cfg: LayerConfig, threads: int, repeats: int = 5) -> list[Table]:
    setup_threads(threads)
    device = pick_device()
    dtype = default_dtype(device)
    scale = calibrate_router_scale(cfg.experts, cfg.d_model)
    base = dict(tokens=cfg.tokens, experts=cfg.experts, d_model=cfg.d_model, router_scale=scale)
    x, g = make_inputs(cfg.tokens, cfg.d_model, device, dtype)
    # The layer as built by default (expert_compute="auto": the per-expert loop on CPU, grouped GEMMs on
    # accelerators): the phases and prototypes below dissect it; "HMoE grouped" forces the grouped path.
    layer = build_module(dict(base, kind="hmoe", variant="hmoe")).to(device, dtype)
    grouped = build_module(dict(base, kind="hmoe", variant="hmoe-grouped")).to(device, dtype)
    from hmoe_ds import collect_routing_stats
    with torch.no_grad(), collect_routing_stats() as stats:
        layer(x)
    hidden = round(stats[0].activated_expert_params_per_token / (3 * cfg.d_model))
    floor = build_module(dict(base, kind="floor", hidden=hidden)).to(device, dtype)
    routing = build_module(dict(base, kind="hmoe", variant="hmoe")).to(device, dtype)
    # Identity experts; the layer itself gathers the rows and scatter-adds them back (at ep_size 1 the built-in
    # experts would do both inside their forward, which this replaces), so "routing only" includes both.
    routing.deepspeed_moe.experts_route_tokens = False
    routing.deepspeed_moe.experts.forward = lambda x_RD, counts, **_: x_RD  # ignores output_grad_is_scratch

    chunked_floor = _TokenChunked(floor, cfg.experts)
    steps: dict[str, Callable[[], None]] = {
        "floor": make_step(floor, x, g),
        f"floor, tokens in {cfg.experts} chunks": make_step(chunked_floor, x, g),
        "HMoE": make_step(layer, x, g),
        "HMoE grouped": make_step(grouped, x, g),
        "experts only": _experts_only_step(layer, x, g),
        "experts only, packed": _experts_only_step(layer, x, g, _packed_like(layer).to(device, dtype)),
        "routing only": make_step(routing, x, g),
    }
    for name, patch in PROTOTYPES.items():
        steps[f"HMoE + {name}"] = _PatchedStep(make_step(layer, x, g), patch)
    times = time_interleaved(steps, device, warmup=2, repeats=repeats)
    t_floor, t_hmoe = times["floor"], times["HMoE"]
    phase = Table(
        f"HMoE top-k phases, T={cfg.tokens} E={cfg.experts} d={cfg.d_model}, {torch.get_num_threads()} threads",
        ["step", "ms", "/ floor", "/ HMoE"],
        [[name, 1e3 * t, t / t_floor, t / t_hmoe] for name, t in times.median_s.items()],
        ["forward+backward, median of interleaved samples; 'HMoE + X' = the layer with prototype X monkeypatched",
         f"other processes used {times.others_cpu_pct:.0f}% of the machine's CPU while timing"],
    )

    step = make_step(layer, x, g)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    ops = Table(
        "torch.profiler: HMoE top-k fwd+bwd, self CPU time per op (3 steps)",
        ["op", "calls/step", "ms/step", "%"],
        [[e.key, e.count // 3, e.self_cpu_time_total / 3e3, 100 * e.self_cpu_time_total / total] for e in events[:15]],
        ["aten::mm is the expert math (and the router); the rest is routing, dispatch, combine and elementwise"],
    )
    return [phase, ops]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for table in run(LayerConfig(args.tokens, args.experts, args.d_model), args.threads, args.repeats):
        print(table.render() + "\n")


if __name__ == "__main__":
    main()
