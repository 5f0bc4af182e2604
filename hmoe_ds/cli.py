"""Command-line drivers: what ``run/eval.py`` does, as a function.

A driver reads files named on a command line, calls the library, prints for a
person and writes a result file; it sits above every other layer (beside
:mod:`hmoe_ds.launch`) and nothing in the library imports it. The training
driver is :func:`hmoe_ds.training.trainer.run_training`; the export driver
:func:`hmoe_ds.export.main`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .collectives import rank as current_rank
from .collectives import world_size as current_world_size
from .errors import ExperimentError

__all__ = ["run_evaluation", "write_json"]


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, creating the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


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
    from deepspeed.accelerator import get_accelerator
    from transformers.initialization import no_init_weights

    from .checkpoint import EXPERIMENT_FILE
    from .data import EvalBatchIterator
    from .export import load_logical_weights, resolve_source
    from .modeling import HMoEConfig, HMoEForCausalLM, parameter_summary
    from .training.evaluate import evaluate, format_routing_table
    from .training.experiment import load_experiment
    from .training.trainer import load_datasets

    source = resolve_source(path, tag)
    run_dir = source.path.parent.parent if source.kind == "checkpoint" else None
    default_experiment = source.path / (EXPERIMENT_FILE if source.kind == "checkpoint" else "experiment.yaml")
    exp_path = Path(config) if config else default_experiment
    if not exp_path.is_file():
        raise ExperimentError(f"{exp_path}: not found; pass --config <experiment.yaml> to say which data to use")
    exp = load_experiment(exp_path, overrides)
    if source.kind == "hf" and exp.data.get("tokenizer") is None and source.tokenizer_dir is not None:
        exp.data["tokenizer"] = str(source.tokenizer_dir)  # the export's own tokenizer
    rank, world = current_rank(), current_world_size()
    data = load_datasets(exp)
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
