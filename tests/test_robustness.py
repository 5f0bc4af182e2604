"""Runs that cannot silently go wrong (issue 11), end to end through ``deepspeed ... run/train.py`` on 2 CPU ranks.

The issue's reproduction set-up: hidden 32, 2 layers, 4 experts [16, 24, 32, 40],
block 32, vocabulary 512, a checkpoint every 5 steps, ZeRO-1, micro-batch 4, 2
ranks. Each defect has a test that failed before the fix: corrupted and
unreadable checkpoints, an empty experiment, signals to the runner alone, two
runs in one directory, non-finite losses, a full disk, bad batch vs data sizes,
a missing hostfile, and the noise of the rank that did not fail. Runs started
in the background (signals, locks) live in their own session, and every
process of it is killed when the test ends.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from hmoe_ds.checkpoint import MARKER, read_latest, verify_checkpoint
from hmoe_ds.integrity import file_digest

from .distributed import free_port
from .launcher import DEEPSPEED, REPO, environment, output, read_metrics, scalars, train, write_configs

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPRO: dict[str, Any] = {
    "model": {
        "vocab_size": "auto", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 64, "dense_intermediate_size": 64, "tie_word_embeddings": True,
        "moe": {"expert_sizes": [16, 24, 32, 40], "routing": "top_p", "top_p": 0.6},
    },
    "data": {"block_size": 32, "vocab_size": 512, "max_chars": 100_000},
    "run": {"run_name": "repro", "train_steps": 10, "log_every": 1, "eval_every": 0, "eval_batches": 2,
            "eval_at_start": False, "save_every": 5, "progress_bar": False},
}
DS: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "steps_per_print": 10**6,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01, "torch_adam": True}},
    "zero_optimization": {"stage": 1},
}
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def experiment(**run: Any) -> dict[str, Any]:
    exp = copy.deepcopy(REPRO)
    exp["run"].update(run)
    return exp


def repro(tmp: Path, cache: Path, *extra: str, exp: dict[str, Any] | None = None, ds: dict[str, Any] = DS,
          env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return train(tmp, *extra, experiment=exp or REPRO, ds=ds, cache=cache, env=env, timeout=timeout)


def text(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def digests(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): file_digest(p) for p in sorted(path.rglob("*")) if p.is_file()}


def losses(out: Path) -> list[Any]:
    return [r["train/lm_loss"] for r in read_metrics(out) if "train/lm_loss" in r]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """10 steps of the reproduction config, checkpoints step_5 and step_10; tests work on copies."""
    tmp = tmp_path_factory.mktemp("repro_base")
    proc = repro(tmp, data_cache)
    assert proc.returncode == 0, output(proc)
    return tmp


def copy_run(base: Path, tmp: Path) -> Path:
    target = tmp / "run"
    shutil.copytree(base, target, ignore=shutil.ignore_patterns("cache"))
    return target


# --------------------------------------------------------------------------- runs in the background


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Background:
    """A ``deepspeed`` run in its own session, output to files; :meth:`kill` ends every process of it."""

    def __init__(self, tmp: Path, cache: Path, *extra: str, exp: dict[str, Any], ds: dict[str, Any] = DS,
                 out: Path | None = None) -> None:
        exp_file, ds_file = write_configs(tmp, exp, ds)
        self.out = out or tmp / "out"
        cmd = [str(DEEPSPEED), "--num_accelerators", "2", "--master_port", str(free_port()), "run/train.py",
               "--config", str(exp_file), "--deepspeed_config", str(ds_file), "--set",
               f"run.output_dir={self.out}", *extra]
        self.log = tmp / f"log.{time.monotonic_ns()}.txt"
        with open(self.log, "w") as handle:
            # SIGINT back to its default in the runner: a shell starts background jobs (`cmd &`, nohup) with
            # SIGINT ignored, and Python keeps an ignored SIGINT ignored, so a suite started that way would
            # give the runner a disposition no interactive user's runner has.
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=environment(cache), stdout=handle,
                                         stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                         preexec_fn=_default_sigint)
        self.pgid = self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def members(self) -> list[int]:
        """Live (not zombie) processes of the run's process group: runner, launcher, ranks."""
        self.proc.poll()  # reap the runner if it ended
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                raw = stat.read_text()
            except OSError:
                continue
            fields = raw[raw.rindex(")") + 2:].split()
            if fields[0] != "Z" and int(fields[2]) == self.pgid:
                pids.append(int(stat.parent.name))
        return pids

    def wait_for_step(self, step: int, timeout: float = 240) -> int:
        """Block until metrics.jsonl records a training step >= ``step``; returns the newest one."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            path = self.out / "metrics.jsonl"
            if path.is_file():
                steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
                if steps and max(steps) >= step:
                    return max(steps)
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended early:\n{self.text()[-4000:]}")
            time.sleep(0.2)
        pytest.fail(f"no step {step} after {timeout}s:\n{self.text()[-4000:]}")

    def wait_gone(self, timeout: float) -> float:
        """Seconds until no process of the run is left; fails after ``timeout``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if not self.members():
                return time.monotonic() - start
            time.sleep(0.1)
        pytest.fail(f"processes {self.members()} still alive {timeout}s later:\n{self.text()[-4000:]}")

    def kill(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


@pytest.fixture()
def background() -> Iterator[list[Background]]:
    runs: list[Background] = []
    yield runs
    for run in runs:
        run.kill()


# --------------------------------------------------------------------------- 1, 2: checkpoints verified by content


def test_defect1_bytes_changed_in_place_are_refused_and_resume_continues_from_the_previous_checkpoint(
        base_run: Path, data_cache: Path, tmp_path: Path) -> None:
    run = copy_run(base_run, tmp_path)
    newest = run / "out" / "checkpoints" / "step_10"
    victim = newest / OPTIM
    with open(victim, "r+b") as handle:  # dd if=/dev/urandom bs=4096 count=1 seek=<middle> conv=notrunc
        handle.seek(victim.stat().st_size // 2)
        handle.write(os.urandom(4096))
    damaged = digests(newest)
    proc = repro(run, data_cache, "--resume", "--set", "run.train_steps=12", exp=experiment())
    assert proc.returncode == 0, output(proc)
    assert f"corrupted {OPTIM} (same size, other bytes" in proc.stderr
    assert f"resumed from {run / 'out' / 'checkpoints' / 'step_5'} at step 5" in proc.stdout
    (aside,) = list((run / "out" / "checkpoints_set_aside").iterdir())
    assert digests(aside / "step_10") == damaged  # set aside as it was, never deleted
    assert all(value is not None and math.isfinite(value) for value in losses(run / "out"))
    assert read_latest(run / "out" / "checkpoints") == "step_12"
    verify_checkpoint(run / "out" / "checkpoints" / "step_10")  # the re-computed step 10, whole


def test_defect2_a_checkpoint_with_an_unreadable_marker_is_set_aside_not_overwritten(
        data_cache: Path, tmp_path: Path) -> None:
    first = repro(tmp_path, data_cache, exp=experiment(train_steps=5))
    assert first.returncode == 0, output(first)
    only = tmp_path / "out" / "checkpoints" / "step_5"
    marker = only / MARKER
    marker.write_bytes(marker.read_bytes()[:100])  # truncated
    before, metrics_before = digests(only), (tmp_path / "out" / "metrics.jsonl").read_bytes()
    proc = repro(tmp_path, data_cache, "--resume", "--set", "run.seed=7", exp=experiment(train_steps=5))
    assert proc.returncode == 0, output(proc)
    assert "unreadable completion marker" in proc.stderr and "moved step_5" in proc.stderr
    (aside,) = list((tmp_path / "out" / "checkpoints_set_aside").iterdir())
    assert digests(aside / "step_5") == before
    assert (aside / "metrics.jsonl").read_bytes() == metrics_before  # the old log kept with its checkpoint
    verify_checkpoint(only)  # the new run's own step 5


# --------------------------------------------------------------------------- 3: empty experiment


def test_defect3_empty_experiment_through_plain_deepspeed_is_refused(data_cache: Path, tmp_path: Path) -> None:
    exp_file, ds_file = write_configs(tmp_path, {}, DS)
    exp_file.write_text("", encoding="utf-8")
    cmd = [str(DEEPSPEED), "--num_accelerators", "2", "--master_port", str(free_port()), "run/train.py",
           "--config", str(exp_file), "--deepspeed_config", str(ds_file)]
    from .launcher import run as run_cmd

    proc = run_cmd(cmd, environment(data_cache), timeout=120)
    assert proc.returncode != 0
    assert text(proc).count("missing: model.hidden_size, model.num_hidden_layers, model.moe.expert_sizes, "
                            "run.output_dir") == 1, text(proc)[-3000:]
    assert "Traceback" not in text(proc) and not (REPO / "outputs" / "exp").exists()


# --------------------------------------------------------------------------- 4: signals to the runner alone


def test_defect4_sigint_to_the_runner_alone_stops_every_rank_within_seconds(
        background: list[Background], data_cache: Path, tmp_path: Path) -> None:
    run = Background(tmp_path, data_cache, exp=experiment(train_steps=100_000, save_every=0, save_on_signal=False))
    background.append(run)
    run.wait_for_step(2)
    os.kill(run.proc.pid, signal.SIGINT)  # the runner only, as `kill -INT <pid>` or a scheduler does
    took = run.wait_gone(timeout=30)
    assert took < 30
    log = run.text()
    assert "stopped after step" in log and "no checkpoint saved (run.save_on_signal is false)" in log, log[-3000:]
    assert not (run.out / "checkpoints").exists()


def test_defect4_sigterm_to_the_runner_alone_saves_a_checkpoint_then_stops(
        background: list[Background], data_cache: Path, tmp_path: Path) -> None:
    run = Background(tmp_path, data_cache, exp=experiment(train_steps=100_000, save_every=0))
    background.append(run)
    run.wait_for_step(2)
    os.kill(run.proc.pid, signal.SIGTERM)
    run.wait_gone(timeout=60)
    log = run.text()
    checkpoints = run.out / "checkpoints"
    tag = read_latest(checkpoints)
    assert tag is not None, log[-3000:]
    marker = verify_checkpoint(checkpoints / tag)  # complete, every file verified
    assert f"stopped after step {marker['step']}" in log and "checkpoint saved" in log, log[-3000:]
    assert marker["step"] >= 2 and max(r["step"] for r in read_metrics(run.out)) == marker["step"]
    assert "Traceback" not in log, log[-3000:]


# --------------------------------------------------------------------------- 5: one run per output directory


def test_defect5_a_second_run_into_the_same_directory_is_refused_and_a_killed_runs_lock_is_taken_over(
        background: list[Background], data_cache: Path, tmp_path: Path) -> None:
    first = Background(tmp_path / "a", data_cache, exp=experiment(train_steps=100_000, save_every=0),
                       out=tmp_path / "out")
    background.append(first)
    first.wait_for_step(1)
    second = repro(tmp_path / "b", data_cache, "--set", f"run.output_dir={tmp_path / 'out'}", "run.seed=99",
                   exp=experiment(train_steps=3), timeout=180)
    assert second.returncode != 0
    assert text(second).count("is in use by another run: pid") == 1, output(second)
    assert "Traceback" not in text(second)
    first.kill()  # SIGKILL: the lock's holder record stays behind, the kernel lock does not
    third = repro(tmp_path / "c", data_cache, "--resume", "--set", f"run.output_dir={tmp_path / 'out'}",
                  exp=experiment(train_steps=2, save_every=0), timeout=180)
    assert third.returncode == 0, output(third)
    assert "ended without releasing it" in third.stderr


# --------------------------------------------------------------------------- 6: non-finite values


def test_defect6_a_nonfinite_loss_stops_the_run_at_that_step_without_saving(
        data_cache: Path, tmp_path: Path) -> None:
    proc = repro(tmp_path, data_cache, exp=experiment(), env={"HMOE_DS_TEST_NONFINITE_AT_STEP": "7"})
    assert proc.returncode != 0
    checkpoints = tmp_path / "out" / "checkpoints"
    assert text(proc).count("error: step 7: non-finite training loss") == 1, output(proc)  # rank 1's NaN, once
    assert f"The run stops here without saving; the last good checkpoint is {checkpoints / 'step_5'}" in text(proc)
    assert "Traceback" not in text(proc)
    assert read_latest(checkpoints) == "step_5"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step_5"]  # nothing saved at or after 7


def test_defect6_skip_mode_drops_the_step_counts_it_and_keeps_finite_checkpoints(
        data_cache: Path, tmp_path: Path) -> None:
    from hmoe_ds.shards import ShardReader

    proc = repro(tmp_path, data_cache, exp=experiment(on_nonfinite="skip"),
                 env={"HMOE_DS_TEST_NONFINITE_AT_STEP": "7"})
    assert proc.returncode == 0, output(proc)
    assert "step 7: non-finite loss or gradient norm; step skipped (1 so far)" in proc.stdout
    records = {r["step"]: r for r in read_metrics(tmp_path / "out") if "train/lm_loss" in r}
    assert records[6]["train/skipped_nonfinite_steps"] == 0 and records[7]["train/skipped_nonfinite_steps"] == 1
    assert all(math.isfinite(records[s]["train/lm_loss"]) for s in (8, 9, 10))  # the weights stayed finite
    board = scalars(tmp_path / "out" / "tensorboard" / "repro")
    assert board["train/skipped_nonfinite_steps"][-1] == (10, 1.0)
    shards = ShardReader(tmp_path / "out" / "checkpoints" / "step_10")
    assert all(bool(shards.get(name).isfinite().all()) for name in shards.shapes())


# --------------------------------------------------------------------------- 7: a full disk inside DeepSpeed's write


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1.9 MB tmpfs: room for the run and one checkpoint of the reproduction model (1.2 MB), not two."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1900k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_defect7_disk_full_in_deepspeeds_own_write_is_named(small_disk: Path, data_cache: Path,
                                                            tmp_path: Path) -> None:
    proc = repro(tmp_path, data_cache, "--set", f"run.output_dir={small_disk / 'out'}", exp=experiment())
    assert proc.returncode != 0
    all_text = text(proc)
    assert "step 10: the checkpoint could not be written to" in all_text and "the disk is full" in all_text, \
        output(proc)
    assert "the last complete checkpoint" in all_text and "step_5" in all_text
    assert "Traceback" not in all_text, output(proc)
    checkpoints = small_disk / "out" / "checkpoints"
    assert read_latest(checkpoints) == "step_5"
    verify_checkpoint(checkpoints / "step_5")


# --------------------------------------------------------------------------- 9, 10: errors without tracebacks


def test_defect9_a_micro_batch_larger_than_the_data_is_one_line_before_the_engine(
        data_cache: Path, tmp_path: Path) -> None:
    proc = repro(tmp_path, data_cache, ds={**DS, "train_micro_batch_size_per_gpu": 1024}, timeout=180)
    assert proc.returncode != 0
    assert text(proc).count("train_micro_batch_size_per_gpu=1024 on 2 ranks: Dataset has") == 1, output(proc)
    assert "Traceback" not in text(proc)
    assert not (tmp_path / "out" / "experiment.yaml").exists()  # refused before anything was written


def test_defect9_a_missing_hostfile_given_to_plain_deepspeed_is_refused(data_cache: Path, tmp_path: Path) -> None:
    """DeepSpeed's runner falls back to local ranks with one warning; the ranks see its command line and refuse."""
    exp_file, ds_file = write_configs(tmp_path, REPRO, DS)
    missing = tmp_path / "no_hostfile"
    cmd = [str(DEEPSPEED), "--hostfile", str(missing), "--num_accelerators", "2", "--master_port", str(free_port()),
           "run/train.py", "--config", str(exp_file), "--deepspeed_config", str(ds_file), "--set",
           f"run.output_dir={tmp_path / 'out'}"]
    from .launcher import run as run_cmd

    proc = run_cmd(cmd, environment(data_cache), timeout=180)
    assert proc.returncode != 0
    assert text(proc).count(f"hostfile {missing} does not exist") == 1, output(proc)
    assert "Traceback" not in text(proc)


@pytest.mark.parametrize(("data", "block", "message"), [
    ({"max_chars": 300}, 32, "only supports a BPE vocabulary of"),  # vocabulary too small for vocab_size 512
    ({"max_chars": 120, "vocab_size": 260}, 64, "is larger than the data allows"),  # corpus too small
])
def test_defect10_a_data_error_on_rank0_is_one_message_without_the_other_ranks_noise(
        tmp_path: Path, data: dict[str, Any], block: int, message: str) -> None:
    exp = experiment()
    exp["data"].update(data, block_size=block)
    proc = repro(tmp_path, tmp_path / "own_cache", exp=exp, timeout=180)
    assert proc.returncode != 0
    all_text = text(proc)
    assert all_text.count(message) == 1, output(proc)
    assert "Traceback" not in all_text and "Connection reset" not in all_text and "Connection closed" not in all_text


def test_defect10_export_of_nan_weights_names_them(base_run: Path, tmp_path: Path) -> None:
    """A checkpoint saved before the guard existed, with NaN weights: export names them instead of 'report it'."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from hmoe_ds.checkpoint import write_marker

    from .launcher import run as run_cmd

    run = copy_run(base_run, tmp_path)
    tag_dir = run / "out" / "checkpoints" / "step_10"
    shard = tag_dir / "hmoe_shard_00000.safetensors"  # rank 0's logical shard: poison its first weight
    with safe_open(str(shard), framework="pt") as handle:
        metadata = handle.metadata()
    weights = load_file(str(shard))
    name = next(k for k in weights if "::" not in k)  # a weight, not an optimizer state
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(shard), metadata=metadata)
    marker = json.loads((tag_dir / MARKER).read_text())
    write_marker(tag_dir, {k: v for k, v in marker.items() if k not in ("format", "version", "files", "saved_at")})
    env = environment(tmp_path / "cache")
    proc = run_cmd([str(DEEPSPEED.parent / "python"), "run/export.py", str(run / "out"), str(tmp_path / "exported")],
                   env, timeout=180)
    assert proc.returncode != 0
    assert "the model's weights hold NaN/Inf" in text(proc) and name in text(proc), text(proc)[-3000:]
    assert "please report it" not in text(proc)
