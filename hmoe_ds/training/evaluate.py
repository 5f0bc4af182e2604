"""Validation loss, perplexity and routing statistics, in the trainer and in ``run/eval.py`` (:mod:`hmoe_ds.cli`).

:func:`evaluate` runs up to ``num_batches`` validation micro-batches per rank through a
DeepSpeed engine or a plain module and all-reduces the sums once at the end. A
forward pass with expert parallelism (or ZeRO-3) holds collectives that every rank
must join, so every rank runs the same number of forwards: the *maximum* over
ranks. A rank whose share is used up runs an uncounted filler forward instead.
Every example is therefore counted exactly once whatever the world size, and the
validation loss of a model does not depend on how many ranks evaluate it (up to
floating-point summation order), which is what re-sharding relies on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from hmoe_ds.collectives import all_reduce_max, all_reduce_sum, release_gathered_parameters

from .metrics import LayerLoad, RoutingAccumulator, routing_scalars

__all__ = ["EvalResult", "evaluate", "format_routing_table"]


@dataclass
class EvalResult:
    """Mean next-token loss over the evaluated tokens (LM loss only, no aux terms) and the routing."""

    loss: float
    tokens: int
    batches: int
    loads: list[LayerLoad] = field(default_factory=list)

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.loss < 50 else float("inf")

    def scalars(self, prefix: str = "val") -> dict[str, float]:
        return {f"{prefix}/loss": self.loss, f"{prefix}/ppl": self.ppl}

    def to_dict(self, non_expert_params: int | None = None) -> dict[str, Any]:
        """JSON form: loss, ppl, tokens and per-layer routing (fractions, experts/token, activated params)."""
        layers = [
            {
                "moe_layer": i,
                "expert_sizes": list(load.expert_sizes),
                "token_fraction": load.token_fraction,
                "experts_per_token": load.experts_per_token,
                "dropped_assignments": load.dropped_assignments,
                "activated_expert_params_per_token": load.activated_params_per_token,
            }
            for i, load in enumerate(self.loads)
        ]
        out: dict[str, Any] = {"loss": self.loss, "ppl": self.ppl, "tokens": self.tokens, "batches": self.batches}
        out["moe_layers"] = layers
        if non_expert_params is not None and self.loads:
            out.update(
                {k.removeprefix("moe/"): v for k, v in routing_scalars(self.loads, non_expert_params).items()
                 if k.count("/") == 1}
            )
        return out


def _filler(batch: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Input for a forward that only joins the other ranks' collectives; its loss is not counted."""
    if batch is not None:
        return batch
    ids = torch.zeros(1, 2, dtype=torch.long)  # this rank has no validation example at all (fewer than ranks)
    return {"input_ids": ids, "labels": ids}


@torch.no_grad()
def evaluate(
    model: Callable[..., Any] | torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    num_batches: int,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Mean LM loss over up to ``num_batches`` micro-batches per rank (collective when distributed).

    ``model`` is a DeepSpeed engine or an ``HMoEForCausalLM``; it is put in eval
    mode and back in train mode afterwards if it was training. ``batches`` must
    have a ``len()`` (this rank's batch count) when running distributed; every
    rank then runs ``max`` over ranks of ``min(num_batches, len(batches))``
    forwards, counting only its own real batches (module docstring).
    """
    module = getattr(model, "module", model)
    was_training = bool(getattr(module, "training", False))
    getattr(model, "eval")()
    mine = min(num_batches, len(batches)) if hasattr(batches, "__len__") else num_batches  # type: ignore[arg-type]
    n = int(all_reduce_max(torch.tensor([mine], dtype=torch.float64)).item())
    routing = RoutingAccumulator()
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    done = 0
    iterator = iter(batches)
    last: dict[str, torch.Tensor] | None = None
    try:
        for step in range(n):
            real = step < mine
            batch = next(iterator, None) if real else None
            if batch is None:
                real, batch = False, _filler(last)
            last = batch
            input_ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device)
            out = model(input_ids=input_ids, labels=labels)
            if not real:
                routing.track(out.routing_stats or [])
                continue
            counted = int((labels[:, 1:] != -100).sum())  # the model shifts: position t predicts labels[t+1]
            loss_sum += out.lm_loss.detach().double().cpu() * counted
            tokens += counted
            routing.update(out.routing_stats or [])
            done += 1
    finally:
        if was_training:
            getattr(model, "train")()
        release_gathered_parameters(model)
    sums = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64)]))
    total_tokens = int(sums[1].item())
    loss = float(sums[0].item()) / total_tokens if total_tokens else float("nan")
    return EvalResult(loss=loss, tokens=total_tokens, batches=done, loads=routing.reduce())


def format_routing_table(result: EvalResult, non_expert_params: int | None = None) -> str:
    """Human-readable table: one row per MoE layer, token fraction per expert (size in the header)."""
    lines = [f"validation loss {result.loss:.4f}  ppl {result.ppl:.2f}  ({result.tokens} tokens)"]
    if not result.loads:
        return "\n".join(lines)
    sizes = result.loads[0].expert_sizes
    header = ["layer"] + [f"e{e}:{s}" for e, s in enumerate(sizes)] + ["exp/tok", "act.params/tok"]
    rows = [
        [str(i)]
        + [f"{f:.3f}" for f in load.token_fraction]
        + [f"{load.experts_per_token:.2f}", f"{load.activated_params_per_token:,.0f}"]
        for i, load in enumerate(result.loads)
    ]
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    lines.append("token fraction per expert (header: expert index:FFN size)")
    for row in [header] + rows:
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    if non_expert_params is not None:
        total = non_expert_params + sum(load.activated_params_per_token for load in result.loads)
        mean_ept = sum(load.experts_per_token for load in result.loads) / len(result.loads)
        lines.append(
            f"activated params per token: {total:,.0f} (non-expert {non_expert_params:,} + experts); "
            f"mean experts per token {mean_ept:.2f}"
        )
    return "\n".join(lines)
