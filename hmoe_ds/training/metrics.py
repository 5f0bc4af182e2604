"""Training metrics: accumulate between log points, reduce over ranks, write TensorBoard + metrics.jsonl.

Scalars go through DeepSpeed's monitor (``engine.monitor.write_events``; since
DeepSpeed 0.18.3 the engine no longer logs the train loss itself) and, as one
JSON object per logged step, to ``<output_dir>/metrics.jsonl``. The expert-load
picture needs an image summary, which the monitor cannot write, so rank 0 keeps
its own ``SummaryWriter`` on the monitor's directory (TensorBoard merges the
event files of one directory into one run).

Routing statistics are summed over every micro-batch since the last log point
and all-reduced over the data-parallel ranks, so they describe the global
batches, not the last micro-batch of rank 0.

Tag reference (E experts, layer index i over MoE layers only)::

    train/lm_loss, train/aux_loss, train/aux/<term>, train/lr, train/grad_norm, perf/tokens_per_s
    moe/layer_<i>/expert_<e>_token_fraction     share of the layer's (token, expert) assignments; sums to 1 [per-expert]
    moe/layer_<i>/experts_per_token             mean number of experts a token uses [varies]
    moe/layer_<i>/dropped_assignments           (token, expert) pairs dropped by capacity [capacity only]
    moe/layer_<i>/activated_params_per_token    expert parameters a token activates in that layer [varies]
    moe/layer_<i>/load_min, load_max            smallest / largest expert token fraction (uniform = 1/E)
    moe/layer_<i>/load_cv                       coefficient of variation (std / mean) of the experts' loads
    moe/layer_<i>/dead_experts                  experts that got no assignment in the window
    moe/layer_<i>/expert_load (histogram)       the layer's expert token fractions, one value per expert
    moe/activated_params_per_token              non-expert params + sum over layers of the above [varies]
    moe/mean_experts_per_token                  mean over layers [varies]
    moe/layer_<i>/ep_rank_<r>_expert_flops_per_step
                                                forward expert FLOPs of one device at EP rank r per step [EP > 1]
    moe/layer_<i>/ep_flops_imbalance            max/mean over EP ranks of the FLOPs (1 = balanced) [EP > 1]
    deepspeed/<name>                            DeepSpeed's own ``Train/Samples/<name>`` events (loss scale,
                                                wall-clock breakdown), re-indexed by optimizer step
    val/loss, val/ppl                           at every evaluation

``metrics.jsonl`` keeps every tag of every log point; TensorBoard gets fewer.
So the number of tags does not grow with experts x layers, a layer's per-expert
tags ([per-expert]) are written only when the run asks for them
(``run.per_expert_metrics``: ``auto``, the default, writes them for layers of at
most :data:`PER_EXPERT_AUTO_LIMIT` experts; ``always``; ``never``); the four
spread numbers and the histogram describe any number of experts.

A tag that cannot change during the run is not written as a scalar (a flat
chart says nothing): [varies] tags are left out where routing fixes them (Top-K
without a capacity limit always uses K experts, and with equal expert sizes
activates the same parameters), [capacity only] where nothing can be dropped,
[EP > 1] when one rank holds every expert. Such constants, and the static
placement facts (expert parameters per EP rank and their imbalance), are
written once, as the TensorBoard text ``run/constants`` (:func:`constant_facts`).

DeepSpeed's engine logs ``Train/Samples/lr`` (and, with fp16 or
``wall_clock_breakdown``, more) with the number of samples seen as x, which
does not line up with the step-indexed tags above. :class:`StepAlignedMonitor`
sits in front of ``engine.monitor``: it drops ``Train/Samples/lr`` (the same
value as ``train/lr``) and writes the others as ``deepspeed/<name>`` at the
optimizer step.

TensorBoard's Custom Scalars tab gets a layout (:func:`custom_scalars_layout`): the losses
first, then one category per MoE layer whose first chart draws every expert's token
fraction as one line (expert sizes in the chart title; per-expert tags only), next to the
spread statistics.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from hmoe_ds.collectives import all_reduce_sum

from .experiment import PER_EXPERT_AUTO_LIMIT, PER_EXPERT_CHOICES

__all__ = [
    "PER_EXPERT_AUTO_LIMIT",
    "PER_EXPERT_CHOICES",
    "LayerLoad",
    "LayerTags",
    "StepAlignedMonitor",
    "MetricsWriter",
    "RoutingAccumulator",
    "TrainAccumulator",
    "constant_facts",
    "custom_scalars_layout",
    "ep_load_scalars",
    "layer_tags",
    "purge_tensorboard_after",
    "expert_load_figure",
    "format_postfix",
    "read_jsonl",
    "routing_scalars",
    "spread_scalars",
]


class _Monitor(Protocol):
    def write_events(self, event_list: list[tuple[str, float, int]]) -> None: ...


@dataclass(frozen=True)
class LayerTags:
    """Which of one MoE layer's scalar tags a run writes (the module docstring's [brackets]).

    The default writes everything (what a caller without a run, e.g. a test or
    :func:`routing_scalars` on an evaluation, gets).
    """

    per_expert: bool = True  # expert_<e>_token_fraction
    experts_per_token: bool = True  # False: Top-K without capacity always routes to K experts
    activated_params: bool = True  # False: ... and with equal sizes always activates K * params
    dropped_assignments: bool = True  # False: no capacity limit, nothing is ever dropped
    ep_flops: bool = True  # False: EP 1, one rank holds every expert


def layer_tags(config: Any, per_expert_metrics: str = "auto") -> LayerTags:
    """The tags that can change for a layer of this ``HMoELayerConfig`` (routing, capacity, sizes, EP).

    ``per_expert_metrics`` is ``run.per_expert_metrics`` (:data:`PER_EXPERT_CHOICES`).
    """
    if per_expert_metrics not in PER_EXPERT_CHOICES:
        raise ValueError(f"per_expert_metrics={per_expert_metrics!r}: allowed values are {PER_EXPERT_CHOICES}")
    sizes = list(config.expert_sizes)
    can_drop = config.capacity_factor is not None
    fixed_count = config.routing == "top_k" and not can_drop  # a RoutingMethod (StrEnum) compares to its value
    per_expert = {"always": True, "never": False}.get(per_expert_metrics, len(sizes) <= PER_EXPERT_AUTO_LIMIT)
    return LayerTags(
        per_expert=per_expert,
        experts_per_token=not fixed_count,
        activated_params=not (fixed_count and len(set(sizes)) == 1),
        dropped_assignments=can_drop,
        ep_flops=int(config.ep_size) > 1,
    )


@dataclass
class LayerLoad:
    """Routing of one MoE layer over a window of micro-batches, summed over ranks."""

    expert_sizes: tuple[int, ...]
    num_tokens: float
    tokens_per_expert: list[float]  # kept (token, expert) assignments per logical expert
    selected_assignments: float  # assignments the router chose, before any capacity drop
    dropped_assignments: float
    activated_params_sum: float  # sum over tokens of the expert parameters they activated
    expert_params: tuple[int, ...] = ()  # weights of each logical expert (RoutingStats.expert_params)

    @property
    def token_fraction(self) -> list[float]:
        """Each expert's share of the kept assignments (sums to 1; 1/E is perfectly even)."""
        total = sum(self.tokens_per_expert)
        return [c / total if total else 0.0 for c in self.tokens_per_expert]

    @property
    def experts_per_token(self) -> float:
        return self.selected_assignments / self.num_tokens if self.num_tokens else 0.0

    @property
    def activated_params_per_token(self) -> float:
        return self.activated_params_sum / self.num_tokens if self.num_tokens else 0.0

    @property
    def load_cv(self) -> float:
        """Coefficient of variation (population std / mean) of the experts' kept assignments; 0 = even load."""
        counts = self.tokens_per_expert
        mean = sum(counts) / len(counts) if counts else 0.0
        if mean <= 0:
            return 0.0
        return math.sqrt(sum((c - mean) ** 2 for c in counts) / len(counts)) / mean

    @property
    def dead_experts(self) -> int:
        """Experts that received no (token, expert) assignment in the window."""
        return sum(1 for c in self.tokens_per_expert if c <= 0)


_HEAD = 4  # per-layer row: [tokens, selected, dropped, activated_sum, counts per expert...]


@dataclass
class RoutingAccumulator:
    """Sums ``RoutingStats`` (one per MoE layer per forward) until :meth:`reduce`.

    Sums stay tensors on the stats' device so accumulating never waits for the
    device; the only host sync is the reduction at a log point.
    """

    _rows: list[torch.Tensor] = field(default_factory=list)
    _params: list[torch.Tensor] = field(default_factory=list)
    _sizes: list[tuple[int, ...]] = field(default_factory=list)

    def track(self, routing_stats: Sequence[Any]) -> None:
        """Allocate the (zero) sums for these MoE layers without counting anything.

        A rank that ran only forwards it must not count (e.g. evaluation filler
        batches) still has to join :meth:`reduce`'s all-reduce with the same shapes.
        """
        if routing_stats and not self._rows:
            self._sizes = [tuple(int(s) for s in st.expert_sizes) for st in routing_stats]
            device = routing_stats[0].assignments_per_expert.device
            self._rows = [torch.zeros(_HEAD + len(s), dtype=torch.float64, device=device) for s in self._sizes]
            self._params = [torch.tensor(st.expert_params, dtype=torch.float64, device=device) for st in routing_stats]

    def update(self, routing_stats: Sequence[Any]) -> None:
        if not routing_stats:
            return
        self.track(routing_stats)
        for row, params, st in zip(self._rows, self._params, routing_stats, strict=True):
            kept = st.assignments_per_expert.detach().to(torch.float64)
            row[0] += st.num_tokens
            row[1] += st.selected_per_expert.detach().sum().to(torch.float64)
            row[2] += st.dropped.detach().to(torch.float64)
            row[3] += (kept * params).sum() if params.numel() else 0.0
            row[_HEAD:] += kept

    def reduce(self) -> list[LayerLoad]:
        """Collective: every rank must call it (same number of layers everywhere). Resets the sums."""
        if not self._rows:
            return []
        flat = all_reduce_sum(torch.cat(self._rows)).tolist()
        loads, offset = [], 0
        for sizes, params_t in zip(self._sizes, self._params, strict=True):
            params = tuple(int(p) for p in params_t.tolist())
            row = flat[offset : offset + _HEAD + len(sizes)]
            offset += _HEAD + len(sizes)
            loads.append(LayerLoad(sizes, row[0], row[_HEAD:], row[1], row[2], row[3], params))
        self._rows = [torch.zeros_like(r) for r in self._rows]
        return loads


@dataclass
class TrainAccumulator:
    """Losses, tokens and routing since the last log point; :meth:`reduce` gives the scalars."""

    routing: RoutingAccumulator = field(default_factory=RoutingAccumulator)
    _sums: dict[str, torch.Tensor] = field(default_factory=dict)
    _micro: int = 0
    _tokens: int = 0
    _since: float = field(default_factory=time.perf_counter)

    def update(self, out: Any, num_tokens: int) -> None:
        """Add one micro-batch's model output (``lm_loss``, ``aux_loss``, ``aux_losses``, ``routing_stats``)."""
        terms = {"train/lm_loss": out.lm_loss, "train/aux_loss": out.aux_loss}
        terms.update({f"train/aux/{k}": v for k, v in (getattr(out, "aux_losses", None) or {}).items()})
        for key, value in terms.items():
            if value is not None:
                value = torch.as_tensor(value).detach().to(torch.float64).reshape(())
                self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._micro += 1
        self._tokens += int(num_tokens)
        self.routing.update(getattr(out, "routing_stats", None) or [])

    def reduce(self) -> tuple[dict[str, float], list[LayerLoad]]:
        """Collective. Mean losses over micro-batches and ranks, global tokens/s, routing loads; then reset.

        Every rank must have logged the same loss terms (they come from the same model).
        """
        keys = sorted(self._sums)
        counts = torch.tensor([self._micro, self._tokens], dtype=torch.float64)
        device = self._sums[keys[0]].device if keys else counts.device
        packed = torch.cat([torch.stack([self._sums[k] for k in keys]).cpu() if keys else counts[:0], counts])
        packed = all_reduce_sum(packed.to(device)).tolist()
        micro, tokens = packed[-2], packed[-1]
        elapsed = max(time.perf_counter() - self._since, 1e-9)
        scalars = {k: v / max(micro, 1) for k, v in zip(keys, packed)}
        scalars["perf/tokens_per_s"] = tokens / elapsed
        loads = self.routing.reduce()
        self._sums, self._micro, self._tokens, self._since = {}, 0, 0, time.perf_counter()
        return scalars, loads

    def exclude_time(self, seconds: float) -> None:
        """Leave time spent outside training (evaluation, checkpoints) out of tokens/s."""
        self._since += seconds


def routing_scalars(
    loads: Sequence[LayerLoad],
    non_expert_params: int,
    prefix: str = "moe",
    tags: Sequence[LayerTags] | None = None,
) -> dict[str, float]:
    """Per-layer and model-level routing scalars (tags in the module docstring).

    ``tags[i]`` (:func:`layer_tags`) says which of layer i's tags the run
    writes; None writes all of them. A model-level tag is written when any
    layer's counterpart is.
    """
    tags = list(tags) if tags is not None else [LayerTags()] * len(loads)
    if len(tags) != len(loads):
        raise ValueError(f"{len(tags)} LayerTags for {len(loads)} MoE layers")
    scalars: dict[str, float] = {}
    for i, (load, wanted) in enumerate(zip(loads, tags)):
        if wanted.per_expert:
            for e, frac in enumerate(load.token_fraction):
                scalars[f"{prefix}/layer_{i}/expert_{e}_token_fraction"] = frac
        if wanted.experts_per_token:
            scalars[f"{prefix}/layer_{i}/experts_per_token"] = load.experts_per_token
        if wanted.dropped_assignments:
            scalars[f"{prefix}/layer_{i}/dropped_assignments"] = load.dropped_assignments
        if wanted.activated_params:
            scalars[f"{prefix}/layer_{i}/activated_params_per_token"] = load.activated_params_per_token
        scalars.update(spread_scalars(load, f"{prefix}/layer_{i}"))
    if loads and any(t.activated_params for t in tags):
        scalars[f"{prefix}/activated_params_per_token"] = non_expert_params + sum(
            load.activated_params_per_token for load in loads
        )
    if loads and any(t.experts_per_token for t in tags):
        scalars[f"{prefix}/mean_experts_per_token"] = sum(load.experts_per_token for load in loads) / len(loads)
    return scalars


def spread_scalars(load: LayerLoad, prefix: str) -> dict[str, float]:
    """A layer's load spread in four numbers, however many experts it has (tags in the module docstring).

    Per-layer statistics as Megatron-LM, torchtitan and NeMo users ask for them:
    min / max of the token fractions, their coefficient of variation, and the
    number of experts that got nothing.
    """
    fractions = load.token_fraction
    return {f"{prefix}/load_min": min(fractions), f"{prefix}/load_max": max(fractions),
            f"{prefix}/load_cv": load.load_cv, f"{prefix}/dead_experts": float(load.dead_experts)}


def custom_scalars_layout(
    expert_sizes: Sequence[Sequence[int]],
    prefix: str = "moe",
    tags: Sequence[LayerTags] | None = None,
) -> dict[str, dict[str, list]]:
    """TensorBoard Custom Scalars layout (``SummaryWriter.add_custom_scalars``): losses first, then one category per MoE layer.

    ``expert_sizes[i]`` are MoE layer i's expert FFN widths; they go into the
    chart title, since a multiline chart's legend can only show tag names.
    The per-expert chart is there when layer i writes per-expert tags
    (``tags[i].per_expert``; None = every layer does). Charts are
    ``[kind, [tag regexes]]``; a regex matching no tag draws nothing.
    """
    tags = list(tags) if tags is not None else [LayerTags()] * len(expert_sizes)
    layout: dict[str, dict[str, list]] = {
        "losses": {
            "LM loss (train, validation)": ["Multiline", [r"train/lm_loss", r"val/loss"]],
            "auxiliary losses (weighted sum, unweighted terms)": ["Multiline", [r"train/aux_loss", r"train/aux/.*"]],
        },
    }
    for i, (sizes, wanted) in enumerate(zip(expert_sizes, tags)):
        charts: dict[str, list] = {}
        if wanted.per_expert:
            title = "token fraction per expert (sizes " + ", ".join(f"{e}: {h}" for e, h in enumerate(sizes)) + ")"
            charts[title] = ["Multiline", [rf"{prefix}/layer_{i}/expert_\d+_token_fraction"]]
        charts["load spread (min, max of token fractions)"] = ["Multiline", [rf"{prefix}/layer_{i}/load_m(in|ax)"]]
        charts["load coefficient of variation, dead experts"] = [
            "Multiline", [rf"{prefix}/layer_{i}/load_cv", rf"{prefix}/layer_{i}/dead_experts"]]
        layout[f"MoE layer {i}"] = charts
    return layout


def constant_facts(
    configs: Sequence[Any],
    tags: Sequence[LayerTags],
    placements: Sequence[_Placement],
    expert_params: Sequence[Sequence[int]],
) -> str:
    """Markdown for the TensorBoard text ``run/constants``: what the run does not log as scalars because it cannot change.

    ``configs[i]`` is MoE layer i's ``HMoELayerConfig``, ``tags[i]`` its
    :func:`layer_tags`, ``placements[i]`` its EP placement and
    ``expert_params[i]`` its experts' weight counts (the router excluded).
    """
    lines = ["| MoE layer | expert sizes | routing | constant per token | EP ranks: expert params (max/mean) |",
             "|---|---|---|---|---|"]
    for i, (config, wanted, placement, params) in enumerate(zip(configs, tags, placements, expert_params)):
        threshold = f"k={config.top_k}" if config.routing == "top_k" else f"p={config.top_p}"
        routing = f"{config.routing} ({threshold})"
        constant = []
        if not wanted.experts_per_token:
            constant.append(f"{config.top_k} experts")
        if not wanted.activated_params:
            constant.append(f"{config.top_k * params[0]:,} expert params")
        if not wanted.dropped_assignments:
            constant.append("0 dropped (no capacity limit)")
        per_rank = [sum(params[e] for e in rank) for rank in placement.rank_experts]
        ratio = _imbalance([float(p) for p in per_rank])
        ranks = ", ".join(f"{p:,}" for p in per_rank) + (f" ({ratio:.3f})" if ratio is not None else "")
        sizes = ", ".join(str(h) for h in config.expert_sizes)
        lines.append(f"| {i} | {sizes} | {routing} | {'; '.join(constant) or '-'} | {ranks} |")
    return "\n".join(lines)


class StepAlignedMonitor:
    """A stand-in for ``engine.monitor`` that puts DeepSpeed's samples-indexed events on the step axis.

    DeepSpeed writes ``Train/Samples/<name>`` with x = samples seen
    (``engine.global_samples``), our tags with x = optimizer step, so the two
    never line up in one chart. Installed as ``engine.monitor``, this drops
    ``Train/Samples/lr`` (``train/lr`` has the same value) and writes every
    other ``Train/Samples/<name>`` as ``deepspeed/<name>`` at step
    ``samples // samples_per_step``. Everything else passes through unchanged.
    """

    PREFIX = "Train/Samples/"
    DROPPED = frozenset({"lr"})

    def __init__(self, monitor: Any, samples_per_step: int) -> None:
        if samples_per_step < 1:
            raise ValueError(f"samples_per_step={samples_per_step}: must be >= 1 (the global batch in sequences)")
        self.monitor = monitor
        self.samples_per_step = samples_per_step

    @property
    def enabled(self) -> bool:
        return bool(getattr(self.monitor, "enabled", False))

    def write_events(self, event_list: list[tuple[str, float, int]]) -> None:
        events = []
        for tag, value, x in event_list:
            if tag.startswith(self.PREFIX):
                name = tag[len(self.PREFIX):]
                if name in self.DROPPED:
                    continue
                tag, x = f"deepspeed/{name}", int(x) // self.samples_per_step
            events.append((tag, value, x))
        if events:
            self.monitor.write_events(events)

    def __getattr__(self, name: str) -> Any:  # the rest of MonitorMaster (tb_monitor, wandb_monitor, ...)
        return getattr(self.monitor, name)


class _Placement(Protocol):
    rank_experts: Sequence[Sequence[int]]  # hmoe_ds.placement.ExpertPlacement


def _imbalance(values: Sequence[float]) -> float | None:
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else None


def ep_load_scalars(
    loads: Sequence[LayerLoad],
    placements: Sequence[_Placement],
    steps: int,
    world_size: int,
    prefix: str = "moe",
    tags: Sequence[LayerTags] | None = None,
) -> dict[str, float]:
    """Per-EP-rank expert parameters and FLOPs of every MoE layer, so placement imbalance is visible.

    ``placements[i]`` is MoE layer i's ``layer.placement`` (its ``rank_experts``);
    ``loads`` cover ``steps`` optimizer steps of ``world_size`` ranks (as reduced
    by :class:`RoutingAccumulator`). For EP rank r holding experts E_r:

    * ``ep_rank_<r>_expert_params`` = sum_{e in E_r} params_e, with params_e =
      3*d*h_e (gated experts; 2*d*h_e for plain MLPs), the router excluded.
    * ``ep_rank_<r>_expert_flops_per_step`` = sum_{e in E_r} 2 * params_e * tokens_e
      / (steps * world_size/ep_size): the FORWARD matmul FLOPs (one multiply-add
      = 2 FLOPs) of the expert projections on one device at EP rank r, per
      optimizer step, averaged over the world_size/ep_size data-parallel
      replicas of that rank. tokens_e counts the kept (token, expert)
      assignments of the window on all ranks. Not counted: the activation and
      gate-weight products, the router, the all-to-all; backward adds about 2x
      the forward (a training step is ~3x these numbers).
    * ``ep_params_imbalance`` / ``ep_flops_imbalance`` = max / mean over EP
      ranks (1.0 = balanced; ep_size = all the load on one rank). The FLOPs
      ratio is left out of a window without tokens.

    With ep_size 1 there is one rank and both ratios are 1.

    With ``tags`` (a run's :func:`layer_tags`) only what can change is
    returned: the FLOPs tags of layers with EP > 1. The parameter tags are
    fixed by the placement (:func:`constant_facts` states them once).
    """
    if len(placements) != len(loads):
        raise ValueError(f"{len(placements)} placements for {len(loads)} MoE layers")
    if tags is not None and len(tags) != len(loads):
        raise ValueError(f"{len(tags)} LayerTags for {len(loads)} MoE layers")
    scalars: dict[str, float] = {}
    for i, (load, placement) in enumerate(zip(loads, placements)):
        if tags is not None and not tags[i].ep_flops:
            continue
        if len(load.expert_params) != len(load.expert_sizes):
            raise ValueError(f"layer {i}: LayerLoad has no expert_params (build it with RoutingAccumulator)")
        ep_size = len(placement.rank_experts)
        replicas = max(world_size // ep_size, 1)
        params = [float(sum(load.expert_params[e] for e in rank)) for rank in placement.rank_experts]
        flops = [
            sum(2.0 * load.expert_params[e] * load.tokens_per_expert[e] for e in rank) / (max(steps, 1) * replicas)
            for rank in placement.rank_experts
        ]
        static = tags is None  # with a run's tags, the placement's fixed parameter counts are left out
        for r in range(ep_size):
            if static:
                scalars[f"{prefix}/layer_{i}/ep_rank_{r}_expert_params"] = params[r]
            scalars[f"{prefix}/layer_{i}/ep_rank_{r}_expert_flops_per_step"] = flops[r]
        per_rank = {"params": params, "flops": flops} if static else {"flops": flops}
        for name, values in per_rank.items():
            ratio = _imbalance(values)
            if ratio is not None:
                scalars[f"{prefix}/layer_{i}/ep_{name}_imbalance"] = ratio
    return scalars


def purge_tensorboard_after(tb_dir: Path, step: int) -> None:
    """Make TensorBoard drop the points a crashed or abandoned run logged after ``step``.

    Writes a ``SessionLog.START`` event at ``step + 1`` (``SummaryWriter(purge_step=...)``):
    TensorBoard's reader then discards every event of the directory read before it
    with a step >= ``step + 1``, across all tags. It must be the first new event
    file of the directory, so call it before the resumed run creates any writer
    (DeepSpeed's monitor is created in ``deepspeed.initialize``).
    """
    from torch.utils.tensorboard import SummaryWriter

    Path(tb_dir).mkdir(parents=True, exist_ok=True)
    SummaryWriter(str(tb_dir), purge_step=step + 1).close()


def expert_load_figure(loads: Sequence[LayerLoad], title: str = "") -> Any:
    """Token fraction per expert vs expert size (left) and a layer x expert heat map (right)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for i, load in enumerate(loads):
        order = sorted(range(len(load.expert_sizes)), key=lambda e: load.expert_sizes[e])
        left.plot(
            [load.expert_sizes[e] for e in order], [load.token_fraction[e] for e in order], marker="o", label=f"layer {i}"
        )
    if loads:
        left.axhline(1.0 / len(loads[0].expert_sizes), color="grey", linestyle="--", linewidth=1, label="uniform")
        grid = [[f for f in load.token_fraction] for load in loads]
        image = right.imshow(grid, aspect="auto", cmap="viridis")
        fig.colorbar(image, ax=right, label="token fraction")
        right.set_xticks(range(len(loads[0].expert_sizes)))
        right.set_xticklabels([f"{e}\n{s}" for e, s in enumerate(loads[0].expert_sizes)], fontsize=7)
        right.set_yticks(range(len(loads)))
    left.set_xlabel("expert FFN hidden size")
    left.set_ylabel("share of (token, expert) assignments")
    left.legend(fontsize=7, ncol=2)
    right.set_xlabel("expert (index / size)")
    right.set_ylabel("MoE layer")
    fig.suptitle(title or "expert load")
    fig.tight_layout()
    return fig


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN/inf


class MetricsWriter:
    """Rank-0 writer: scalars to the DeepSpeed monitor and metrics.jsonl, images to TensorBoard.

    On other ranks every method is a no-op, so the loop can call it unconditionally.

    Args:
        output_dir: the run directory (``metrics.jsonl`` goes there).
        monitor: ``engine.monitor`` (anything with ``write_events([(tag, value, step)])``) or None.
        tensorboard_dir: the monitor's log directory (output_path/job_name) for images; None disables images.
        is_writer: True on rank 0.
        append: keep an existing metrics.jsonl (resume) instead of starting it anew.
    """

    def __init__(
        self,
        output_dir: str | Path,
        monitor: _Monitor | None,
        tensorboard_dir: str | Path | None,
        is_writer: bool,
        append: bool = False,
    ) -> None:
        self.is_writer = is_writer
        self.output_dir = Path(output_dir)
        self.jsonl_path = self.output_dir / "metrics.jsonl"
        self._monitor = monitor
        self._images: Any = None
        self._jsonl = None
        if not is_writer:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = self.jsonl_path.open("a" if append else "w", encoding="utf-8")
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # A distinct filename suffix keeps our event file apart from the monitor's in the same directory.
            self._images = SummaryWriter(log_dir=str(tensorboard_dir), filename_suffix=".images")

    def write(self, step: int, scalars: dict[str, float], record_only: dict[str, float] | None = None) -> None:
        """One logged step: ``scalars`` to TensorBoard (via the monitor), and with ``record_only`` as one JSON line.

        ``record_only`` holds what TensorBoard does not show (constant or
        per-expert tags a run leaves out there) but tools reading
        ``metrics.jsonl`` need (``placement: measured``, ``simulate_cluster``).
        """
        if not self.is_writer or not (scalars or record_only):
            return
        if self._monitor is not None and scalars:
            self._monitor.write_events([(tag, float(value), step) for tag, value in scalars.items()])
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: _finite_or_none(float(v)) for k, v in {**scalars, **(record_only or {})}.items()})
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def write_expert_load(self, step: int, loads: Sequence[LayerLoad], title: str = "") -> None:
        """The expert-load picture as an image summary (tag ``moe/expert_load``) and ``expert_load.png``."""
        if not self.is_writer or not loads:
            return
        import matplotlib.pyplot as plt
        import numpy as np
        from PIL import Image

        fig = expert_load_figure(loads, title or f"expert load at step {step}")
        # Rendered once, for both the file and TensorBoard (savefig and add_figure would each render it again:
        # ~0.3 s per picture on a 2-core machine, at every validation).
        fig.set_dpi(90)
        fig.canvas.draw()
        rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
        plt.close(fig)
        Image.fromarray(rgb).save(self.output_dir / "expert_load.png")
        if self._images is not None:
            self._images.add_image("moe/expert_load", rgb, global_step=step, dataformats="HWC")
            self._images.flush()

    def write_layout(self, expert_sizes: Sequence[Sequence[int]], tags: Sequence[LayerTags] | None = None) -> None:
        """The Custom Scalars layout (:func:`custom_scalars_layout`) of a model with these MoE layers; once per run."""
        if self._images is not None and expert_sizes:
            self._images.add_custom_scalars(custom_scalars_layout(expert_sizes, tags=tags))
            self._images.flush()

    def write_text(self, tag: str, markdown: str, step: int = 0) -> None:
        """A TensorBoard text summary (Text tab; markdown tables render), e.g. ``run/constants``."""
        if self._images is not None:
            self._images.add_text(tag, markdown, global_step=step)
            self._images.flush()

    def write_load_histograms(self, step: int, loads: Sequence[LayerLoad], prefix: str = "moe") -> None:
        """One histogram per MoE layer of its experts' token fractions (tag ``<prefix>/layer_<i>/expert_load``)."""
        if self._images is None or not loads:
            return
        for i, load in enumerate(loads):
            self._images.add_histogram(f"{prefix}/layer_{i}/expert_load", torch.tensor(load.token_fraction),
                                       global_step=step, bins="auto")
        self._images.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._images is not None:
            self._images.close()
            self._images = None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read metrics.jsonl back (one dict per logged step).

    A last line that does not parse is one a running trainer is still writing,
    and is left out; a bad line anywhere else is an error naming it.
    """
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not JSON ({exc})") from None
    return records


def format_postfix(scalars: dict[str, float]) -> dict[str, str]:
    """Compact tqdm postfix from a scalar dict."""
    out = {}
    if "train/lm_loss" in scalars:
        out["loss"] = f"{scalars['train/lm_loss']:.3f}"
    if "perf/tokens_per_s" in scalars:
        out["tok/s"] = f"{scalars['perf/tokens_per_s']:.0f}"
    return out

