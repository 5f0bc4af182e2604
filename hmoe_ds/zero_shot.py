"""Zero-shot multiple-choice accuracy through lm-evaluation-harness: what ``run/zero_shot.py`` does.

The paper reports zero-shot accuracy (PIQA, HellaSwag, ARC, BoolQ, WinoGrande,
SIQA) measured with lm-evaluation-harness; this driver runs the same harness on
an hmoe-ds model. It evaluates an HF export as any user of the export would
(``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` inside the
harness's ``hf`` model, no DeepSpeed in the process); a checkpoint (a run, its
``checkpoints/`` or one ``checkpoints/step_N``) is first exported with
``python -m hmoe_ds.export`` into a temporary directory (rank 0), removed afterwards.

By default it runs the offline tasks shipped in :mod:`hmoe_ds.eval_tasks`
(group ``hmoe_bigbench``); ``--tasks`` takes any harness task names, e.g. the
paper's ``piqa,hellaswag,arc_easy,arc_challenge,boolq,winogrande,social_iqa`` when
their datasets are in the local Hugging Face cache (hubs stay offline).

Processes: one, or N started by a launcher that sets ``RANK``/``WORLD_SIZE``
(``deepspeed --num_accelerators N``, ``torchrun --nproc_per_node N``,
``accelerate launch``). Each process holds the whole (small) model and scores
1/N of the requests; the harness gathers the per-request results on rank 0,
which computes the metrics, so the numbers do not depend on N. The harness's own
data parallelism covers GPUs only; on CPU this driver sets the ranks itself.

Needs the ``eval`` extra (``pip install "hmoe-ds[eval]"``; ``run/setup.sh`` installs it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .eval_tasks import BIGBENCH_TASKS, GROUP, TASK_DIR, TASK_NAMES, EvalDataMissing, check_prepared, prepare_bigbench

__all__ = ["build_parser", "check_tasks", "evaluate_zero_shot", "format_table", "main"]

#: Metrics reported per task, in this order (the harness names them ``<metric>,none``).
METRICS = ("acc", "acc_norm")


class ZeroShotError(RuntimeError):
    """A user-facing failure: printed as one line, exit 2."""


def _task_manager(tasks: Sequence[str]) -> Any:
    """The harness's task index: the shipped tasks, plus the harness's own only when ``tasks`` needs them.

    Indexing the harness's own task configs (about 15,000 YAML files) costs
    about 10 s of CPU in every process; the shipped tasks need none of them.
    """
    from lm_eval.tasks import TaskManager

    shipped_only = all(task in (GROUP, *TASK_NAMES) for task in tasks)
    return TaskManager(include_path=str(TASK_DIR), include_defaults=not shipped_only)


def check_tasks(tasks: Sequence[str], manager: Any) -> None:
    """Refuse unknown task names and shipped tasks without their data, before any model is exported or loaded."""
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ZeroShotError(f"unknown task(s) {', '.join(unknown)}: not registered with lm-evaluation-harness "
                            f"(shipped offline: {', '.join([GROUP, *TASK_NAMES])}; harness tasks need their "
                            "dataset in the local Hugging Face cache)")
    needed = BIGBENCH_TASKS if GROUP in tasks else [t.removeprefix(f"{GROUP}_") for t in tasks if t in TASK_NAMES]
    try:
        check_prepared(needed)
    except EvalDataMissing as exc:
        raise ZeroShotError(str(exc)) from None


def _is_export(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _default_output(path: Path, tag: str | None) -> Path:
    """Next to the input: ``<export>/zero_shot.json`` or ``<run>/zero_shot[_<tag>].json``."""
    if _is_export(path):
        return path / "zero_shot.json"
    run_dir = path
    if path.name == "checkpoints":
        run_dir = path.parent
    elif path.parent.name == "checkpoints":
        run_dir, tag = path.parent.parent, tag or path.name
    return run_dir / (f"zero_shot_{tag}.json" if tag else "zero_shot.json")


def _export_checkpoint(path: Path, tag: str | None, out: Path) -> None:
    """``python -m hmoe_ds.export path out [--tag tag]``, in its own process (keeps DeepSpeed out of this one)."""
    cmd = [sys.executable, "-m", "hmoe_ds.export", str(path), str(out), *(["--tag", tag] if tag else [])]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}").splitlines()
        raise ZeroShotError(f"exporting {path} failed: {lines[-1].removeprefix('error: ')}")


def _check_export(path: Path) -> None:
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if "auto_map" not in config:
        raise ZeroShotError(f"{path} is an export without its own model code (written before auto_map); "
                            "export the checkpoint again with run/export.py")


def _data_parallel_lm(model_dir: Path, batch_size: int, dtype: str, device: str | None) -> Any:
    """The harness's ``hf`` model over ``model_dir``, its requests split over the launched processes."""
    import torch
    from lm_eval.models.huggingface import HFLM

    # The harness defaults to "cuda" even where torch has none.
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        # Accelerate recognises a multi-process CPU launch (gloo) only when told it runs on CPU.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    lm = HFLM(pretrained=str(model_dir), trust_remote_code=True, batch_size=batch_size, dtype=dtype, device=device)
    accelerator = getattr(lm, "accelerator", None)
    # HFLM keeps the Accelerator of a multi-process launch but shards requests only over several GPUs; on CPU
    # (or one GPU) every process would score everything. Its evaluator shards by rank/world_size and gathers
    # with the accelerator and torch.distributed (gloo on CPU), which work on any device.
    if accelerator is not None and accelerator.num_processes > 1 and lm.world_size == 1:
        lm._rank = accelerator.process_index
        lm._world_size = accelerator.num_processes
    return lm


def _task_results(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{task: {acc, acc_stderr, acc_norm, acc_norm_stderr, examples}}`` from the harness's results."""
    out: dict[str, dict[str, Any]] = {}
    samples = results.get("n-samples", {})
    for name, metrics in results["results"].items():
        row: dict[str, Any] = {}
        for metric in METRICS:
            if f"{metric},none" in metrics:
                row[metric] = float(metrics[f"{metric},none"])
                stderr = metrics.get(f"{metric}_stderr,none")
                row[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
        if name in samples:
            row["examples"] = int(samples[name]["effective"])
        if row:
            out[name] = row
    return out


def evaluate_zero_shot(path: str | Path, *, tasks: Sequence[str] = (GROUP,), tag: str | None = None,
                       limit: int | float | None = None, batch_size: int = 16, dtype: str = "float32",
                       device: str | None = None, export_dir: str | Path | None = None,
                       log_level: str = "ERROR") -> dict[str, Any] | None:
    """Zero-shot accuracy of an export or checkpoint on harness ``tasks``; the summary on rank 0, else ``None``.

    ``limit`` caps the examples per task (a count, or a fraction below 1), as the
    harness's ``--limit``. A checkpoint is exported into ``export_dir`` (kept) or a
    temporary directory (removed). ``log_level`` is the harness's logger level (its
    per-request truncation warnings are many with a short-context model). Collective
    when launched on several processes.
    """
    logging.getLogger("lm_eval").setLevel(log_level.upper())
    manager = _task_manager(tasks)
    check_tasks(tasks, manager)  # every rank alike, so a refusal needs no collective

    import torch
    import torch.distributed as dist

    path = Path(path)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # Up before the Accelerator (which adopts it), so rank 0 can export while the others wait.
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp: Path | None = None
    finished = False
    try:
        if _is_export(path):
            model_dir, source = path, "export"
        else:
            source = "checkpoint"
            if export_dir is not None:
                model_dir = Path(export_dir)
            else:
                tmp = Path(tempfile.mkdtemp(prefix="hmoe-zero-shot-")) if rank == 0 else None
                model_dir = (tmp or Path()) / "export"
            error: str | None = None
            if rank == 0:
                try:
                    _export_checkpoint(path, tag, model_dir)
                except ZeroShotError as exc:
                    error = str(exc)
            if dist.is_initialized():
                box = [str(model_dir), error]
                dist.broadcast_object_list(box, src=0)
                model_dir, error = Path(box[0]), box[1]
            if error:
                raise ZeroShotError(error)
        _check_export(model_dir)
        lm = _data_parallel_lm(model_dir, batch_size, dtype, device)
        summary = _run_harness(lm, path, model_dir, source, list(tasks), limit, manager)
        finished = True
        return summary
    finally:
        try:
            # Every rank has loaded a temporary export before rank 0 removes it. Only a finished run
            # synchronises: after a failure a peer may never arrive (the launcher ends the others).
            if finished and dist.is_initialized():
                dist.barrier()
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def _run_harness(lm: Any, path: Path, model_dir: Path, source: str, tasks: list[str],
                 limit: int | float | None, manager: Any) -> dict[str, Any] | None:
    import lm_eval

    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, limit=limit, task_manager=manager,
                                          log_samples=False)
    except EvalDataMissing as exc:
        raise ZeroShotError(str(exc)) from None
    except KeyError as exc:
        message = str(exc.args[0]) if exc.args else ""
        if "not a registered task" not in message:  # the harness's word for a name it does not know
            raise
        raise ZeroShotError(f"{message} (shipped offline: {', '.join([GROUP, *TASK_NAMES])})") from None
    except ConnectionError as exc:  # a harness task whose dataset is not in the local Hugging Face cache
        raise ZeroShotError(
            f"{exc}: hubs are offline here; a harness task's dataset must be in the local Hugging Face datasets "
            "cache. Run the same command once with HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 where the hub is "
            "reachable (or copy that machine's $HF_HOME), then offline runs read the cache") from None
    if results is None:  # not rank 0
        return None
    return {
        "model": str(path), "source": source, "model_dir": str(model_dir) if source == "export" else None,
        "tasks": _task_results(results), "num_fewshot": 0, "limit": limit, "processes": lm.world_size,
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
    }


def format_table(summary: dict[str, Any]) -> str:
    """Per task: examples, accuracy and normalised accuracy (with standard errors)."""
    lines = [f"{'task':<36} {'n':>6} {'acc':>16} {'acc_norm':>16}"]
    for name, row in summary["tasks"].items():
        cells = []
        for metric in METRICS:
            value, err = row.get(metric), row.get(f"{metric}_stderr")
            cells.append("-" if value is None else f"{value:.4f}" + (f" ±{err:.4f}" if err is not None else ""))
        lines.append(f"{name:<36} {row.get('examples', ''):>6} {cells[0]:>16} {cells[1]:>16}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run/zero_shot.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", help="HF export dir, or run dir / its checkpoints/ / one checkpoint dir")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest complete checkpoint)")
    parser.add_argument("--tasks", default=GROUP,
                        help=f"comma-separated harness tasks or groups (default: {GROUP}, shipped and offline)")
    parser.add_argument("--limit", type=float, default=None,
                        help="examples per task: a count, or a fraction if below 1 (default: all)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: cuda if available, else cpu)")
    parser.add_argument("--export_dir", help="keep a checkpoint's export here instead of a temporary directory")
    parser.add_argument("--output", help="JSON to write (default: next to the input, zero_shot*.json)")
    parser.add_argument("--log_level", default="error", help="lm-evaluation-harness's log level (default: error)")
    parser.add_argument("--prepare_data", action="store_true",
                        help="extract the shipped tasks' data from the bigbench sdist on PyPI (once) and exit")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prepare_data:
        try:
            counts = prepare_bigbench()
        except EvalDataMissing as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 2
        print("prepared: " + ", ".join(f"{task} ({n} examples)" for task, n in counts.items()), flush=True)
        return 0
    if not args.path:
        parser.error("path is required (or --prepare_data)")
    if importlib.util.find_spec("lm_eval") is None:
        print('error: lm-evaluation-harness is not installed: pip install "hmoe-ds[eval]"', file=sys.stderr)
        return 2
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        summary = evaluate_zero_shot(args.path, tasks=tasks, tag=args.tag, limit=limit, batch_size=args.batch_size,
                                     dtype=args.dtype, device=args.device, export_dir=args.export_dir,
                                     log_level=args.log_level)
    except ZeroShotError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    if summary is not None:
        output = Path(args.output) if args.output else _default_output(Path(args.path), args.tag)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(format_table(summary), flush=True)
        print(f"wrote {output}", flush=True)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
