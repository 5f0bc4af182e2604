"""Hugging Face export and re-sharding of hmoe-ds checkpoints.

Every checkpoint holds per-rank logical shards (:mod:`hmoe_ds.shards`; format-1
checkpoints one consolidated ``hmoe_model.safetensors``): the parameter names of
``HMoEForCausalLM`` with ``ep_size=1`` and ``frontend="moe"``. Export is therefore
a file operation that needs no DeepSpeed engine, no process group and no GPU,
whatever ZeRO stage, EP size, placement, offload or front-end trained the model::

    python run/export.py outputs/my_run exported/my_run        # newest complete checkpoint
    python -m hmoe_ds.export outputs/my_run/checkpoints/step_2000 exported/step_2000

writes ``config.json`` (``moe.ep_size=1``, ``frontend="moe"``, special-token ids from
the tokenizer, ``auto_map``), ``generation_config.json``, ``model.safetensors`` (weight
names by Hugging Face's MoE convention, :func:`hmoe_ds.naming.export_key`), the run's
tokenizer files and the standalone model code (:mod:`hmoe_ds.hf`, copied verbatim), then
(by default) loads the result with that standalone model and checks its logits against the
probe logits the training engine computed at save time.

Re-sharding goes the other way: :func:`load_logical_weights` copies a logical
state dict (an export, or a checkpoint's shards) into a freshly built
model of *any* EP size, placement or front-end, through each layer's
``load_local_expert_weights``; the trainer uses it for ``run.init_from``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
import math
from typing import Any, Callable, Protocol, Sequence

import torch

from .checkpoint import (
    MARKER,
    MODEL_FILE,
    NODE_LOCAL,
    PROBE_FILE,
    TOKENIZER_DIR,
    CheckpointError,
    checkpoint_info,
    find_resume_checkpoint,
    missing_rank_files,
    node_local_fix,
    verify_checkpoint,
)
from .naming import (
    STRUCTURE_FIELDS,
    export_key,
    expert_weight_names,
    logical_dense_key,
    logical_expert_key,
    logical_key_from_export,
    moe_layers,
)
from .partitioned import write_full
from .shards import SHARD_GLOB, ShardReader

__all__ = ["WeightsSource", "export_hf", "load_logical_weights", "main", "resolve_source"]

HF_WEIGHTS = "model.safetensors"
#: A logical expert parameter that is not one of the built-in FFN's (the user's own expert modules).
USER_EXPERT_KEY = re.compile(r"\.deepspeed_experts\.\d+\.(?!w[123]\.weight$)")
EXPORT_INFO = "hmoe_export.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


@dataclass
class WeightsSource:
    """Logical weights on disk: an HF export or one complete hmoe-ds checkpoint."""

    kind: str  # "hf" or "checkpoint"
    path: Path  # the HF dir or the checkpoint tag dir
    weights: Path  # a safetensors file with logical parameter names, or the tag dir holding logical shards
    config: dict[str, Any]  # HMoEConfig fields of the logical model
    tokenizer_dir: Path | None
    probe: Path | None
    marker: dict[str, Any] | None = None

    def describe(self) -> str:
        step = f" (step {self.marker['step']})" if self.marker else ""
        return f"{'HF export' if self.kind == 'hf' else 'checkpoint'} {self.path}{step}"

    def open(self) -> "LogicalWeights":
        """A streaming reader of the logical tensors (one tensor in memory at a time)."""
        try:
            return ShardReader(self.weights) if self.weights.is_dir() else FileWeights(self.weights)
        except Exception as exc:  # OS errors, bad indexes, and safetensors' own errors for truncated files
            raise CheckpointError(f"{self.weights}: unreadable weights ({exc})") from None


class LogicalWeights(Protocol):
    """Logical tensors by name, read one at a time (:class:`FileWeights`, :class:`~hmoe_ds.shards.ShardReader`)."""

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def get(self, name: str, state: str | None = None) -> torch.Tensor: ...


class FileWeights:
    """One safetensors file read by logical names: an HF export, or a format-1 checkpoint's consolidated model.

    Exports name tensors by Hugging Face's MoE convention (or, before it, by
    the logical names); :func:`hmoe_ds.naming.logical_key_from_export` maps
    either to the logical names.
    """

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self._handle = safe_open(str(path), framework="pt")
        self._stored = {logical_key_from_export(key): key for key in self._handle.keys()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(self._handle.get_slice(key).get_shape()) for name, key in self._stored.items()}

    def get(self, name: str, state: str | None = None) -> torch.Tensor:
        if state is not None:
            raise KeyError(f"{self.path} holds weights only, no optimizer state {state!r}")
        return self._handle.get_tensor(self._stored[name])


def _from_tag_dir(tag_dir: Path) -> WeightsSource:
    marker = verify_checkpoint(tag_dir)
    weights = tag_dir / MODEL_FILE if (tag_dir / MODEL_FILE).is_file() else tag_dir  # format 1, else shards
    if "logical_config" not in marker or (weights == tag_dir and not any(tag_dir.glob(SHARD_GLOB))):
        raise CheckpointError(f"{tag_dir}: neither logical shards ({SHARD_GLOB}) nor {MODEL_FILE}; the checkpoint "
                              "was written by an older hmoe-ds. Resume it for one save_every interval to write one")
    storage = marker.get("storage") or {}
    if storage.get("mode") == NODE_LOCAL and weights == tag_dir:
        # One node's part of a node-local checkpoint: the other ranks' shards are on the other nodes.
        missing = missing_rank_files(tag_dir, int(marker["world_size"]))
        if missing:
            raise CheckpointError(
                f"{tag_dir}: saved with checkpoint.use_node_local_storage, and this directory holds node "
                f"{storage.get('node')}'s part only (the files of ranks {storage.get('ranks')}; those of ranks "
                f"{missing} are on the other nodes). Export and evaluation read every rank's shard: "
                + node_local_fix(tag_dir.name))
    run_dir = tag_dir.parent.parent
    tokenizer = next((d for d in (tag_dir / TOKENIZER_DIR, run_dir / TOKENIZER_DIR) if (d / "tokenizer.json").is_file()),
                     None)
    probe = tag_dir / PROBE_FILE
    return WeightsSource("checkpoint", tag_dir, weights, marker["logical_config"], tokenizer,
                         probe if probe.is_file() else None, marker)


def resolve_source(path: str | Path, tag: str | None = None) -> WeightsSource:
    """Accept an HF export dir, a checkpoint tag dir, a run's ``checkpoints/`` dir or a run dir.

    For a run (or its checkpoints dir) the newest complete checkpoint is used,
    or ``tag``. Anything else is a :class:`CheckpointError` naming what is missing.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a run dir, a checkpoint dir or an HF export dir")
    if (path / "config.json").is_file() and not (path / MARKER).is_file():
        if not (path / HF_WEIGHTS).is_file():
            raise CheckpointError(f"{path}: has config.json but no {HF_WEIGHTS}; only single-file safetensors "
                                  "exports (as written by run/export.py) are supported")
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path / 'config.json'}: unreadable ({exc})") from None
        if not isinstance(config, dict) or config.get("model_type") != "hmoe":
            found = config.get("model_type") if isinstance(config, dict) else None
            raise CheckpointError(f"{path}: config.json has model_type {found!r}, not 'hmoe'")
        tokenizer = path if (path / "tokenizer.json").is_file() else None
        return WeightsSource("hf", path, path / HF_WEIGHTS, config, tokenizer, None)
    if (path / MARKER).is_file() or any(path.glob("*_model_states.pt")):
        if tag is not None and tag != path.name:
            raise CheckpointError(f"{path}: is checkpoint {path.name!r}; --tag {tag!r} names another one")
        return _from_tag_dir(path)
    checkpoints = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if tag is not None:
        return _from_tag_dir(checkpoint_info(checkpoints, tag).path)
    info, notes = find_resume_checkpoint(checkpoints)
    if info is None:
        why = f" ({'; '.join(notes)})" if notes else ""
        raise CheckpointError(f"{path}: neither an HF export (config.json + {HF_WEIGHTS}) nor a run or checkpoint "
                              f"directory with a complete hmoe-ds checkpoint{why}")
    return _from_tag_dir(info.path)


def check_structure(source: WeightsSource, model_config: Any) -> None:
    """Every logical parameter of ``model_config`` present in ``source`` with its shape, nothing extra.

    The message names the config fields that differ (expert sizes, vocab, ...)
    and a few of the parameters, so the user knows what to change.
    """
    from .modeling import logical_parameter_shapes  # lazily: it imports DeepSpeed (configure_environment first)

    expected = logical_parameter_shapes(model_config)
    found = source.open().shapes()
    user = sorted(k for k in found if USER_EXPERT_KEY.search(k))
    if user:
        raise CheckpointError(
            f"{source.describe()} holds the user's own expert modules (e.g. {user[0]}): the Hugging Face model "
            "(HMoEForCausalLM, its config and its standalone modeling_hmoe.py) has HMoE's built-in FFN experts "
            "(w1/w2/w3) only, so it cannot represent them. Read them by their own names with "
            "hmoe_ds.shards.ShardReader(<checkpoint dir>) (logical names <layer>.deepspeed_moe.experts."
            "deepspeed_experts.<expert id>.<your parameter name>), or restore them with load_sharded_state")
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if not (missing or extra or wrong):
        return
    now = model_config.to_dict()
    saved = source.config
    fields = [f"{n}: source {saved.get(n)!r}, this model {now.get(n)!r}" for n in STRUCTURE_FIELDS
              if n in saved and saved.get(n) != now.get(n)]
    saved_moe, now_moe = saved.get("moe") or {}, now.get("moe") or {}
    fields += [f"moe.{n}: source {saved_moe.get(n)!r}, this model {now_moe.get(n)!r}" for n in
               ("expert_sizes", "activation") if saved_moe.get(n) != now_moe.get(n)]
    details = []
    if missing:
        details.append(f"missing {len(missing)} parameter(s), e.g. {', '.join(missing[:3])}")
    if extra:
        details.append(f"{len(extra)} unexpected, e.g. {', '.join(extra[:3])}")
    if wrong:
        details.append("wrong shape: " + ", ".join(f"{k} {found[k]} (model {expected[k]})" for k in wrong[:3]))
    raise CheckpointError(f"{source.describe()} does not fit this model: "
                          + "; ".join(fields + details)
                          + ". Use a model config with the same structure (only ep_size, placement and the ZeRO "
                            "front-end may differ)")


@torch.no_grad()
def load_logical_weights(model: torch.nn.Module, source: WeightsSource) -> None:
    """Copy logical weights into ``model`` (an ``HMoEForCausalLM`` of any EP size/placement/front-end).

    Call it on every rank before ``deepspeed.initialize`` (ZeRO copies the
    module's weights into its optimizer partitions there). Each rank reads the
    dense parameters and only its own experts from the file. All-or-nothing:
    the structure is checked first (:func:`check_structure`), so a mismatch
    never leaves a half-loaded model.
    """
    check_structure(source, model.config)
    reader = source.open()
    layers = moe_layers(model)
    prefixes = [name for _, name, _ in layers]
    expert_ids = {id(p) for _, _, layer in layers for p in layer.moe_core.experts.parameters()}
    for name, param in model.named_parameters():
        if id(param) not in expert_ids:
            write_full(param, reader.get(logical_dense_key(name, prefixes)))
    for _, prefix, layer in layers:  # one layer's local experts in memory at a time
        weights = {e: {w: reader.get(logical_expert_key(prefix, e, w)) for w in expert_weight_names(layer)}
                   for e in layer.moe_core.local_expert_ids}
        layer.moe_core.load_local_expert_weights(weights)


def write_safetensors_streaming(path: Path, names: Sequence[str], shapes: dict[str, tuple[int, ...]],
                                get: Callable[[str], torch.Tensor], metadata: dict[str, str]) -> None:
    """Write an fp32 safetensors file one tensor at a time (peak memory: the largest tensor).

    The format is a little-endian u64 header length, a JSON header with each
    tensor's dtype, shape and byte range, then the raw bytes in header order,
    so the header can be written from the shapes before any tensor is read.
    """
    import struct

    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in names:
        nbytes = 4 * math.prod(shapes[name])
        header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for name in names:
            tensor = get(name).to(torch.float32).contiguous()
            if tuple(tensor.shape) != tuple(shapes[name]):
                raise CheckpointError(f"{name}: read shape {tuple(tensor.shape)}, expected {shapes[name]}")
            handle.write(tensor.numpy().tobytes())
            del tensor


# --------------------------------------------------------------------------- HF export


def _probe_check(model_dir: Path, probe: Path, dtype: str) -> float:
    """Max |logits(export) - logits(training engine)| on the probe sequence; raises if above tolerance.

    The export is loaded with the standalone model a user without hmoe-ds runs: the
    export's ``modeling_hmoe.py`` is :mod:`hmoe_ds.hf.modeling_hmoe`, copied byte for byte,
    so its class is used directly (``trust_remote_code`` would copy the file into the
    user's Hugging Face modules cache once per export; ``AutoModelForCausalLM`` would pick
    hmoe-ds's own class, since transformers prefers a class registered in the process).
    """
    from safetensors.torch import load_file
    from transformers.utils import logging as hf_logging

    from .hf.modeling_hmoe import HMoEForCausalLM

    saved = load_file(str(probe))
    hf_logging.disable_progress_bar()  # a one-line CLI result, not a loading bar per export
    model = HMoEForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=saved["input_ids"]).logits.float()
    diff = float((logits - saved["logits"]).abs().max())
    # fp32: same weights, same math; only the summation order of expert-parallel grouping differs (~1e-6).
    # bf16/fp16: the engine computed in low precision, this check in fp32 from the same (upcast) weights.
    tolerance = 1e-4 * max(1.0, float(saved["logits"].abs().max())) if dtype == "fp32" else 0.25
    if not diff <= tolerance:
        raise CheckpointError(f"{model_dir}: exported model's logits differ from the training engine's by {diff:.3g} "
                              f"(tolerance {tolerance:.3g}) on the probe sequence; the export is wrong, please report it")
    return diff


def special_token_ids(tokenizer_dir: Path | None) -> dict[str, int | None]:
    """``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` of the tokenizer in ``tokenizer_dir`` (all None without one).

    Taken from the tokenizer itself, never from constants: the trainer appends
    the tokenizer's eos after every document, so that is the id ``generate``
    must stop at (``<|endoftext|>``, id 0, for hmoe-ds's default tokenizer).
    """
    if tokenizer_dir is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}


def export_hf(source: str | Path, out_dir: str | Path, *, tag: str | None = None, overwrite: bool = False,
              verify: bool = True) -> dict[str, Any]:
    """Write an HF model directory from a checkpoint; returns a summary (source, step, probe difference).

    The directory appears complete or not at all (built next to ``out_dir``,
    then renamed), and an existing non-empty ``out_dir`` is refused unless
    ``overwrite``.
    """
    from .modeling import HMoEConfig

    src = resolve_source(source, tag)
    if src.kind == "hf":
        raise CheckpointError(f"{src.path}: already an HF export; copy the directory instead")
    out = Path(out_dir)
    # Replacing out (--force) must never delete what is read: the checkpoint, or the run holding it.
    in_run = src.kind == "checkpoint" and src.path.parent.name == "checkpoints"
    protected = (src.path.parent.parent if in_run else src.path).resolve()
    if out.resolve() == protected or out.resolve() in protected.parents:
        raise CheckpointError(f"{out}: is or contains the source {protected}; choose another output directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out}: exists and is not empty; choose another directory or pass --force")
    config = HMoEConfig.from_dict(src.config)
    if config.moe["ep_size"] != 1 or config.moe["frontend"] != "moe":
        raise CheckpointError(f"{src.path}: recorded logical config is not ep_size=1/frontend='moe'")
    check_structure(src, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        from transformers import GenerationConfig

        from .hf import AUTO_MAP, source_files

        token_ids = special_token_ids(src.tokenizer_dir)
        for name, value in token_ids.items():
            setattr(config, name, value)
        # The standalone model files travel with the weights; auto_map tells trust_remote_code where they are.
        config.auto_map = dict(AUTO_MAP)
        config.save_pretrained(str(tmp))
        GenerationConfig(**token_ids).save_pretrained(str(tmp))
        for path in source_files():
            shutil.copyfile(path, tmp / path.name)
        reader = src.open()
        from .modeling import logical_parameter_shapes

        logical = logical_parameter_shapes(config)  # the logical model's names, in its order
        logical_name = {export_key(name): name for name in logical}
        nonfinite: list[str] = []

        def checked(name: str) -> torch.Tensor:
            tensor = reader.get(logical_name[name])
            if not bool(torch.isfinite(tensor).all()):
                nonfinite.append(logical_name[name])  # the checkpoint's name: the error is about the checkpoint
            return tensor

        shapes = {name: logical[logical_name[name]] for name in logical_name}
        write_safetensors_streaming(tmp / HF_WEIGHTS, list(shapes), shapes, checked, {"format": "pt"})
        if nonfinite:  # not an export bug: the checkpoint's weights themselves are NaN/Inf
            raise CheckpointError(
                f"{src.path}: the model's weights hold NaN/Inf ({len(nonfinite)} tensors, e.g. "
                f"{', '.join(nonfinite[:3])}): the checkpoint was saved from a run that had diverged. Export an "
                "earlier checkpoint (--tag step_N)")
        if src.tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (src.tokenizer_dir / name).is_file():
                    shutil.copyfile(src.tokenizer_dir / name, tmp / name)
        marker = src.marker or {}
        summary: dict[str, Any] = {"source": str(src.path), "step": marker.get("step"),
                                   "trained_with": {k: marker.get(k) for k in ("world_size", "zero_stage", "dtype")},
                                   "moe_layers": marker.get("moe_layers"), "versions": marker.get("versions"),
                                   "tokenizer": src.tokenizer_dir is not None, "probe_max_abs_diff": None}
        if verify and src.probe is not None:
            summary["probe_max_abs_diff"] = _probe_check(tmp, src.probe, str(marker.get("dtype", "fp32")))
        (tmp / EXPORT_INFO).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hmoe_ds.export",
        description="Export an hmoe-ds checkpoint (any ZeRO stage / EP size) as a Hugging Face model directory.")
    parser.add_argument("source", help="run dir, its checkpoints/ dir, or one checkpoint dir (checkpoints/step_N)")
    parser.add_argument("out_dir", help="directory to write (config.json, model.safetensors, tokenizer files)")
    parser.add_argument("-t", "--tag", help="checkpoint tag, e.g. step_2000 (default: the newest complete checkpoint)")
    parser.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip loading the export and comparing its logits with the training engine's")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = export_hf(args.source, args.out_dir, tag=args.tag, overwrite=args.force, verify=args.verify)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    diff = summary["probe_max_abs_diff"]
    check = f"logits match the training engine (max abs diff {diff:.2e})" if diff is not None else "not verified"
    print(f"exported {summary['source']} (step {summary['step']}) to {args.out_dir}: {check}\n"
          f"load with: AutoModelForCausalLM.from_pretrained({str(args.out_dir)!r}, trust_remote_code=True)",
          flush=True)
    return 0


if __name__ == "__main__":
    from .env import configure_environment

    configure_environment()
    sys.exit(main())
