"""Hugging Face export and re-sharding of checkpoints (any ZeRO stage, EP size, placement).

Uses the reference runs of tests/checkpoint_runs.py (2 ranks, EP=2, balanced
placement; ZeRO-2 + CPU offload and ZeRO-3). ``run/export.py`` writes an HF
directory that ``AutoModelForCausalLM.from_pretrained`` loads; its logits must
equal the ones the training engine computed for the probe sequence at save
time. Re-sharding starts new runs (EP=1 on 2 ranks, EP=4 on 4 ranks, contiguous
placement) from an export or a checkpoint: their step-0 validation loss over the
whole validation split must equal the source run's final one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hmoe_ds.checkpoint import PROBE_FILE, CheckpointError
from hmoe_ds.export import export_hf

from .checkpoint_runs import STEPS, Run, experiment, launch, val_loss
from .launcher import environment, output, read_metrics, run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

#: fp32 on CPU: the same weights and math; only the summation order of expert grouping and of the
#: validation sums over ranks differ.
RTOL = 1e-5


def export_cli(source: Path, target: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "run/export.py", str(source), str(target), *extra], environment(cache))


def probe(run: Run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run.out / "checkpoints" / f"step_{STEPS}" / PROBE_FILE))


def check_hf_model(export_dir: Path, run: Run) -> None:
    import hmoe_ds.modeling  # noqa: F401  (registers the "hmoe" model type with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(export_dir))
    model.eval()
    assert model.config.moe["ep_size"] == 1 and model.config.moe["expert_sizes"] == [32, 64, 96, 128]
    saved = probe(run)
    with torch.no_grad():
        logits = model(input_ids=saved["input_ids"]).logits
    torch.testing.assert_close(logits, saved["logits"], rtol=RTOL, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    assert len(tokenizer) == model.config.vocab_size
    prompt = tokenizer("The king", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 5)


def test_export_of_a_zero2_expert_parallel_checkpoint_loads_with_from_pretrained(
        zero2_export: Path, zero2_ep2_run: Run) -> None:
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in zero2_export.iterdir()}
    info = json.loads((zero2_export / "hmoe_export.json").read_text())
    assert info["step"] == STEPS and info["trained_with"]["zero_stage"] == 2
    check_hf_model(zero2_export, zero2_ep2_run)


def test_export_of_a_zero3_checkpoint(zero3_ep2_run: Run, tmp_path: Path) -> None:
    target = tmp_path / "hf"
    proc = export_cli(zero3_ep2_run.out / "checkpoints" / f"step_{STEPS}", target, zero3_ep2_run.cache)
    assert proc.returncode == 0, output(proc)
    check_hf_model(target, zero3_ep2_run)


#: Run in a subprocess with cwd outside the repository and no PYTHONPATH: ``hmoe_ds`` and ``deepspeed`` cannot
#: be imported (a meta-path finder refuses them, and availability probes report them absent, as when they are not
#: installed). Loads the export as a user without hmoe-ds would, writes logits and greedy generations.
WITHOUT_HMOE_DS = r"""
import importlib.abc, importlib.util, json, sys
BLOCKED = ("hmoe_ds", "deepspeed")

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)

sys.meta_path.insert(0, Blocked())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.partition(".")[0] in BLOCKED else _find_spec(name, package))
for name in BLOCKED:
    try:
        __import__(name)
        raise SystemExit(f"{name} is importable: the test would prove nothing")
    except ImportError:
        pass

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

export, probe, out = sys.argv[1:4]
config = AutoConfig.from_pretrained(export, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(export)
saved = load_file(probe)
with torch.no_grad():
    logits = model(input_ids=saved["input_ids"]).logits
prompt = tokenizer(["The king", "ROMEO: What light"], return_tensors="pt", padding=True, padding_side="left")
steps = []
hook = model.model.register_forward_pre_hook(lambda _m, args: steps.append(args[0].shape[1]))
cached = model.generate(**prompt, max_new_tokens=12, do_sample=False)
hook.remove()
full = model.generate(**prompt, max_new_tokens=12, do_sample=False, use_cache=False)
save_file({"logits": logits, "cached": cached, "full": full}, out + ".safetensors")
json.dump({
    "config_class": f"{type(config).__module__}.{type(config).__name__}",
    "model_class": f"{type(model).__module__}.{type(model).__name__}",
    "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED),
    "steps": steps,
    "prompt_len": prompt["input_ids"].shape[1],
    "config_ids": [config.bos_token_id, config.eos_token_id, config.pad_token_id],
    "generation_ids": [model.generation_config.bos_token_id, model.generation_config.eos_token_id,
                       model.generation_config.pad_token_id],
    "tokenizer_ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
    "eos_token": tokenizer.eos_token,
}, open(out + ".json", "w"))
"""


def test_export_loads_and_matches_the_training_engine_without_hmoe_ds_or_deepspeed(
        zero2_export: Path, zero2_ep2_run: Run, tmp_path: Path) -> None:
    """The export's own model file, in a Python that cannot import hmoe_ds or DeepSpeed: the engine's logits."""
    env = {k: v for k, v in environment(zero2_ep2_run.cache).items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")  # where trust_remote_code copies the model file
    out = tmp_path / "result"
    proc = subprocess.run([sys.executable, "-c", WITHOUT_HMOE_DS, str(zero2_export),
                           str(zero2_ep2_run.out / "checkpoints" / f"step_{STEPS}" / PROBE_FILE), str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["loaded"] == []
    assert info["model_class"].startswith("transformers_modules.") and info["model_class"].endswith(
        "modeling_hmoe.HMoEForCausalLM"), info
    from safetensors.torch import load_file

    result = load_file(str(out.with_suffix(".safetensors")))
    torch.testing.assert_close(result["logits"], probe(zero2_ep2_run)["logits"], rtol=RTOL, atol=1e-5)
    # Special tokens: config.json and generation_config.json say what the tokenizer says; eos is the
    # document separator the trainer appended (<|endoftext|>, id 0), not <|pad|>.
    assert info["config_ids"] == info["generation_ids"] == info["tokenizer_ids"] == [1, 0, 2], info
    assert info["eos_token"] == "<|endoftext|>"
    # generate: a KV cache (the prompt once, then one token per step) and the tokens of a full recomputation.
    steps, prompt_len = info["steps"], info["prompt_len"]
    assert steps == [prompt_len] + [1] * (result["cached"].shape[1] - prompt_len - 1), steps
    assert torch.equal(result["cached"], result["full"])


def test_export_layout_names_and_standalone_files(zero2_export: Path) -> None:
    """Mixtral weight names, auto_map, the package's own model files (byte for byte), generation_config.json."""
    from safetensors import safe_open

    from hmoe_ds.hf import AUTO_MAP, source_files

    config = json.loads((zero2_export / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == "hmoe"
    assert json.loads((zero2_export / "generation_config.json").read_text())["eos_token_id"] == 0
    for path in source_files():
        assert (zero2_export / path.name).read_bytes() == path.read_bytes()
    with safe_open(str(zero2_export / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
    assert {f"model.layers.{l}.block_sparse_moe.experts.{i}.{w}.weight"
            for l in (0, 1) for i in range(4) for w in ("w1", "w2", "w3")} <= names
    assert {"model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.gate.weight"} <= names
    assert not any("deepspeed" in n for n in names)


def test_an_export_in_the_old_deepspeed_naming_still_loads(zero2_export: Path, zero2_ep2_run: Run,
                                                           tmp_path: Path) -> None:
    """An export as hmoe-ds wrote them before (DeepSpeed names, no model files): hmoe_ds's classes load it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from hmoe_ds.export import resolve_source
    from hmoe_ds.naming import logical_key_from_export

    old = tmp_path / "old_export"
    shutil.copytree(zero2_export, old)
    for name in ("configuration_hmoe.py", "modeling_hmoe.py", "generation_config.json"):
        (old / name).unlink()
    config = json.loads((old / "config.json").read_text())
    del config["auto_map"]
    (old / "config.json").write_text(json.dumps(config))
    weights = {logical_key_from_export(k): v for k, v in load_file(str(old / "model.safetensors")).items()}
    assert "model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.3.w2.weight" in weights
    save_file(weights, str(old / "model.safetensors"), metadata={"format": "pt"})
    check_hf_model(old, zero2_ep2_run)
    # export/eval/init_from read both namings as the same logical tensors
    new_reader, old_reader = resolve_source(zero2_export).open(), resolve_source(old).open()
    assert new_reader.shapes() == old_reader.shapes()
    name = "model.layers.1.mlp.deepspeed_moe.gate.wg.weight"
    assert torch.equal(new_reader.get(name), old_reader.get(name))


def test_checkpoints_dir_holds_a_zero_to_fp32_that_works(zero2_ep2_run: Run, tmp_path: Path) -> None:
    """DeepSpeed's zero_to_fp32.py fails on these checkpoints; the one hmoe-ds leaves there exports them."""
    checkpoints = zero2_ep2_run.out / "checkpoints"
    script = (checkpoints / "zero_to_fp32.py").read_text()
    assert "hmoe_ds.export" in script and "zero_to_fp32" in script
    assert (checkpoints / "zero_to_torch.py").read_text() == script  # DeepSpeed's second copy is replaced too
    proc = run([sys.executable, str(checkpoints / "zero_to_fp32.py"), str(checkpoints), str(tmp_path / "fp32"),
                "-t", f"step_{STEPS}"], environment(zero2_ep2_run.cache))
    assert proc.returncode == 0, output(proc)
    assert "logits match the training engine" in proc.stdout
    assert (tmp_path / "fp32" / "model.safetensors").is_file()


def test_export_refuses_to_overwrite_and_names_bad_sources(zero2_export: Path, zero2_ep2_run: Run,
                                                           tmp_path: Path) -> None:
    proc = export_cli(zero2_ep2_run.out, zero2_export, zero2_ep2_run.cache)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr
    with pytest.raises(CheckpointError, match="no such directory"):
        export_hf(tmp_path / "nowhere", tmp_path / "x")
    with pytest.raises(CheckpointError, match="no checkpoint 'step_99'; available: step_3, step_6"):
        export_hf(zero2_ep2_run.out, tmp_path / "x", tag="step_99")
    with pytest.raises(CheckpointError, match="already an HF export"):
        export_hf(zero2_export, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("ep_size,ranks,source", [(1, 2, "export"), (4, 4, "checkpoint")])
def test_resharded_run_starts_at_the_source_models_loss(ep_size: int, ranks: int, source: str,
                                                        zero2_export: Path, zero2_ep2_run: Run,
                                                        zero3_ep2_run: Run, tmp_path: Path) -> None:
    """EP=2 (balanced) -> EP=1 from the HF export (ZeRO-2 run), EP=4 (contiguous) from a ZeRO-3 checkpoint."""
    origin = zero2_ep2_run if source == "export" else zero3_ep2_run
    init_from = zero2_export if source == "export" else origin.out
    exp = experiment(ep_size=ep_size, placement="contiguous")
    exp["run"].update(train_steps=1, eval_at_start=True, save_every=0, init_from=str(init_from))
    run = launch(tmp_path, "zero2_offload", origin.cache, exp=exp, ranks=ranks)
    assert run.proc.returncode == 0, output(run.proc)
    assert "initialising weights from" in run.proc.stdout
    start = val_loss(read_metrics(run.out), 0)
    assert start == pytest.approx(val_loss(origin.metrics(), STEPS), rel=RTOL)
    marker = json.loads((run.out / "checkpoints" / "step_1" / "hmoe_complete.json").read_text())
    assert [layer["ep_size"] for layer in marker["moe_layers"]] == [ep_size, ep_size]


def test_init_from_a_model_with_other_expert_sizes_is_refused(zero2_export: Path, zero2_ep2_run: Run,
                                                              tmp_path: Path) -> None:
    exp = experiment(expert_sizes=[32, 64, 96, 160])
    exp["run"].update(init_from=str(zero2_export))
    proc = launch(tmp_path, "zero2_offload", zero2_ep2_run.cache, exp=exp).proc
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert text.count("moe.expert_sizes: source [32, 64, 96, 128], this model [32, 64, 96, 160]") == 1, text[-3000:]
    assert "Traceback" not in text


def eval_cli(path: Path, cache: Path, *extra: str) -> dict:
    out = path.parent / f"eval_{path.name}_{len(extra)}.json"
    proc = run([sys.executable, "run/eval.py", str(path), "--output", str(out), *extra], environment(cache))
    assert proc.returncode == 0, output(proc)
    assert "token fraction per expert" in proc.stdout and "activated params per token" in proc.stdout
    return json.loads(out.read_text())


def test_eval_of_a_zero3_expert_parallel_checkpoint_in_one_process(zero3_ep2_run: Run) -> None:
    """Trained on 2 ranks with EP=2 under ZeRO-3; evaluated by one process: the training run's final loss."""
    result = eval_cli(zero3_ep2_run.out, zero3_ep2_run.cache)
    assert result["step"] == STEPS
    assert result["loss"] == pytest.approx(val_loss(zero3_ep2_run.metrics(), STEPS), rel=RTOL)
    assert [layer["expert_sizes"] for layer in result["moe_layers"]] == [[32, 64, 96, 128]] * 2


def test_eval_of_an_hf_export(zero2_export: Path, zero2_ep2_run: Run) -> None:
    result = eval_cli(zero2_export, zero2_ep2_run.cache, "--config", str(zero2_ep2_run.out / "experiment.yaml"))
    assert result["loss"] == pytest.approx(val_loss(zero2_ep2_run.metrics(), STEPS), rel=RTOL)


def test_export_never_replaces_its_own_source(zero2_ep2_run: Run) -> None:
    """--force onto the run (or a parent of it) would delete the checkpoints being exported."""
    for target in (zero2_ep2_run.out, zero2_ep2_run.out.parent):
        with pytest.raises(CheckpointError, match="is or contains the source"):
            export_hf(zero2_ep2_run.out, target, overwrite=True)
    assert (zero2_ep2_run.out / "checkpoints" / f"step_{STEPS}" / "hmoe_complete.json").is_file()
