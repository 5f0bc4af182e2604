"""Experiment YAML schema, --set overrides, DeepSpeed-JSON cross-checks and the output-dir guard.

Fast, single process, no launcher: everything here runs before any process group exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from hmoe_ds.training.experiment import (
    ExperimentError,
    check_required,
    effective_ds_config,
    load_ds_config,
    load_experiment,
    resolve_batch_sizes,
    tensorboard_dir,
)
from hmoe_ds.training.trainer import check_output_dir

REPO = Path(__file__).resolve().parents[1]

TINY: dict[str, Any] = {
    "model": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        "dense_intermediate_size": 128,
        "moe": {"expert_sizes": [32, 64, 96, 128], "routing": "top_p", "top_p": 0.6},
    },
    "data": {"block_size": 64, "vocab_size": 512, "max_chars": 100_000},
    "run": {"train_steps": 5, "log_every": 1},
}
DS: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
}


def write_yaml(tmp_path: Path, doc: Any, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc), encoding="utf-8")
    return path


def tiny(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    doc = {k: dict(v) for k, v in TINY.items()}
    doc["run"]["output_dir"] = str(tmp_path / "out")
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value}
    return write_yaml(tmp_path, doc)


def error_of(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ExperimentError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- schema


def test_tiny_experiment_loads_with_defaults(tmp_path: Path) -> None:
    exp = load_experiment(tiny(tmp_path))
    assert exp.model["vocab_size"] == "auto"
    assert exp.run.run_name == "exp"  # the file's stem
    assert exp.run.eval_at_start is True
    cfg = exp.model_config(tokenizer_vocab_size=512)
    assert cfg.vocab_size == 512 and cfg.hidden_size == 64


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "run" / "configs").glob("*.yaml")))
def test_shipped_experiments_are_valid(name: str) -> None:
    exp = load_experiment(REPO / "run" / "configs" / name)
    assert exp.run.train_steps > 0


def test_unknown_key_names_key_allowed_and_suggestion(tmp_path: Path) -> None:
    msg = error_of(load_experiment, tiny(tmp_path, run={"train_stepz": 3}))
    assert "run.train_stepz: unknown key" in msg
    assert "did you mean 'train_steps'" in msg and "allowed:" in msg and "eval_every" in msg
    assert str(tmp_path / "exp.yaml") in msg


def test_unknown_moe_and_top_level_keys(tmp_path: Path) -> None:
    path = tiny(tmp_path, model={"moe": {"expert_sizes": [32, 64], "top_q": 0.5}})
    assert "model.moe.top_q: unknown key" in error_of(load_experiment, path)
    assert "training: unknown key" in error_of(load_experiment, write_yaml(tmp_path, {"training": {}}))


def test_deepspeed_keys_in_experiment_point_to_the_json(tmp_path: Path) -> None:
    msg = error_of(load_experiment, tiny(tmp_path, run={"train_batch_size": 32}))
    assert "run.train_batch_size" in msg and "DeepSpeed JSON" in msg


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("run", {"train_steps": "ten"}, "run.train_steps='ten': expected int"),
        ("run", {"train_steps": 0}, "run.train_steps=0: must be an int >= 1"),
        ("run", {"eval_at_start": "yes"}, "run.eval_at_start='yes': expected bool"),
        ("model", {"hidden_size": 60, "num_attention_heads": 8}, "divisible by num_attention_heads"),
        ("model", {"vocab_size": "big"}, "model.vocab_size='big'"),
        ("model", {"moe": {"expert_sizes": [32, 64], "top_p": 1.5}}, "model.moe: top_p=1.5"),
        ("data", {"block_size": 1}, "data.block_size=1"),
        ("data", {"files": ["/nonexistent/corpus.txt"]}, "/nonexistent/corpus.txt"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, section: str, values: dict[str, Any], expected: str) -> None:
    assert expected in error_of(load_experiment, tiny(tmp_path, **{section: values}))


def test_expert_size_spec_is_solved(tmp_path: Path) -> None:
    spec = {"distribution": "arithmetic", "num_experts": 4, "total_hidden": 256, "multiple": 16}
    exp = load_experiment(tiny(tmp_path, model={"moe": {"expert_sizes": spec}}))
    sizes = exp.model_config(512).moe["expert_sizes"]
    assert len(sizes) == 4 and sum(sizes) == 256 and sizes == sorted(sizes)


def test_overrides_are_typed_and_marked(tmp_path: Path) -> None:
    path = tiny(tmp_path)
    exp = load_experiment(path, ["run.train_steps=7", "model.moe.top_p=0.5", "data.files=null"])
    assert exp.run.train_steps == 7 and exp.model["moe"]["top_p"] == 0.5
    assert "(from --set)" in error_of(load_experiment, path, ["run.nope=1"])
    assert "key.sub=value" in error_of(load_experiment, path, ["run.train_steps"])
    assert "run.train_steps.x" in error_of(load_experiment, path, ["run.train_steps.x=1"])


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "model:\n  hidden_size: 64\n run:\n   bad: [1, 2\n")
    msg = error_of(load_experiment, path)
    assert msg.startswith(f"{path}:") and "YAML syntax error" in msg
    line = int(msg.split(":")[1])
    assert 2 <= line <= 5


def test_yaml_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "run:\n  train_steps: 5\n  train_steps: 6\n")
    msg = error_of(load_experiment, path)
    assert f"{path}:3:" in msg and "duplicate key 'train_steps'" in msg


# --------------------------------------------------------------------------- DeepSpeed JSON


def ds_file(tmp_path: Path, cfg: dict[str, Any] | str) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg, indent=1), encoding="utf-8")
    return path


def test_json_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = ds_file(tmp_path, '{\n  "train_micro_batch_size_per_gpu": 4,\n  "optimizer": {"type": "AdamW",}\n}\n')
    msg = error_of(load_ds_config, path)
    assert msg.startswith(f"{path}:3:") and "JSON syntax error" in msg


@pytest.mark.parametrize(
    ("given", "world", "expected"),
    [
        ({"train_micro_batch_size_per_gpu": 4}, 2, (8, 4, 1)),
        ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2, (24, 4, 3)),
        ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2, (32, 4, 4)),
        ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
        ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 2, (16, 4, 2)),
    ],
)
def test_batch_sizes_resolve_like_deepspeed(given: dict[str, int], world: int, expected: tuple[int, int, int]) -> None:
    assert resolve_batch_sizes(given, world, "ds.json") == expected


def test_batch_size_contradiction_names_all_three(tmp_path: Path) -> None:
    exp = load_experiment(tiny(tmp_path))
    cfg = {**DS, "train_batch_size": 100}
    msg = error_of(effective_ds_config, cfg, "ds.json", exp, world_size=2)
    assert "train_batch_size=100 != train_micro_batch_size_per_gpu (4) x gradient_accumulation_steps (2)" in msg
    assert "world size (2) = 16" in msg and "Set train_batch_size to 16" in msg


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"zero_optimization": {"stage": 4}}, r"stage=4: allowed values are 0, 1, 2, 3"),
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs stage 3"),
        ({"zero_optimization": {"stage": 4}}, "allowed values are 0, 1, 2"),
        ({"train_micro_batch_size_per_gpu": "auto"}, 'train_micro_batch_size_per_gpu="auto": hmoe-ds fills \'auto\' '
                                                     "only in zero_optimization.reduce_bucket_size"),
        ({"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}},
         'zero_optimization.allgather_bucket_size="auto"'),
        ({"optimizer": None}, 'no "optimizer" section'),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "enable at most one"),
        ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu=0"),
    ],
)
def test_deepspeed_config_errors(tmp_path: Path, patch: dict[str, Any], expected: str) -> None:
    exp = load_experiment(tiny(tmp_path))
    cfg = {k: v for k, v in {**DS, **patch}.items() if v is not None}
    assert expected in error_of(effective_ds_config, cfg, "ds.json", exp, world_size=2)


def test_bucket_sizes_auto_follow_the_hidden_size_as_in_hf(tmp_path: Path) -> None:
    """"auto" in the three hidden-size keys: d^2, 0.9 d^2, 10 d (the HF Trainer's rule); numbers stay as given."""
    exp = load_experiment(tiny(tmp_path))
    d = exp.model["hidden_size"]
    zero = {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": 123}
    cfg, _ = effective_ds_config({**DS, "zero_optimization": zero}, "ds.json", exp, world_size=2)
    assert cfg["zero_optimization"] == {"stage": 3, "reduce_bucket_size": d * d,
                                        "stage3_prefetch_bucket_size": int(0.9 * d * d),
                                        "stage3_param_persistence_threshold": 123}
    assert zero["reduce_bucket_size"] == "auto"  # the input is not modified
    for shipped in ("zero3.json", "zero3_bf16.json"):  # what users launch with
        raw = json.loads((REPO / "ds_configs" / shipped).read_text())
        cfg, _ = effective_ds_config(raw, shipped, exp, world_size=2)
        assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * d, shipped
        assert cfg["zero_optimization"]["stage3_max_reuse_distance"] == d * d, shipped
        assert cfg["zero_optimization"]["stage3_max_live_parameters"] > 0, shipped


def test_live_parameters_auto_is_two_of_the_largest_layers_a_rank_gathers(tmp_path: Path) -> None:
    """``stage3_max_live_parameters: auto`` = 2 x the largest decoder layer one rank gathers, counted by hand."""
    from hmoe_ds.modeling import largest_layer_params_per_rank

    exp = load_experiment(tiny(tmp_path))
    config = exp.model_config(tokenizer_vocab_size=1)
    d, moe = config.hidden_size, config.moe_layer_config()
    kv = config.num_key_value_heads * config.head_dim
    attention = 2 * d * d + 2 * d * kv + 2 * d  # q, o; k, v; two RMSNorms
    experts = sum(3 * d * h for h in moe.expert_sizes)  # SwiGLU: w1, w2, w3
    moe_layer = -(-experts // moe.ep_size) + d * moe.num_experts  # local experts + router
    dense = 3 * d * config.dense_intermediate_size
    expected = attention + max(moe_layer if config.is_moe_layer(i) else dense for i in range(config.num_hidden_layers))
    assert largest_layer_params_per_rank(config) == expected
    zero = {"stage": 3, "stage3_max_live_parameters": "auto", "stage3_max_reuse_distance": 7}
    cfg, _ = effective_ds_config({**DS, "zero_optimization": zero}, "ds.json", exp, world_size=2)
    assert cfg["zero_optimization"]["stage3_max_live_parameters"] == 2 * expected
    assert cfg["zero_optimization"]["stage3_max_reuse_distance"] == 7  # a number stays as given
    msg = error_of(effective_ds_config, {**DS, "zero_optimization": {"stage": 3, "sub_group_size": "auto"}},
                   "ds.json", exp, world_size=2)
    assert "sub_group_size" in msg and "stage3_max_live_parameters" in msg


def test_fp16_without_accelerator_support(tmp_path: Path) -> None:
    exp = load_experiment(tiny(tmp_path))
    msg = error_of(effective_ds_config, {**DS, "fp16": {"enabled": True}}, "ds.json", exp, 1, fp16_supported=False)
    assert "no fp16 support" in msg


def test_experiment_cross_checks(tmp_path: Path) -> None:
    exp = load_experiment(tiny(tmp_path, data={"block_size": 256}))
    assert "data.block_size=256 > model.max_position_embeddings=128" in error_of(
        effective_ds_config, DS, "ds.json", exp, 1
    )
    exp = load_experiment(tiny(tmp_path, model={"moe": {"expert_sizes": [32, 64, 96, 128], "ep_size": 4}}))
    assert "ep_size=4 does not divide the world size (2)" in error_of(effective_ds_config, DS, "ds.json", exp, 2)


def test_tensorboard_is_enabled_when_missing_and_kept_when_given(tmp_path: Path) -> None:
    exp = load_experiment(tiny(tmp_path))
    cfg, _ = effective_ds_config(DS, "ds.json", exp, world_size=2)
    assert cfg["tensorboard"] == {"enabled": True, "output_path": str(tmp_path / "out" / "tensorboard"), "job_name": "exp"}
    assert tensorboard_dir(cfg) == tmp_path / "out" / "tensorboard" / "exp"
    assert (cfg["train_batch_size"], cfg["gradient_accumulation_steps"]) == (16, 2)
    assert "train_batch_size" not in DS  # the input is not modified
    given = {**DS, "tensorboard": {"enabled": True, "output_path": "/tb", "job_name": "mine"}}
    cfg, _ = effective_ds_config(given, "ds.json", exp, world_size=2)
    assert tensorboard_dir(cfg) == Path("/tb/mine")


def test_scheduler_length_mismatch_is_a_warning(tmp_path: Path) -> None:
    exp = load_experiment(tiny(tmp_path))
    cfg = {**DS, "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 99}}}
    _, warnings = effective_ds_config(cfg, "ds.json", exp, world_size=1)
    assert any("total_num_steps=99" in w for w in warnings)


def test_shipped_ds_configs(tmp_path: Path) -> None:
    exp = load_experiment(tiny(tmp_path))
    from hmoe_ds.training.trainer import moe_frontend_for

    frontends = {}
    for name in ("cpu_default.json", "zero2_offload.json", "zero3.json"):
        cfg, _ = effective_ds_config(load_ds_config(REPO / "ds_configs" / name), name, exp, world_size=2)
        assert cfg["gradient_clipping"] == 1.0 and cfg["tensorboard"]["enabled"]
        frontends[name] = moe_frontend_for(cfg)
    assert frontends == {"cpu_default.json": "moe", "zero2_offload.json": "moe", "zero3.json": "autoep"}


# --------------------------------------------------------------------------- output directory


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def saved_run(tmp_path: Path, checkpoint: str | None = None, world_size: int = 2, complete: bool = True) -> Path:
    """An output dir as train.py leaves it: experiment.yaml (+ a checkpoint, with its completion marker)."""
    from hmoe_ds.checkpoint import write_latest, write_marker

    exp = load_experiment(tiny(tmp_path))
    exp.output_dir.mkdir(parents=True)
    (exp.output_dir / "experiment.yaml").write_text(yaml.safe_dump(exp.to_dict()), encoding="utf-8")
    if checkpoint:
        tag_dir = exp.output_dir / "checkpoints" / checkpoint
        tag_dir.mkdir(parents=True)
        (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        if complete:
            write_marker(tag_dir, {"tag": checkpoint, "step": int(checkpoint.split("_")[-1]), "world_size": world_size})
            write_latest(exp.output_dir / "checkpoints", checkpoint)
    return exp.output_dir


def test_fresh_and_same_run_directories_are_fine(tmp_path: Path) -> None:
    exp = load_experiment(tiny(tmp_path))
    assert check_output_dir(exp, resume=False) == (None, [])
    saved_run(tmp_path)
    assert check_output_dir(exp, resume=False)[0] is None


def test_different_run_is_refused_and_nothing_is_touched(tmp_path: Path) -> None:
    out = saved_run(tmp_path)
    before = snapshot(out)
    exp = load_experiment(tiny(tmp_path), ["run.train_steps=9"])
    msg = error_of(check_output_dir, exp, False)
    assert "holds a different run" in msg and "run.train_steps (5 -> 9)" in msg and "--resume" in msg
    assert snapshot(out) == before
    tag, notes = check_output_dir(exp, resume=True)
    assert tag is None and any("run.train_steps" in n for n in notes)


def test_existing_checkpoint_needs_resume(tmp_path: Path) -> None:
    saved_run(tmp_path, checkpoint="step_5")
    exp = load_experiment(tiny(tmp_path))
    assert "already holds checkpoint 'step_5'" in error_of(check_output_dir, exp, False)
    assert check_output_dir(exp, resume=True)[0] == "step_5"


def test_foreign_non_empty_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    exp = load_experiment(tiny(tmp_path))
    assert "holds no experiment.yaml" in error_of(check_output_dir, exp, True)


def test_interrupted_checkpoint_is_kept_but_skipped_by_resume(tmp_path: Path) -> None:
    """A save killed before its marker: never overwritten silently, and --resume starts without it."""
    out = saved_run(tmp_path, checkpoint="step_5", complete=False)
    before = snapshot(out)
    exp = load_experiment(tiny(tmp_path))
    assert "already holds checkpoint 'step_5'" in error_of(check_output_dir, exp, False)
    tag, notes = check_output_dir(exp, resume=True)
    assert tag is None
    assert any("step_5" in n and "interrupted" in n for n in notes), notes
    assert any("no complete checkpoint" in n for n in notes), notes
    assert snapshot(out) == before


def test_resume_on_another_world_size_picks_the_checkpoint(tmp_path: Path) -> None:
    """The output directory decides *which* checkpoint; whether it fits another layout (elastic resume) is
    ``check_compatible``'s call (``tests/test_checkpoint.py``)."""
    saved_run(tmp_path, checkpoint="step_5", world_size=2)
    exp = load_experiment(tiny(tmp_path))
    assert check_output_dir(exp, True)[0] == "step_5"
    for world_size in (4, 2):  # the deprecated world_size argument is ignored, with a warning
        with pytest.warns(DeprecationWarning, match="world_size"):
            assert check_output_dir(exp, True, world_size)[0] == "step_5"


def add_checkpoint(out: Path, step: int, complete: bool = True) -> Path:
    from hmoe_ds.checkpoint import write_latest, write_marker

    tag_dir = out / "checkpoints" / f"step_{step}"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    if complete:
        write_marker(tag_dir, {"tag": tag_dir.name, "step": step, "world_size": 2})
        write_latest(out / "checkpoints", tag_dir.name)
    return tag_dir


def test_resume_from_a_named_checkpoint(tmp_path: Path) -> None:
    out = saved_run(tmp_path, checkpoint="step_5")
    add_checkpoint(out, 10)
    add_checkpoint(out, 15, complete=False)
    exp = load_experiment(tiny(tmp_path))
    assert check_output_dir(exp, "auto")[0] == "step_10"
    assert check_output_dir(exp, True)[0] == "step_10"
    assert check_output_dir(exp, "step_5")[0] == "step_5"
    assert "no checkpoint 'step_7'; available: step_10, step_15, step_5" in error_of(check_output_dir, exp, "step_7")
    assert "no hmoe_complete.json: the save was interrupted" in error_of(check_output_dir, exp, "step_15")
    fresh = load_experiment(tiny(tmp_path), ["run.output_dir=" + str(tmp_path / "new")])
    assert "holds no run" in error_of(check_output_dir, fresh, "step_5")


def test_branching_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path: Path) -> None:
    """Nothing deleted; a later plain --resume finds the new branch, not the abandoned one."""
    from hmoe_ds.checkpoint import find_resume_checkpoint, read_latest, set_aside_newer_checkpoints

    out = saved_run(tmp_path, checkpoint="step_5")
    later = [add_checkpoint(out, 10), add_checkpoint(out, 15, complete=False)]
    before = {p.name: snapshot(p) for p in later}
    notes = set_aside_newer_checkpoints(out / "checkpoints", 5)
    assert len(notes) == 2 and "step_10" in notes[0] and "step_15" in notes[1]
    (moved_to,) = list((out / "checkpoints_set_aside").iterdir())
    assert {p.name: snapshot(p) for p in moved_to.iterdir()} == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_5"]
    assert read_latest(out / "checkpoints") == "step_5"
    assert find_resume_checkpoint(out / "checkpoints")[0].tag == "step_5"
    assert set_aside_newer_checkpoints(out / "checkpoints", 5) == []


# --------------------------------------------------------------------------- issue 11: the remaining bad inputs


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "model: {}\nrun: {}\n", "run:\n  train_steps: 5\n"])
def test_defect3_empty_or_near_empty_experiment_is_refused_with_what_is_missing(tmp_path: Path, text: str) -> None:
    """Defect 3: an empty YAML used to start the 380M-parameter, 1000-step default run."""
    msg = error_of(lambda path: check_required(load_experiment(path)), write_yaml(tmp_path, text))
    assert "missing: model.hidden_size, model.num_hidden_layers, model.moe.expert_sizes, run.output_dir" in msg
    assert str(tmp_path / "exp.yaml") in msg


def test_required_keys_may_come_from_set(tmp_path: Path) -> None:
    doc = {k: dict(v) for k, v in TINY.items()}
    path = write_yaml(tmp_path, doc)
    assert "missing: run.output_dir" in error_of(lambda p: check_required(load_experiment(p)), path)
    exp = load_experiment(path, [f"run.output_dir={tmp_path / 'out'}"])
    check_required(exp)
    assert exp.output_dir == tmp_path / "out"
    assert load_experiment(path).data_config().block_size == 64  # data-only readers need no output_dir


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"optimizer": {"type": "AdamWW", "params": {"lr": 1e-3}}},
         "optimizer.type='AdamWW' is not an optimizer DeepSpeed knows (did you mean 'adamw'?)"),
        ({"optimizer": {"type": "Module", "params": {"lr": 1e-3}}}, "optimizer.type='Module' is not an optimizer"),
        ({"scheduler": {"type": "WarmupLr", "params": {}}},
         "scheduler.type='WarmupLr' is not a scheduler DeepSpeed knows (did you mean 'WarmupLR'?)"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": -1e-3}}},
         "optimizer.params.lr=-0.001: a learning rate must be > 0"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": "fast"}}}, "optimizer.params.lr='fast': must be a finite"),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": -3e-3}}},
         "scheduler.params.warmup_max_lr=-0.003: a learning rate must be >= 0"),
    ],
)
def test_defect9_optimizer_scheduler_and_learning_rate_are_checked_before_the_engine(
        tmp_path: Path, patch: dict[str, Any], expected: str) -> None:
    """Defect 9: these ended in tracebacks inside deepspeed.initialize on every rank."""
    exp = load_experiment(tiny(tmp_path))
    assert expected in error_of(effective_ds_config, {**DS, **patch}, "ds.json", exp, world_size=2)


@pytest.mark.parametrize("name", ["Adam", "adamw", "Lamb", "SGD", "RMSprop"])
def test_accepted_optimizer_names(tmp_path: Path, name: str) -> None:
    exp = load_experiment(tiny(tmp_path))
    sched = {"type": "OneCycle", "params": {"cycle_min_lr": 0.0, "cycle_max_lr": 1e-3}}
    effective_ds_config({**DS, "optimizer": {"type": name, "params": {"lr": 1e-3}}, "scheduler": sched},
                        "ds.json", exp, world_size=2)
    effective_ds_config({**DS, "scheduler": {"type": "CosineAnnealingLR", "params": {"T_max": 10}}},
                        "ds.json", exp, world_size=2)


def test_defect8_nvme_offload_is_checked(tmp_path: Path) -> None:
    """Defect 8: ZeRO-2 silently offloaded to CPU; ZeRO-3 failed after 45 s in the async_io op."""
    exp = load_experiment(tiny(tmp_path))

    def zero(stage: int, **offload: Any) -> dict[str, Any]:
        return {**DS, "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "nvme", **offload}}}

    msg = error_of(effective_ds_config, zero(2, nvme_path=str(tmp_path)), "ds.json", exp, 2)
    assert "offload_optimizer.device=nvme needs ZeRO stage 3 (stage is 2)" in msg
    assert "needs zero_optimization.offload_optimizer.nvme_path" in error_of(effective_ds_config, zero(3), "ds.json",
                                                                             exp, 2)
    missing = tmp_path / "no_such_nvme"
    msg = error_of(effective_ds_config, zero(3, nvme_path=str(missing)), "ds.json", exp, 2)
    assert f"nvme_path='{missing}' is not an existing directory" in msg and not missing.exists()
    msg = error_of(effective_ds_config, zero(3, nvme_path=str(tmp_path)), "ds.json", exp, 2)
    assert "needs DeepSpeed's async_io op, which is not available on this machine" in msg  # CPU-only here


def test_run_options_of_issue11(tmp_path: Path) -> None:
    exp = load_experiment(tiny(tmp_path))
    assert exp.run.save_on_signal is True and exp.run.on_nonfinite == "stop"
    msg = error_of(load_experiment, tiny(tmp_path, run={"on_nonfinite": "ignore"}))
    assert "run.on_nonfinite='ignore': allowed values are 'stop'" in msg
    assert load_experiment(tiny(tmp_path, run={"on_nonfinite": "skip", "save_on_signal": False})).run.on_nonfinite \
        == "skip"
