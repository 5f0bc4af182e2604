"""Checkpoints that survive faults: exact resume, SIGKILL during a step and during a save, bad checkpoints.

Through the deepspeed launcher on 2 CPU ranks (tests/checkpoint_runs.py): a
tiny HMoE with EP=2 and balanced placement trains 6 steps, saving at steps 3
and 6, under ZeRO-2 + CPU offload and under ZeRO-3. A second run of the same
experiment loses rank 1 to SIGKILL (the trainer's test hooks) and is restarted
with ``--resume``; every step it logs must equal the uninterrupted run's
*bitwise* (CPU, same ranks, same data order, RNG states and DeepSpeedCPUAdam's
bias-correction state restored). Each launch is bounded in time and its whole
process group is killed afterwards.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from hmoe_ds.checkpoint import (
    MARKER,
    CheckpointError,
    check_compatible,
    checkpoint_info,
    find_resume_checkpoint,
    read_latest,
    verify_checkpoint,
)

from .checkpoint_runs import SAVE_EVERY, STEPS, Run, experiment, launch, train_losses
from .launcher import output, scalars

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def assert_same_steps(resumed: Run, reference: Run) -> None:
    """metrics.jsonl: every step once, equal to the reference bitwise; TensorBoard: every step once."""
    got, want = train_losses(resumed.metrics()), train_losses(reference.metrics())
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    for step in range(1, STEPS + 1):
        assert got[step] == want[step], f"step {step} differs after resume"
    board = scalars(resumed.out / "tensorboard" / "tiny")  # the crashed branch's points are purged
    assert [step for step, _ in board["train/lm_loss"]] == list(range(1, STEPS + 1))
    assert [value for _, value in board["train/lm_loss"]] == pytest.approx([got[s]["train/lm_loss"] for s in got])


def digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_sigkill_during_a_step_then_resume_is_bitwise_identical(zero2_ep2_run: Run, zero2_sigkilled_run) -> None:
    """ZeRO-2 + CPU offload, EP=2: rank 1 dies inside step 5; --resume continues from step 3.

    The crashed run is the session's (``tests/conftest.py``; ``tests/test_clean_exit.py`` checks its /dev/shm).
    """
    crashed, _ = zero2_sigkilled_run
    assert crashed.proc.returncode != 0, output(crashed.proc)
    assert "SIGKILL during step 5" in crashed.proc.stdout + crashed.proc.stderr
    checkpoints = crashed.out / "checkpoints"
    assert read_latest(checkpoints) == f"step_{SAVE_EVERY}"
    assert not (checkpoints / f"step_{STEPS}").exists()

    resumed = launch(crashed.tmp, "zero2_offload", zero2_ep2_run.cache, "--resume")
    assert resumed.proc.returncode == 0, output(resumed.proc)
    assert f"resumed from {checkpoints / f'step_{SAVE_EVERY}'} at step {SAVE_EVERY}" in resumed.proc.stdout
    assert_same_steps(resumed, zero2_ep2_run)
    assert read_latest(checkpoints) == f"step_{STEPS}"


def test_sigkill_during_a_save_keeps_the_previous_checkpoint_and_resumes_exactly(
        zero3_ep2_run: Run, tmp_path: Path) -> None:
    """ZeRO-3, EP=2: rank 1 dies after DeepSpeed wrote its first file of the step-6 save."""
    crashed = launch(tmp_path, "zero3", zero3_ep2_run.cache,
                     env={"HMOE_DS_TEST_KILL_DURING_SAVE": str(STEPS), "HMOE_DS_TEST_KILL_RANK": "1"})
    assert crashed.proc.returncode != 0, output(crashed.proc)
    assert f"during the save of step {STEPS}" in crashed.proc.stdout + crashed.proc.stderr
    checkpoints = crashed.out / "checkpoints"
    partial = checkpoints / f"step_{STEPS}"
    assert partial.is_dir() and not (partial / MARKER).exists()
    assert read_latest(checkpoints) == f"step_{SAVE_EVERY}"  # never points at the incomplete save
    info, notes = find_resume_checkpoint(checkpoints)
    assert info is not None and info.tag == f"step_{SAVE_EVERY}"
    assert any(f"step_{STEPS}" in note and "interrupted" in note for note in notes), notes
    verify_checkpoint(checkpoints / f"step_{SAVE_EVERY}")  # still whole

    resumed = launch(tmp_path, "zero3", zero3_ep2_run.cache, "--resume")
    assert resumed.proc.returncode == 0, output(resumed.proc)
    assert f"at step {SAVE_EVERY}" in resumed.proc.stdout
    assert_same_steps(resumed, zero3_ep2_run)
    verify_checkpoint(partial)  # re-saved whole over the interrupted directory


def test_resume_from_a_named_older_checkpoint_branches_exactly(zero2_ep2_run: Run, tmp_path: Path) -> None:
    """--resume step_3 on a finished run: steps 4-6 again, bit for bit; the old step_6 is set aside, not lost."""
    run_dir = tmp_path / "copy"
    shutil.copytree(zero2_ep2_run.tmp, run_dir, ignore=shutil.ignore_patterns("cache"))
    old_final = digest(run_dir / "out" / "checkpoints" / f"step_{STEPS}")
    resumed = launch(run_dir, "zero2_offload", zero2_ep2_run.cache, "--resume", f"step_{SAVE_EVERY}")
    assert resumed.proc.returncode == 0, output(resumed.proc)
    assert f"at step {SAVE_EVERY}" in resumed.proc.stdout and "moved step_6" in resumed.proc.stderr
    assert_same_steps(resumed, zero2_ep2_run)
    (aside,) = list((run_dir / "out" / "checkpoints_set_aside").iterdir())
    assert digest(aside / f"step_{STEPS}") == old_final
    assert read_latest(run_dir / "out" / "checkpoints") == f"step_{STEPS}"


def test_resume_with_other_expert_sizes_is_refused_before_training(zero2_ep2_run: Run, tmp_path: Path) -> None:
    """One message from rank 0 naming the mismatch; nothing in the run directory changes (no file rewritten,
    no later checkpoint moved aside, no metric dropped)."""
    run_dir = tmp_path / "copy"
    shutil.copytree(zero2_ep2_run.tmp, run_dir, ignore=shutil.ignore_patterns("cache"))
    before = digest(run_dir / "out")
    exp = experiment(expert_sizes=[32, 64, 96, 160])
    exp["run"]["train_steps"] = STEPS + 2
    proc = launch(run_dir, "zero2_offload", zero2_ep2_run.cache, "--resume", f"step_{SAVE_EVERY}", exp=exp).proc
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert text.count("this checkpoint does not fit the run") == 1, text[-3000:]  # rank 0 only
    assert "MoE layer 0 expert_sizes: checkpoint [32, 64, 96, 128], this run [32, 64, 96, 160]" in text
    assert "Traceback" not in text
    assert digest(run_dir / "out") == before


# --------------------------------------------------------------------------- damaged and foreign checkpoints


@pytest.fixture()
def checkpoint_copy(zero2_ep2_run: Run, tmp_path: Path) -> Path:
    """A copy of the reference run's checkpoints/ directory to damage."""
    target = tmp_path / "checkpoints"
    shutil.copytree(zero2_ep2_run.out / "checkpoints", target)
    return target


def expert_file(tag_dir: Path) -> Path:
    files = sorted(tag_dir.glob("layer_*_expert_*_model_states.pt"))
    assert len(files) == 2 * 4, [p.name for p in tag_dir.iterdir()]  # 2 MoE layers x 4 experts, one file each
    return files[0]


def test_a_truncated_expert_file_is_named_and_never_silently_skipped(checkpoint_copy: Path) -> None:
    """--resume refuses the damaged newest checkpoint with a note naming the file and takes the previous one;
    --resume naming the damaged one is an error."""
    victim = expert_file(checkpoint_copy / f"step_{STEPS}")
    victim.write_bytes(victim.read_bytes()[:100])
    info, notes = find_resume_checkpoint(checkpoint_copy)
    assert info is not None and info.tag == f"step_{SAVE_EVERY}"
    assert any(f"marked complete but damaged: truncated or changed {victim.name}" in note for note in notes), notes
    with pytest.raises(CheckpointError, match=rf"truncated or changed {victim.name}.*--resume step_{SAVE_EVERY}"):
        checkpoint_info(checkpoint_copy, f"step_{STEPS}")


def test_a_missing_expert_file_is_named(checkpoint_copy: Path) -> None:
    victim = expert_file(checkpoint_copy / f"step_{STEPS}")
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"missing {victim.name}"):
        verify_checkpoint(checkpoint_copy / f"step_{STEPS}")


def test_foreign_and_interrupted_directories(checkpoint_copy: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "pytorch_model.bin").write_bytes(b"not ours")
    with pytest.raises(CheckpointError, match="not an hmoe-ds checkpoint"):
        verify_checkpoint(foreign)
    (checkpoint_copy / f"step_{STEPS}" / MARKER).unlink()  # as if the save had been interrupted
    with pytest.raises(CheckpointError, match="the save was interrupted"):
        verify_checkpoint(checkpoint_copy / f"step_{STEPS}")
    info, notes = find_resume_checkpoint(checkpoint_copy)
    assert info is not None and info.tag == f"step_{SAVE_EVERY}" and notes


def test_marker_records_placement_and_refuses_other_layouts(zero2_ep2_run: Run) -> None:
    from hmoe_ds.modeling import HMoEConfig

    tag_dir = zero2_ep2_run.out / "checkpoints" / f"step_{STEPS}"
    marker = verify_checkpoint(tag_dir)
    assert marker["world_size"] == 2 and marker["zero_stage"] == 2 and marker["step"] == STEPS
    (layer0, layer1) = marker["moe_layers"]
    assert layer0["ep_size"] == 2 and layer0["expert_sizes"] == [32, 64, 96, 128]
    # balanced placement pairs the largest expert with the smallest one
    assert sorted(map(sorted, layer0["placement"]["rank_experts"])) == [[0, 3], [1, 2]]
    config = HMoEConfig.from_dict(marker["model_config"])
    assert check_compatible(marker, tag_dir, world_size=2, model_config=config, zero_stage=2) == []  # fits itself
    # Another layout (world size, ZeRO stage, placement) resumes elastically from the shards: listed, not refused.
    relaid = copy.deepcopy(marker["model_config"])
    relaid["moe"].update(placement="contiguous")
    changes = check_compatible(marker, tag_dir, world_size=4, model_config=HMoEConfig.from_dict(relaid), zero_stage=3)
    assert changes == ["world size 2 -> 4", "ZeRO stage 2 -> 3"] + [
        f"MoE layer {layer['layer']} placement {layer['placement']['rank_experts']} -> [[0, 1], [2, 3]]"
        for layer in (layer0, layer1)], changes
    # Another structure is refused, naming every difference.
    other = copy.deepcopy(relaid)
    other["moe"].update(expert_sizes=[32, 64, 96, 160])
    with pytest.raises(CheckpointError) as info:
        check_compatible(marker, tag_dir, world_size=4, model_config=HMoEConfig.from_dict(other), zero_stage=3)
    message = str(info.value)
    for part in ("expert_sizes: checkpoint [32, 64, 96, 128], this run [32, 64, 96, 160]", "run.init_from"):
        assert part in message, message
    # A format-1 checkpoint (no shards) cannot change layout: refused, saying why.
    old_format = {k: v for k, v in marker.items() if k != "shards"}
    with pytest.raises(CheckpointError, match="world size 2 -> 4 .this checkpoint predates elastic resume"):
        check_compatible(old_format, tag_dir, world_size=4, model_config=config, zero_stage=2)
    json.dumps(marker)  # the marker stays plain JSON


def test_parameter_counts_do_not_depend_on_the_zero_stage(zero2_ep2_run: Run, zero3_ep2_run: Run) -> None:
    """ZeRO-3 partitions parameters (empty local tensors): counts must use their full size."""
    def summary_line(run: Run) -> str:
        return next(line for line in run.proc.stdout.splitlines() if "parameters on this rank" in line)

    assert summary_line(zero3_ep2_run) == summary_line(zero2_ep2_run)


def test_damaged_older_checkpoints_do_not_block_resume(checkpoint_copy: Path) -> None:
    """Pruning files from old checkpoints (to free disk) is common: only the chosen one must be whole."""
    expert_file(checkpoint_copy / f"step_{SAVE_EVERY}").unlink()
    info, _ = find_resume_checkpoint(checkpoint_copy)
    assert info is not None and info.tag == f"step_{STEPS}"


def test_set_aside_goes_by_the_saved_step_not_the_name(checkpoint_copy: Path) -> None:
    from hmoe_ds.checkpoint import set_aside_newer_checkpoints

    shutil.copytree(checkpoint_copy / f"step_{STEPS}", checkpoint_copy / "keep_final")
    moved = set_aside_newer_checkpoints(checkpoint_copy, SAVE_EVERY)
    assert len(moved) == 2 and any("keep_final" in note for note in moved)
    info, _ = find_resume_checkpoint(checkpoint_copy)
    assert info is not None and info.tag == f"step_{SAVE_EVERY}"
