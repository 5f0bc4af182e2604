"""Validation loss, perplexity and routing statistics, in the trainer and in ``run/eval.py``.

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

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .metrics import LayerLoad, RoutingAccumulator, _all_reduce_sum, routing_scalars

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


def _count_max(value: int) -> int:
    t = torch.tensor([value], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


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
    n = _count_max(mine)
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
    sums = _all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64)]))
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


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- run/eval.py


def _micro_batch(run_dir: Path | None) -> int:
    """The training micro-batch size (from the run's ds_config.json), else 8."""
    ds_json = run_dir / "ds_config.json" if run_dir is not None else None
    if ds_json is not None and ds_json.is_file():
        return int(json.loads(ds_json.read_text(encoding="utf-8")).get("train_micro_batch_size_per_gpu", 8))
    return 8


def run_evaluation(path: str | Path, tag: str | None, config: str | None, overrides: list[str],
                   eval_batches: int | None, output: str | None) -> dict[str, Any]:
    """Evaluate a checkpoint or an HF export on its experiment's validation split; print + write JSON on rank 0.

    ``path`` is anything :func:`hmoe_ds.export.resolve_source` accepts (a run, its
    ``checkpoints/``, one checkpoint, an HF export). The model is rebuilt from the
    checkpoint's *logical* weights, streamed tensor by tensor, with the experts
    spread over the ranks (``ep_size = gcd(world size, experts)``), so a
    checkpoint of any ZeRO stage, EP size or placement evaluates on any number
    of processes; ranks split the validation set. The
    data come from ``config``, else the checkpoint's own experiment (an HF export
    needs ``config``). Collective when distributed.
    """
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from hmoe_ds.checkpoint import EXPERIMENT_FILE
    from hmoe_ds.data import EvalBatchIterator, build_lm_datasets
    from hmoe_ds.export import load_logical_weights, resolve_source
    from hmoe_ds.modeling import HMoEConfig, HMoEForCausalLM, parameter_summary
    from transformers.initialization import no_init_weights

    from .experiment import ExperimentError, load_experiment
    from .trainer import _rank0_first

    source = resolve_source(path, tag)
    run_dir = source.path.parent.parent if source.kind == "checkpoint" else None
    default_experiment = source.path / (EXPERIMENT_FILE if source.kind == "checkpoint" else "experiment.yaml")
    exp_path = Path(config) if config else default_experiment
    if not exp_path.is_file():
        raise ExperimentError(f"{exp_path}: not found; pass --config <experiment.yaml> to say which data to use")
    exp = load_experiment(exp_path, overrides)
    if source.kind == "hf" and exp.data.get("tokenizer") is None and source.tokenizer_dir is not None:
        exp.data["tokenizer"] = str(source.tokenizer_dir)  # the export's own tokenizer
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    data = _rank0_first(lambda: build_lm_datasets(exp.data_config()))
    model_config = HMoEConfig.from_dict(source.config)
    if len(data.tokenizer) > model_config.vocab_size:
        raise ExperimentError(f"{exp_path}: its tokenizer has {len(data.tokenizer)} tokens but the model "
                              f"{source.describe()} only {model_config.vocab_size}; evaluate with the experiment "
                              "the model was trained with (--config)")
    # Experts are spread over the evaluating ranks (expert parallelism) rather than replicated: the largest
    # EP size that divides both the world size and the number of experts.
    ep_size = math.gcd(world, model_config.moe_layer_config().num_experts) if model_config.moe_layer_frequency else 1
    if ep_size > 1:
        model_config.moe = {**model_config.moe, "ep_size": ep_size}
    with no_init_weights():  # every weight is loaded next, tensor by tensor
        model = HMoEForCausalLM(model_config)
    model.tie_weights()
    load_logical_weights(model, source)
    if rank == 0 and ep_size > 1:
        print(f"experts sharded over {ep_size} ranks (expert parallelism {ep_size})", flush=True)
    device = get_accelerator().current_device_name()
    model.to(device)
    loader = EvalBatchIterator(data.validation, _micro_batch(run_dir), rank=rank, world_size=world)
    result = evaluate(model, loader, eval_batches or len(loader), device)
    non_expert = int(parameter_summary(model)["non_expert_params"])
    payload = {"target": str(source.path), "step": (source.marker or {}).get("step"), **result.to_dict(non_expert)}
    if rank == 0:
        print(format_routing_table(result, non_expert), flush=True)
        if output:
            out_path = Path(output)
        elif run_dir is not None:
            out_path = run_dir / f"eval_{source.path.name}.json"
        else:
            out_path = source.path / "eval.json"
        write_json(out_path, payload)
        print(f"wrote {out_path}", flush=True)
    return payload
