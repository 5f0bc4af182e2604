"""Experiment YAML: schema, validation and the cross-checks against the DeepSpeed JSON.

An experiment is one YAML file with three sections::

    model:  HMoEConfig fields (``vocab_size: auto`` = the tokenizer's size), ``moe:`` HMoELayerConfig fields
    data:   DataConfig fields
    run:    RunConfig fields below (output_dir, train_steps, log_every, ...)

Everything about *how* to optimise (batch sizes, accumulation, precision,
optimizer, scheduler, ZeRO, clipping, TensorBoard) lives in the plain DeepSpeed
JSON; this module never duplicates it, it only cross-checks it
(:func:`load_ds_config`, :func:`effective_ds_config`). Every mistake is an
:class:`ExperimentError` whose message names the file, the key and the fix;
``run/train.py`` prints it once (rank 0) and exits non-zero without a traceback.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import inspect
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from hmoe_ds.errors import ExperimentError  # re-exported: the old import path keeps working

__all__ = [
    "Experiment",
    "ExperimentError",
    "RunConfig",
    "check_required",
    "effective_ds_config",
    "load_ds_config",
    "load_experiment",
    "node_local_checkpoints",
    "resolve_batch_sizes",
    "tensorboard_dir",
    "zero_stage",
]

SECTIONS = ("model", "data", "run")


#: ``run.per_expert_metrics: auto`` writes per-expert TensorBoard tags for layers with at most this many experts.
PER_EXPERT_AUTO_LIMIT = 16
#: The values ``run.per_expert_metrics`` accepts (:func:`hmoe_ds.training.metrics.layer_tags`).
PER_EXPERT_CHOICES = ("auto", "always", "never")


@dataclass
class RunConfig:
    """The ``run:`` section: what the loop does, not how it optimises.

    Attributes:
        output_dir: where the run lives (checkpoints/, tensorboard/, metrics.jsonl,
            experiment.yaml, ds_config.json). Required (as are ``model.hidden_size``,
            ``model.num_hidden_layers`` and ``model.moe.expert_sizes``).
        run_name: TensorBoard job name; default the YAML file's stem.
        train_steps: optimizer steps (one step = one global batch of
            ``train_batch_size`` sequences, after gradient accumulation).
        log_every: optimizer steps between TensorBoard/metrics.jsonl points.
        eval_every: optimizer steps between validations; 0 = only at the end.
        eval_batches: validation micro-batches per rank per evaluation.
        eval_at_start: also evaluate before the first step (the step-0 baseline).
        save_every: optimizer steps between checkpoints; 0 = only at the end.
        seed: seeds torch/numpy/random and the data order.
        progress_bar: tqdm bar on rank 0.
        init_from: start from these weights instead of a random initialisation: an HF
            export (``run/export.py``), a checkpoint dir or a run dir (its newest complete
            checkpoint). The EP size, placement and ZeRO stage may differ from the run that
            produced them (re-sharding); the model structure must not. Ignored when
            ``--resume`` finds a checkpoint of this run.
        save_on_signal: on SIGTERM to a rank, or when the ``deepspeed`` runner exits
            (SIGINT/SIGTERM to it alone), every rank stops after the same step and,
            when true, saves a checkpoint there first (preemptible clusters).
        on_nonfinite: a NaN/Inf training loss or gradient norm: ``stop`` the run at that
            step (nothing saved, ``latest`` unchanged) or ``skip`` the step and go on,
            counted as ``train/skipped_nonfinite_steps``.
        per_expert_metrics: write each expert's token fraction as its own TensorBoard tag
            (``moe/layer_<i>/expert_<e>_token_fraction``, and the Custom Scalars chart of
            them): ``auto`` for layers of at most :data:`PER_EXPERT_AUTO_LIMIT` (16) experts,
            ``always``, or ``never``. The
            per-layer spread statistics and histogram are written either way.
    """

    output_dir: str | None = None
    run_name: str | None = None
    train_steps: int = 1000
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    eval_at_start: bool = True
    save_every: int = 0
    seed: int = 1234
    progress_bar: bool = True
    init_from: str | None = None
    save_on_signal: bool = True
    on_nonfinite: str = "stop"
    per_expert_metrics: str = "auto"

    def validate(self) -> None:
        """Raise ``ValueError("<field>=<value>: <why>")`` for an out-of-range value."""
        for name in ("train_steps", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be an int >= 1")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be an int >= 0 (0 = only at the end)")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed!r}: must be an int >= 0")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite={self.on_nonfinite!r}: allowed values are 'stop' (default: end the run "
                             "at a non-finite loss or gradient norm) and 'skip' (drop such steps)")
        if self.per_expert_metrics not in PER_EXPERT_CHOICES:
            raise ValueError(f"per_expert_metrics={self.per_expert_metrics!r}: allowed values are 'auto' (default: "
                             f"per-expert tags for layers of at most {PER_EXPERT_AUTO_LIMIT} experts), 'always' "
                             "and 'never'")
        for name in ("output_dir", "run_name", "init_from"):
            if getattr(self, name) is not None and not str(getattr(self, name)).strip():
                raise ValueError(f"{name}: must not be empty")


@dataclass
class Experiment:
    """A validated experiment. ``model``/``data`` are plain dicts of constructor kwargs.

    ``model['vocab_size']`` may still be ``"auto"``; :meth:`model_config` resolves it.
    """

    model: dict[str, Any]
    data: dict[str, Any]
    run: RunConfig
    source: str = "<experiment>"

    @property
    def output_dir(self) -> Path:
        assert self.run.output_dir is not None  # filled by load_experiment
        return Path(self.run.output_dir)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able form; this is what ``<output_dir>/experiment.yaml`` holds."""
        return {
            "model": _plain(self.model),
            "data": _plain(self.data),
            "run": _plain(dataclasses.asdict(self.run)),
        }

    def data_config(self) -> Any:
        from hmoe_ds.data import DataConfig

        return DataConfig(**copy.deepcopy(self.data))

    def model_config(self, tokenizer_vocab_size: int | None = None) -> Any:
        """``HMoEConfig`` with ``vocab_size: auto`` replaced by the tokenizer's size."""
        from hmoe_ds.model_config import HMoEConfig

        kwargs = _resolve_expert_sizes(copy.deepcopy(self.model))
        if kwargs.get("vocab_size", "auto") == "auto":
            if tokenizer_vocab_size is None:
                raise ExperimentError(f"{self.source}: model.vocab_size is 'auto' but no tokenizer is known yet")
            kwargs["vocab_size"] = int(tokenizer_vocab_size)
        elif tokenizer_vocab_size is not None and kwargs["vocab_size"] < tokenizer_vocab_size:
            raise ExperimentError(
                f"{self.source}: model.vocab_size={kwargs['vocab_size']} is smaller than the tokenizer's "
                f"vocabulary ({tokenizer_vocab_size}); set model.vocab_size: auto (or >= {tokenizer_vocab_size})"
            )
        return HMoEConfig(**kwargs)


# --------------------------------------------------------------------------- YAML reading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _FileProblem(Exception):
    """What a parser found wrong in a config file, and where (1-based line and column, when known)."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.message, self.line, self.column = message, line, column


def _read_config_file(path: Path, what: str, parse: Callable[[str], Any]) -> Any:
    """Read ``path`` and ``parse`` its text; an unreadable file or a :class:`_FileProblem` is one ExperimentError.

    The YAML and the JSON loader share this, so both report ``<file>:<line>:<col>: ...``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ExperimentError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        return parse(text)
    except _FileProblem as exc:
        where = f"{path}:{exc.line}:{exc.column}" if exc.line is not None else str(path)
        raise ExperimentError(f"{where}: {exc.message}") from None


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{context}; {problem}" if context else problem
        raise _FileProblem(f"YAML syntax error: {detail}. Fix the file at that line.",
                           *((mark.line + 1, mark.column + 1) if mark is not None else ())) from None


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file; syntax errors become ``<file>:<line>:<col>: ...`` messages."""
    return _read_config_file(Path(path), "experiment file", _parse_yaml)


# --------------------------------------------------------------------------- overrides


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> set[str]:
    """Apply ``key.sub=value`` strings in place (value parsed as YAML); return the keys set.

    Only the container shape is checked here; unknown keys are reported by
    :func:`check_schema` like any other key, marked as coming from ``--set``.
    """
    keys: set[str] = set()
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ExperimentError(f"--set {item!r}: expected key.sub=value, e.g. --set run.train_steps=200")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text  # an unparsable value is taken as the literal string and type-checked later
        parts = key.split(".")
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node, dict):
                raise ExperimentError(f"--set {key}: {'.'.join(parts[:depth])} is not a section")
            node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ExperimentError(f"--set {key}: {'.'.join(parts[:-1])} is not a section")
        node[parts[-1]] = value
        keys.add(key)
    return keys


# --------------------------------------------------------------------------- schema checks


def _type_ok(value: Any, annotation: Any) -> bool:
    """A small structural type check for config values (YAML scalars, lists, dicts)."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, (str, annotation))  # the class names the allowed values itself
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        inner = [a for a in args if a is not Ellipsis]
        return len(inner) != 1 or all(_type_ok(v, inner[0]) for v in value)
    if origin in (dict, typing.Mapping) or annotation is dict:
        return isinstance(value, dict)
    return True  # anything more exotic is left to the class's own validation


# Keys people put in the experiment that belong to the DeepSpeed JSON.
_DEEPSPEED_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "micro_batch_size",
    "batch_size", "optimizer", "scheduler", "lr", "learning_rate", "weight_decay", "warmup_steps", "fp16", "bf16",
    "precision", "zero_optimization", "zero_stage", "gradient_clipping", "grad_clip", "tensorboard",
}


def _unknown(where: str, key: str, allowed: list[str], from_set: bool) -> ExperimentError:
    dotted = f"{where}.{key}" if where else key
    origin = " (from --set)" if from_set else ""
    if key in _DEEPSPEED_KEYS:
        return ExperimentError(
            f"{dotted}: unknown key{origin}; batch sizes, optimizer, schedule, precision, ZeRO and clipping are set "
            "in the DeepSpeed JSON (--deepspeed_config), not in the experiment YAML"
        )
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ExperimentError(f"{dotted}: unknown key{origin}{hint}; allowed: {', '.join(sorted(allowed))}")


def check_schema(
    values: Mapping[str, Any],
    schema: Mapping[str, Any],
    where: str,
    source: str,
    overridden: set[str] = frozenset(),  # type: ignore[assignment]
) -> None:
    """Check keys and value types of one section against ``{name: annotation}``."""
    for key, value in values.items():
        dotted = f"{where}.{key}"
        if key not in schema:
            raise ExperimentError(f"{source}: " + str(_unknown(where, str(key), list(schema), dotted in overridden)))
        if not _type_ok(value, schema[key]):
            origin = " (from --set)" if dotted in overridden else ""
            raise ExperimentError(
                f"{source}: {dotted}={value!r}{origin}: expected {getattr(schema[key], '__name__', None) or schema[key]}, got {type(value).__name__}"
            )


def dataclass_schema(cls: type) -> dict[str, Any]:
    """``{field: annotation}`` of a dataclass, with string annotations resolved."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _own_type_hints(cls: type) -> dict[str, Any]:
    """``{name: type}`` of the annotations ``cls`` declares itself, resolved in its module; ``Any`` where unresolvable.

    ``typing.get_type_hints(cls)`` would also resolve every base class's
    annotations, and fails on ``PretrainedConfig``'s (names imported only for
    type checkers). Each of ``cls``'s own annotations is resolved alone, so one
    that cannot be does not hide the others; the class validates such a value
    itself.
    """
    hints: dict[str, Any] = {}
    for key, annotation in cls.__dict__.get("__annotations__", {}).items():
        holder = type(cls.__name__, (), {"__annotations__": {key: annotation}, "__module__": cls.__module__})
        try:
            hints[key] = typing.get_type_hints(holder)[key]
        except Exception:  # noqa: BLE001 - NameError, TypeError, SyntaxError of a string annotation
            hints[key] = Any
    return hints


def model_schema() -> dict[str, Any]:
    """The keys ``model:`` accepts: the fields HMoEConfig declares itself (not every PretrainedConfig knob)."""
    # The fields are declared once, by the standalone config the training HMoEConfig subclasses.
    from hmoe_ds.hf.configuration_hmoe import HMoEConfig

    schema = {key: hint for key, hint in _own_type_hints(HMoEConfig).items() if not key.startswith("_")}
    schema["vocab_size"] = Any  # int or "auto", checked below
    schema["moe"] = dict
    return schema


def model_default(name: str) -> Any:
    """Default of an HMoEConfig field (e.g. max_position_embeddings when the YAML omits it)."""
    from hmoe_ds.model_config import HMoEConfig

    f = getattr(HMoEConfig, "__dataclass_fields__", {}).get(name)
    if f is not None and f.default is not dataclasses.MISSING:
        return f.default
    return getattr(HMoEConfig, name, None)


def _plain(value: Any) -> Any:
    """Enums -> strings, tuples -> lists, recursively (so the saved YAML is plain)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _resolve_expert_sizes(model: dict[str, Any]) -> dict[str, Any]:
    """Copy of ``model`` with ``moe.expert_sizes`` given as a size spec (a mapping) solved into a list."""
    from hmoe_ds.sizes import parse_expert_sizes

    model = copy.deepcopy(model)
    moe = model.get("moe")
    if isinstance(moe, dict) and isinstance(moe.get("expert_sizes"), dict):
        moe["expert_sizes"] = parse_expert_sizes(moe["expert_sizes"])
    return model


def _validate_model(model: dict[str, Any], source: str, overridden: set[str]) -> None:
    from hmoe_ds.config import HMoELayerConfig
    from hmoe_ds.model_config import HMoEConfig

    check_schema(model, model_schema(), "model", source, overridden)
    vocab = model.get("vocab_size", "auto")
    if vocab != "auto" and (isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1):
        raise ExperimentError(f"{source}: model.vocab_size={vocab!r}: must be 'auto' (the tokenizer's size) or an int")
    moe = model.get("moe")
    if moe is not None:
        check_schema(moe, dataclass_schema(HMoELayerConfig) | {"expert_sizes": Any}, "model.moe", source, overridden)
        try:
            HMoELayerConfig.from_dict(_resolve_expert_sizes(model)["moe"])
        except (ValueError, TypeError) as exc:
            raise ExperimentError(f"{source}: model.moe: {exc}") from None
    trial = _resolve_expert_sizes(model)
    if trial.get("vocab_size", "auto") == "auto":
        trial["vocab_size"] = 1 << 15  # any valid size: the real one comes from the tokenizer
    try:
        HMoEConfig(**trial)
    except (ValueError, TypeError, AssertionError) as exc:
        raise ExperimentError(f"{source}: model: {exc}") from None


def _validate_data(data: dict[str, Any], source: str, overridden: set[str]) -> None:
    from hmoe_ds.data import DataConfig

    check_schema(data, dataclass_schema(DataConfig), "data", source, overridden)
    try:
        DataConfig(**data).validate()  # cheap: paths and ranges, no tokenisation
    except (ValueError, TypeError, OSError) as exc:
        message = str(exc).replace("DataConfig.", "data.")
        raise ExperimentError(f"{source}: {message if 'data.' in message else 'data: ' + message}") from None


#: What an experiment must state itself: without them, an empty or near-empty file would silently train the
#: 0.4B-parameter defaults for hours into a directory the user never chose.
REQUIRED_KEYS = ("model.hidden_size", "model.num_hidden_layers", "model.moe.expert_sizes", "run.output_dir")


def check_required(exp: Experiment) -> None:
    """A training run's experiment names its model and its output directory (in the file or by ``--set``).

    Checked by the trainer and ``hmoe_ds.launch`` (``plan_run``), not by
    :func:`load_experiment` itself: readers that only need the data or model
    sections (evaluation, the paper comparison's data preparation) need no
    output directory.
    """
    moe = exp.model.get("moe") or {}
    present = {"model.hidden_size": "hidden_size" in exp.model,
               "model.num_hidden_layers": "num_hidden_layers" in exp.model,
               "model.moe.expert_sizes": isinstance(moe, dict) and "expert_sizes" in moe,
               "run.output_dir": exp.run.output_dir is not None}
    missing = [key for key in REQUIRED_KEYS if not present[key]]
    if missing:
        raise ExperimentError(
            f"{exp.source}: the experiment must name the model and where the run goes; missing: "
            f"{', '.join(missing)}. Add them to the file (run/configs/quickstart.yaml is a complete example) or "
            f"pass them with --set, e.g. --set {missing[0]}=..."
        )


def experiment_from_dict(
    raw: Any, source: str, overridden: set[str] = frozenset(), default_name: str = "run"  # type: ignore[assignment]
) -> Experiment:
    """Validate a parsed YAML document (plus applied overrides) into an :class:`Experiment`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ExperimentError(f"{source}: the top level must be a mapping with sections {', '.join(SECTIONS)}")
    for key in raw:
        if key not in SECTIONS:
            raise ExperimentError(f"{source}: " + str(_unknown("", str(key), list(SECTIONS), key in overridden)))
    for key in SECTIONS:
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ExperimentError(f"{source}: {key}: must be a mapping of {key} settings, got {raw[key]!r}")
    model = dict(raw.get("model") or {})
    data = dict(raw.get("data") or {})
    run_raw = dict(raw.get("run") or {})
    check_schema(run_raw, dataclass_schema(RunConfig), "run", source, overridden)
    run = RunConfig(**run_raw)
    try:
        run.validate()
    except ValueError as exc:
        raise ExperimentError(f"{source}: run.{exc}") from None
    run.run_name = run.run_name or default_name
    _validate_model(model, source, overridden)
    _validate_data(data, source, overridden)
    model.setdefault("vocab_size", "auto")
    return Experiment(model=model, data=data, run=run, source=source)


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read, override (``--set``) and validate an experiment YAML."""
    path = Path(path)
    raw = load_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: the top level must be a mapping with sections {', '.join(SECTIONS)}")
    overridden = apply_overrides(raw, overrides or [])
    return experiment_from_dict(raw, str(path), overridden, default_name=path.stem)


# --------------------------------------------------------------------------- DeepSpeed JSON

ZERO_STAGES_SUPPORTED = (0, 1, 2, 3)
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"duplicate key(s) {dupes}")
    return dict(pairs)


def _parse_json(text: str) -> Any:
    import json

    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise _FileProblem(f"JSON syntax error: {exc.msg}. Fix the file at that line (plain JSON: no comments, no "
                           "trailing commas).", exc.lineno, exc.colno) from None
    except ValueError as exc:  # _no_duplicates
        raise _FileProblem(f"{exc}; keep one of each") from None


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON; syntax errors become ``<file>:<line>:<col>: ...`` messages."""
    path = Path(path)
    config = _read_config_file(path, "DeepSpeed config", _parse_json)
    if not isinstance(config, dict):
        raise ExperimentError(f"{path}: the top level must be a JSON object")
    return config


#: ``zero_optimization`` keys whose ``"auto"`` is filled from the model's hidden size d, with the values the
#: Hugging Face Trainer's DeepSpeed integration uses, so a JSON written for it means the same here.
#: DeepSpeed's own defaults are fixed element counts (reduce bucket 5e8, prefetch 5e7, persistence
#: 1e5) whatever the model: the reduce bucket alone is then a ~0.9 GB fp32 buffer on every rank for a
#: 200M-parameter model (its gradients fill it), which does not shrink as ranks are added.
HIDDEN_SIZE_AUTO: dict[str, Callable[[int], int]] = {
    "reduce_bucket_size": lambda d: d * d,
    "stage3_prefetch_bucket_size": lambda d: int(0.9 * d * d),
    "stage3_param_persistence_threshold": lambda d: 10 * d,
}


#: ``zero_optimization`` keys whose ``"auto"`` hmoe-ds fills from the model's layers (the HF Trainer leaves
#: them at DeepSpeed's 1e9-element defaults). ``stage3_max_reuse_distance``: keep a gathered parameter
#: only when the trace uses it again within d² elements; DeepSpeed's 1e9 keeps every parameter of a
#: smaller model gathered from its forward to its backward, so each rank holds the whole model.
#: ``stage3_max_live_parameters``: twice the largest layer a rank gathers
#: (:func:`hmoe_ds.model_config.largest_layer_params_per_rank`), the layer running and the one prefetched;
#: the prefetcher stops there. Without that bound DeepSpeed's prefetcher marks every gathered parameter
#: that its look-ahead passes in the backward part of the trace as "used soon" and keeps it, which at
#: the forward/backward turn held 5 of 12 layers of the memory benchmark's model on each rank.
MODEL_AUTO: dict[str, Callable[[int, int], int]] = {
    "stage3_max_live_parameters": lambda largest_layer, d: 2 * largest_layer,
    "stage3_max_reuse_distance": lambda largest_layer, d: d * d,
}


def fill_model_autos(ds: dict[str, Any], model_config: Any) -> list[str]:
    """Replace ``"auto"`` in :data:`MODEL_AUTO`'s keys of ``ds["zero_optimization"]`` in place; the keys filled.

    ``model_config`` is the run's ``HMoEConfig`` (its vocabulary size does not matter here).
    """
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict) or not any(zero.get(key) == "auto" for key in MODEL_AUTO):
        return []
    from hmoe_ds.model_config import largest_layer_params_per_rank

    largest, d = largest_layer_params_per_rank(model_config), int(model_config.hidden_size)
    filled = []
    for key, rule in MODEL_AUTO.items():
        if zero.get(key) == "auto":
            zero[key] = int(rule(largest, d))
            filled.append(key)
    return filled


def fill_hidden_size_autos(ds: dict[str, Any], hidden_size: int) -> list[str]:
    """Replace ``"auto"`` in :data:`HIDDEN_SIZE_AUTO`'s keys of ``ds["zero_optimization"]`` in place; the keys filled."""
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        return []
    filled = []
    for key, rule in HIDDEN_SIZE_AUTO.items():
        if zero.get(key) == "auto":
            zero[key] = rule(int(hidden_size))
            filled.append(key)
    return filled


def _find_auto(node: Any, prefix: str = "") -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{prefix}{key}.")
            if found:
                return found
    elif node == "auto":
        return prefix.rstrip(".")
    return None


def resolve_batch_sizes(ds: dict[str, Any], world_size: int, where: str) -> tuple[int, int, int]:
    """(train_batch_size, micro batch per rank, accumulation) as DeepSpeed derives them, or a clear error."""
    given = {k: ds.get(k) for k in _BATCH_KEYS if ds.get(k) is not None}
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ExperimentError(f"{where}: {key}={value!r}: must be an int >= 1")
    tbs, mbs, gas = (given.get(k) for k in _BATCH_KEYS)
    if mbs is None and tbs is None:
        raise ExperimentError(f"{where}: set train_micro_batch_size_per_gpu (sequences per rank per forward)")
    if mbs is None:
        gas = gas or 1
        if tbs % (gas * world_size):
            raise ExperimentError(
                f"{where}: train_batch_size={tbs} is not divisible by gradient_accumulation_steps ({gas}) x "
                f"data-parallel world size ({world_size}); set train_micro_batch_size_per_gpu instead"
            )
        mbs = tbs // (gas * world_size)
    elif gas is None:
        gas = 1 if tbs is None else tbs // (mbs * world_size)
        if tbs is not None and (gas < 1 or tbs != mbs * gas * world_size):
            raise ExperimentError(
                f"{where}: train_batch_size={tbs} is not a multiple of train_micro_batch_size_per_gpu ({mbs}) x "
                f"world size ({world_size}); set train_batch_size to a multiple of {mbs * world_size} "
                "or remove it"
            )
    if tbs is None:
        tbs = mbs * gas * world_size
    if tbs != mbs * gas * world_size:
        raise ExperimentError(
            f"{where}: train_batch_size={tbs} != train_micro_batch_size_per_gpu ({mbs}) x "
            f"gradient_accumulation_steps ({gas}) x data-parallel world size ({world_size}) = "
            f"{mbs * gas * world_size}. Set train_batch_size to {mbs * gas * world_size}, or remove it and "
            "let DeepSpeed derive it"
        )
    return tbs, mbs, gas


def zero_stage(ds_config: Mapping[str, Any], where: str = "DeepSpeed config") -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 without ``zero_optimization``); the one place it is read.

    ``zero_optimization`` may be a section (``{"stage": 2, ...}``) or, as DeepSpeed
    also accepts, the stage itself. A stage DeepSpeed does not have is an
    :class:`ExperimentError` naming ``where``.
    """
    zero = ds_config.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else zero
    if stage not in ZERO_STAGES_SUPPORTED:
        raise ExperimentError(f"{where}: zero_optimization.stage={stage!r}: allowed values are 0, 1, 2, 3")
    return int(stage)


def node_local_checkpoints(ds_config: Mapping[str, Any], where: str = "DeepSpeed config") -> bool:
    """Whether checkpoints go to node-local storage (``checkpoint.use_node_local_storage``); the one place it is read.

    Anything but a JSON boolean is an :class:`ExperimentError` naming ``where``
    (DeepSpeed would take the string ``"false"`` as true).
    """
    section = ds_config.get("checkpoint") or {}
    value = section.get("use_node_local_storage", False) if isinstance(section, dict) else False
    if not isinstance(value, bool):
        raise ExperimentError(f"{where}: checkpoint.use_node_local_storage={value!r}: must be true or false")
    return value


def effective_ds_config(
    ds: dict[str, Any], ds_path: str | Path, exp: Experiment, world_size: int, fp16_supported: bool = True
) -> tuple[dict[str, Any], list[str]]:
    """Check the DeepSpeed JSON against the experiment and the world; return (config to use, warnings).

    The returned copy has the batch triple spelled out, ``"auto"`` bucket sizes
    filled from the model's hidden size (:data:`HIDDEN_SIZE_AUTO`) and layer sizes
    (:data:`MODEL_AUTO`), and a TensorBoard section
    (``<output_dir>/tensorboard``, job ``run_name``) when the JSON had none, so a
    run always has its curves; it is saved as ``<output_dir>/ds_config.json``.
    """
    where = str(ds_path)
    warnings: list[str] = []
    cfg = copy.deepcopy(ds)
    fill_hidden_size_autos(cfg, int(exp.model["hidden_size"]))
    fill_model_autos(cfg, exp.model_config(tokenizer_vocab_size=1))  # layer sizes do not depend on the vocabulary
    auto = _find_auto(cfg)
    if auto:
        accepted = ", ".join(f"zero_optimization.{k}" for k in (*HIDDEN_SIZE_AUTO, *MODEL_AUTO))
        raise ExperimentError(
            f"{where}: {auto}=\"auto\": hmoe-ds fills 'auto' only in {accepted} (from the model's sizes); "
            "give a number"
        )
    cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"] = (
        resolve_batch_sizes(cfg, world_size, where)
    )

    zero = cfg.get("zero_optimization") or {}
    stage = zero_stage(cfg, where)
    if stage != 3 and isinstance(zero, dict) and zero.get("offload_param"):
        raise ExperimentError(
            f"{where}: zero_optimization.offload_param needs stage 3 (stage is {stage}); remove offload_param or "
            "set stage to 3 (offload_optimizer works with stages 1-3)"
        )

    if not isinstance(cfg.get("optimizer"), dict) or not cfg["optimizer"].get("type"):
        raise ExperimentError(
            f'{where}: no "optimizer" section; the trainer builds none itself. Add e.g. '
            '"optimizer": {"type": "AdamW", "params": {"lr": 0.0003, "weight_decay": 0.01}}'
        )
    _check_optimizer_and_scheduler(cfg, where)
    if isinstance(zero, dict):
        _check_offload(zero, stage, where)
    moe_every = exp.model.get("moe_layer_frequency", model_default("moe_layer_frequency"))
    if node_local_checkpoints(cfg, where) and stage < 3 and moe_every:
        # DeepSpeed 0.19's MoE save writes the dense model states (mp_rank_00_model_states.pt) on data-parallel
        # rank 0 only and each expert's file on its expert-data-parallel rank 0, whatever use_node_local_storage
        # says, so the other nodes' directories could never be loaded. ZeRO-3 writes every file per rank.
        raise ExperimentError(
            f"{where}: checkpoint.use_node_local_storage needs ZeRO stage 3 for an MoE model (stage is {stage}): "
            "under stages 0-2 DeepSpeed writes the dense model states and the expert files of an MoE model on one "
            "rank for all nodes, so the other nodes' checkpoint directories could not be resumed. Set "
            "zero_optimization.stage to 3, or put the checkpoints on a shared path (use_node_local_storage false)")
    fp16 = bool((cfg.get("fp16") or {}).get("enabled", False))
    bf16 = bool((cfg.get("bf16") or cfg.get("bfloat16") or {}).get("enabled", False))
    if fp16 and bf16:
        raise ExperimentError(f"{where}: fp16.enabled and bf16.enabled are both true; enable at most one")
    if fp16 and not fp16_supported:
        raise ExperimentError(
            f"{where}: fp16.enabled=true but this accelerator has no fp16 support; "
            "set fp16.enabled to false (fp32) or use bf16.enabled=true"
        )

    moe = exp.model.get("moe") or {}
    ep_size = int(moe.get("ep_size", 1))
    if world_size % ep_size:
        raise ExperimentError(
            f"{exp.source}: model.moe.ep_size={ep_size} does not divide the world size ({world_size}); "
            "launch a multiple of ep_size ranks or change ep_size"
        )
    block = exp.data.get("block_size", _data_default("block_size"))
    max_pos = exp.model.get("max_position_embeddings", model_default("max_position_embeddings"))
    if block is not None and max_pos is not None and block > max_pos:
        raise ExperimentError(
            f"{exp.source}: data.block_size={block} > model.max_position_embeddings={max_pos}; "
            f"lower data.block_size or raise model.max_position_embeddings to >= {block}"
        )

    sched = cfg.get("scheduler") or {}
    total = (sched.get("params") or {}).get("total_num_steps")
    if total is not None and total != exp.run.train_steps:
        warnings.append(
            f"{where}: scheduler.params.total_num_steps={total} differs from run.train_steps="
            f"{exp.run.train_steps}; the learning-rate schedule will not end with the run"
        )

    tb = cfg.get("tensorboard")
    if tb is None:
        cfg["tensorboard"] = {
            "enabled": True,
            "output_path": str(exp.output_dir / "tensorboard"),
            "job_name": exp.run.run_name,
        }
    elif isinstance(tb, dict) and tb.get("enabled") and not tb.get("output_path"):
        cfg["tensorboard"] = {**tb, "output_path": str(exp.output_dir / "tensorboard")}
    if isinstance(cfg["tensorboard"], dict) and cfg["tensorboard"].get("enabled"):
        cfg["tensorboard"].setdefault("job_name", exp.run.run_name)
    else:
        warnings.append(f"{where}: tensorboard.enabled is false: only metrics.jsonl will be written")
    return cfg, warnings


def _accepted_optimizers() -> tuple[list[str], Any]:
    """(DeepSpeed's own optimizer names, the ``torch.optim`` module): what ``deepspeed.initialize`` accepts."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    return list(DEEPSPEED_OPTIMIZERS), torch.optim


def _is_torch_class(module: Any, name: str, base: type) -> bool:
    value = getattr(module, name, None)
    return isinstance(value, type) and issubclass(value, base) and value is not base


def _check_lr(value: Any, key: str, where: str, allow_zero: bool) -> None:
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ExperimentError(f"{where}: {key}={value!r}: must be a finite number, e.g. 0.0003")
    if value < 0 or (value == 0 and not allow_zero):
        need = ">= 0" if allow_zero else "> 0"
        raise ExperimentError(f"{where}: {key}={value!r}: a learning rate must be {need}, e.g. 0.0003")


def _check_optimizer_and_scheduler(cfg: dict[str, Any], where: str) -> None:
    """Optimizer and scheduler types DeepSpeed accepts, and learning rates that make sense, before any engine.

    DeepSpeed checks these only inside ``deepspeed.initialize`` on every rank, with
    a traceback (an assertion for an unknown scheduler, a ``ValueError`` deep in
    torch for a negative learning rate).
    """
    import torch

    native, torch_optim = _accepted_optimizers()
    optimizer = cfg["optimizer"]
    name = optimizer.get("type")
    if not isinstance(name, str) or not (name.lower() in native
                                         or _is_torch_class(torch_optim, name, torch_optim.Optimizer)):
        close = difflib.get_close_matches(str(name).lower(), native, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ExperimentError(
            f"{where}: optimizer.type={name!r} is not an optimizer DeepSpeed knows{hint}; use one of DeepSpeed's "
            f"({', '.join(native)}; any case) or a torch.optim class name (e.g. SGD, RMSprop)")
    params = optimizer.get("params") or {}
    if not isinstance(params, dict):
        raise ExperimentError(f"{where}: optimizer.params must be an object of optimizer arguments")
    if "lr" in params:
        _check_lr(params["lr"], "optimizer.params.lr", where, allow_zero=False)
    sched = cfg.get("scheduler")
    if sched is None:
        return
    if not isinstance(sched, dict) or not sched.get("type"):
        raise ExperimentError(f'{where}: scheduler must be an object with a "type", e.g. '
                              '{"type": "WarmupLR", "params": {...}}')
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    kind = sched["type"]
    if not isinstance(kind, str) or not (kind in VALID_LR_SCHEDULES or _is_torch_class(
            torch.optim.lr_scheduler, kind, torch.optim.lr_scheduler.LRScheduler)):
        close = difflib.get_close_matches(str(kind), VALID_LR_SCHEDULES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ExperimentError(
            f"{where}: scheduler.type={kind!r} is not a scheduler DeepSpeed knows{hint}; use one of "
            f"{', '.join(VALID_LR_SCHEDULES)} (case matters) or a torch.optim.lr_scheduler class name")
    for key, value in (sched.get("params") or {}).items():
        # WarmupLR's warmup_min_lr, OneCycle's cycle_min_lr, LRRangeTest's lr_range_test_min_lr, ...
        if key == "lr" or key.endswith("_lr"):
            _check_lr(value, f"scheduler.params.{key}", where, allow_zero=True)


def _check_offload(zero: dict[str, Any], stage: Any, where: str) -> None:
    """NVMe offload: stage 3, an existing ``nvme_path`` and DeepSpeed's async_io op, or one line saying which."""
    for section in ("offload_optimizer", "offload_param"):
        offload = zero.get(section)
        if not isinstance(offload, dict) or str(offload.get("device", "")).lower() != "nvme":
            continue
        key = f"zero_optimization.{section}"
        if stage != 3:
            raise ExperimentError(
                f"{where}: {key}.device=nvme needs ZeRO stage 3 (stage is {stage}); DeepSpeed would silently offload "
                "to CPU instead. Set zero_optimization.stage to 3, or device to cpu")
        path = offload.get("nvme_path")
        if not path:
            raise ExperimentError(f'{where}: {key}.device=nvme needs {key}.nvme_path, a directory on the NVMe '
                                  'drive, e.g. "nvme_path": "/local_nvme"; or set device to cpu')
        if not Path(path).is_dir():
            raise ExperimentError(f"{where}: {key}.nvme_path={path!r} is not an existing directory; create it on the "
                                  "NVMe drive (it must exist on every node), or set device to cpu")
        if not _async_io_available():
            raise ExperimentError(
                f"{where}: {key}.device=nvme needs DeepSpeed's async_io op, which is not available on this machine "
                "(it needs a GPU accelerator and libaio: apt install libaio-dev, then DS_BUILD_AIO=1); set device "
                "to cpu")


def _async_io_available() -> bool:
    try:
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("AsyncIOBuilder")
        return builder is not None and bool(builder.is_compatible(verbose=False))
    except Exception:  # noqa: BLE001 - any failure to even probe the op means it cannot be used
        return False


def _data_default(name: str) -> Any:
    from hmoe_ds.data import DataConfig

    fields = {f.name: f for f in dataclasses.fields(DataConfig)}
    f = fields.get(name)
    return None if f is None or f.default is dataclasses.MISSING else f.default


def tensorboard_dir(ds_effective: dict[str, Any]) -> Path | None:
    """The directory DeepSpeed's TensorBoard monitor writes to (output_path/job_name), if enabled."""
    tb = ds_effective.get("tensorboard") or {}
    if not tb.get("enabled"):
        return None
    return Path(tb.get("output_path") or "") / str(tb.get("job_name") or "DeepSpeedJobName")
