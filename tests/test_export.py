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


@pytest.fixture(scope="module")
def zero2_export(zero2_ep2_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("export") / "hf"
    proc = export_cli(zero2_ep2_run.out, target, zero2_ep2_run.cache)
    assert proc.returncode == 0, output(proc)
    assert "logits match the training engine" in proc.stdout
    return target


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
