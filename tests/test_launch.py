"""hmoe_ds.launch: pre-flight checks before any worker starts, then exec of the deepspeed runner (mocked here)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from hmoe_ds import launch
from tests.test_train_e2e import DS_CONFIG, EXPERIMENT

RUNNER = str(Path(sys.executable).parent / "deepspeed")


class Execd(Exception):
    """Raised by the mocked os.execv so main() stops where the real one would be replaced."""


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(EXPERIMENT), encoding="utf-8")
    (tmp_path / "ds.json").write_text(json.dumps(DS_CONFIG), encoding="utf-8")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # restored after the test: main() prepends the venv's bin
    monkeypatch.delenv("MASTER_PORT", raising=False)
    return tmp_path


@pytest.fixture
def execv(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    calls: list[tuple[str, list[str]]] = []

    def fake(path: str, args: list[str]) -> None:
        calls.append((path, list(args)))
        raise Execd

    monkeypatch.setattr(os, "execv", fake)
    return calls


def train_args(tmp: Path, *extra: str) -> list[str]:
    return ["run/train.py", "--config", str(tmp / "exp.yaml"), "--deepspeed_config", str(tmp / "ds.json"),
            "--set", f"run.output_dir={tmp / 'out'}", *extra]


def hostfile(tmp: Path, text: str) -> str:
    (tmp / "hostfile").write_text(text, encoding="utf-8")
    return str(tmp / "hostfile")


def run_main(argv: list[str]) -> int | None:
    try:
        return launch.main(argv)
    except Execd:
        return None


def test_bad_hostfile_line_is_named_and_nothing_starts(files: Path, execv: list, capsys) -> None:
    hf = hostfile(files, "localhost slots=2\nworker-2 8\n")
    assert run_main(["--hostfile", hf, "--launcher", "openmpi", *train_args(files)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {hf}:2: bad line 'worker-2 8'; expected '<hostname> slots=<n>', e.g. 'worker-1 slots=8'"
    assert execv == []


def test_missing_hostfile_is_an_error_not_a_local_run(files: Path, execv: list, capsys) -> None:
    assert run_main(["--hostfile", str(files / "nope"), *train_args(files)]) == 2
    assert "does not exist" in capsys.readouterr().err and execv == []


def test_ep_size_must_divide_the_world_size_of_the_hostfile(files: Path, execv: list, capsys) -> None:
    hf = hostfile(files, "node-a slots=2\nnode-b slots=1\n")
    argv = ["--hostfile", hf, *train_args(files, "model.moe.ep_size=2")]
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert "model.moe.ep_size=2 does not divide the world size (3)" in err and err.count("error:") == 1
    assert execv == []
    assert not (files / "out").exists()


def test_include_narrows_the_world(files: Path, execv: list, capsys) -> None:
    """node-a:0,1@node-b leaves 2 + 4 = 6 ranks: ep_size 4 does not divide it, ep_size 2 does."""
    hf = hostfile(files, "node-a slots=4\nnode-b slots=4\n")
    base = ["--hostfile", hf, "--include", "node-a:0,1@node-b", "--master_port", "29777"]
    assert run_main([*base, *train_args(files, "model.moe.ep_size=4")]) == 2
    assert "does not divide the world size (6)" in capsys.readouterr().err
    assert run_main([*base, *train_args(files, "model.moe.ep_size=2")]) is None
    assert "checks passed (6 ranks)" in capsys.readouterr().out


def test_batch_arithmetic_is_checked_for_that_world(files: Path, execv: list, capsys) -> None:
    (files / "ds.json").write_text(json.dumps({**DS_CONFIG, "train_batch_size": 16}), encoding="utf-8")
    hf = hostfile(files, "localhost slots=4\n")
    assert run_main(["--hostfile", hf, *train_args(files)]) == 2  # 4 x 2 x 4 = 32, not 16
    assert "train_batch_size=16 != train_micro_batch_size_per_gpu (4)" in capsys.readouterr().err


def test_mpi_launcher_refuses_resource_filters(files: Path, execv: list, capsys) -> None:
    hf = hostfile(files, "localhost slots=2\n")
    assert run_main(["--hostfile", hf, "--launcher", "openmpi", "--num_gpus", "1", *train_args(files)]) == 2
    assert "--launcher openmpi runs every slot of the hostfile" in capsys.readouterr().err


def test_good_input_execs_the_runner_with_the_same_arguments(files: Path, execv: list) -> None:
    hf = hostfile(files, "localhost slots=2\n")
    argv = ["--hostfile", hf, "--no_ssh_check", "--force_multi", "--master_addr", "127.0.0.1",
            *train_args(files, "model.moe.ep_size=2")]
    assert run_main(argv) is None
    assert execv == [(RUNNER, [RUNNER, *argv])]  # pdsh (default launcher): untouched
    assert os.environ["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_openmpi_gets_the_master_port_forwarded(files: Path, execv: list) -> None:
    hf = hostfile(files, "localhost slots=2\n")
    head = ["--hostfile", hf, "--no_ssh_check", "--force_multi", "--master_addr", "127.0.0.1",
            "--master_port", "29612", "--launcher", "openmpi"]
    assert run_main([*head, "--launcher_args", "--allow-run-as-root --oversubscribe", *train_args(files)]) is None
    assert execv[-1][1] == [RUNNER, *head, "--launcher_args", "--allow-run-as-root --oversubscribe -x MASTER_PORT",
                            *train_args(files)]
    assert os.environ["MASTER_PORT"] == "29612"
    assert run_main([*head, *train_args(files)]) is None  # no --launcher_args: added before the script
    assert execv[-1][1] == [RUNNER, *head, "--launcher_args", "-x MASTER_PORT", *train_args(files)]


def test_other_scripts_get_the_hostfile_check_only(files: Path, execv: list) -> None:
    hf = hostfile(files, "localhost slots=3\n")
    assert run_main(["--hostfile", hf, "run/eval.py", "--checkpoint", "x"]) is None
    assert execv[-1][1][-2:] == ["--checkpoint", "x"]


def test_local_world_from_num_accelerators(files: Path, execv: list, capsys) -> None:
    assert run_main(["--num_accelerators", "3", *train_args(files, "model.moe.ep_size=2")]) == 2
    assert "does not divide the world size (3)" in capsys.readouterr().err
    assert run_main(["--num_accelerators", "2", *train_args(files, "model.moe.ep_size=2")]) is None


def test_no_arguments_prints_usage(capsys) -> None:
    assert launch.main([]) == 2
    assert "python -m hmoe_ds.launch" in capsys.readouterr().err


def test_defect3_empty_experiment_is_refused_before_the_runner(files: Path, execv: list, capsys) -> None:
    """Defect 3 through python -m hmoe_ds.launch (tests/test_robustness.py covers plain deepspeed)."""
    (files / "exp.yaml").write_text("", encoding="utf-8")
    argv = ["--num_accelerators", "2", "run/train.py", "--config", str(files / "exp.yaml"), "--deepspeed_config",
            str(files / "ds.json")]
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert "missing: model.hidden_size, model.num_hidden_layers, model.moe.expert_sizes, run.output_dir" in err
    assert execv == []


def test_defect5_an_output_dir_held_by_a_live_run_is_refused_before_the_runner(files: Path, execv: list,
                                                                               capsys) -> None:
    from hmoe_ds.training.rundir_lock import RunDirLock

    lock = RunDirLock(files / "out")
    lock.acquire("another run")
    try:
        assert run_main(["--num_accelerators", "2", *train_args(files)]) == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and "in use by another run" in err and execv == []
    finally:
        lock.release()
    assert run_main(["--num_accelerators", "2", *train_args(files)]) is None


def test_entry_points_build_deepspeeds_ops_with_this_environments_ninja(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another ``ninja`` first on PATH (plain ``mpirun .venv/bin/python run/train.py``): the venv's bin goes first.

    DeepSpeed's op builds run ``ninja`` from PATH; two ninja versions cannot read each other's build log, so
    each switch rebuilt the ops from scratch (test_multinode's plain-mpirun run took 90 s instead of 15 s).
    """
    from hmoe_ds.env import use_this_environments_ninja

    own = Path(sys.executable).parent / "ninja"
    if not own.is_file():
        pytest.skip("this environment has no ninja of its own")
    other = tmp_path / "bin"
    other.mkdir()
    (other / "ninja").write_text("#!/bin/sh\nexit 0\n")
    (other / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", f"{other}{os.pathsep}/usr/bin{os.pathsep}/bin")
    use_this_environments_ninja()
    assert os.environ["PATH"] == f"{own.parent}{os.pathsep}{other}{os.pathsep}/usr/bin{os.pathsep}/bin"
    use_this_environments_ninja()  # already first: PATH unchanged
    assert os.environ["PATH"].split(os.pathsep).count(str(own.parent)) == 1
