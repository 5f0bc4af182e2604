"""Zero-shot multiple-choice evaluation through lm-evaluation-harness (``run/zero_shot.py``).

The shipped offline tasks (``hmoe_ds/eval_tasks``) over BIG-bench data taken from
the ``bigbench`` sdist on PyPI; the harness end to end on a trained tiny model,
from a checkpoint (exported on the way) on 2 processes and from the export on 1,
and on a copy of the export with perturbed weights.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from hmoe_ds.eval_tasks import (BIGBENCH_TASKS, GROUP, TASK_DIR, TASK_NAMES, EvalDataMissing, _examples,
                                _write_task, prepare_bigbench, task_file)

from .checkpoint_runs import Run
from .distributed import free_port
from .launcher import DEEPSPEED, environment, output, run

pytest.importorskip("lm_eval", reason='the eval extra: pip install "hmoe-ds[eval]" (run/setup.sh installs it)')

#: Examples per task in the end-to-end runs (the harness's --limit): small enough for CPU, enough to move.
LIMIT = 20


def test_task_json_becomes_query_choices_and_gold() -> None:
    task = {"task_prefix": "Answer.\n",
            "examples": [{"input": " Is ice cold? ", "target_scores": {"No": 0, "Yes": 1}},
                         {"input": "Two right?", "target_scores": {"a": 1, "b": 1}},   # two correct: left out
                         {"input": "None right?", "target_scores": {"a": 0, "b": 0}}]}  # none correct: left out
    rows = list(_examples(task))
    assert rows == [{"query": "Answer.\n\nQ: Is ice cold?\nA:", "choices": ["No", "Yes"], "gold": 1}]
    custom = {"example_input_prefix": "\n", "example_output_prefix": "\nThe above reasoning is ",
              "examples": [{"input": "X.", "target_scores": {"correct": 1, "incorrect": 0}}]}
    assert list(_examples(custom))[0]["query"] == "X.\nThe above reasoning is"


def test_other_task_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(EvalDataMissing, match="sha256"):
        _write_task("social_iqa", json.dumps({"examples": []}).encode(), tmp_path)
    assert not (tmp_path / "social_iqa.jsonl").exists()


def test_missing_data_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HMOE_EVAL_DATA", str(tmp_path))
    with pytest.raises(EvalDataMissing, match=r"--prepare_data"):
        task_file("winowhy")


@pytest.mark.slow  # the harness indexes its ~10,000 task YAMLs first
def test_shipped_tasks_register_with_the_harness() -> None:
    from lm_eval.tasks import TaskManager

    names = set(TaskManager(include_path=str(TASK_DIR)).all_tasks)
    assert {GROUP, *TASK_NAMES} <= names


def test_shipped_tasks_alone_skip_the_harness_index_and_bad_tasks_are_refused_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only shipped tasks: the index holds just them (the harness's ~15k YAMLs cost ~10 s to index)."""
    from hmoe_ds.zero_shot import ZeroShotError, _task_manager, check_tasks

    assert set(_task_manager([GROUP]).all_tasks) == {GROUP, *TASK_NAMES}
    assert set(_task_manager(TASK_NAMES[:1]).all_tasks) == {GROUP, *TASK_NAMES}

    class Index:  # the harness's index, as check_tasks reads it
        all_tasks = [GROUP, *TASK_NAMES, "piqa"]

    monkeypatch.setenv("HMOE_EVAL_DATA", str(tmp_path))
    (tmp_path / "winowhy.jsonl").write_text("{}\n")
    check_tasks(["piqa", "hmoe_bigbench_winowhy"], Index())  # harness task + a shipped one with its data
    with pytest.raises(ZeroShotError, match=r"unknown task\(s\) no_such_task, hella: .*shipped offline: hmoe_bigbench"):
        check_tasks(["piqa", "no_such_task", "hella"], Index())
    with pytest.raises(ZeroShotError, match=r"social_iqa.jsonl is missing: .*--prepare_data"):
        check_tasks([GROUP], Index())  # the group needs every task's data
    with pytest.raises(ZeroShotError, match=r"strategyqa.jsonl is missing"):
        check_tasks(["hmoe_bigbench_strategyqa"], Index())


@pytest.fixture(scope="module")
def eval_data() -> Path:
    """The prepared task data (run/setup.sh prepares them; a no-op then, else fetched from PyPI once)."""
    from hmoe_ds.eval_tasks import data_dir

    counts = prepare_bigbench()
    # Every example of the pinned sdist but one (general_knowledge has one with no single correct choice).
    assert counts == {"social_iqa": 1954, "physical_intuition": 81, "winowhy": 2865, "strategyqa": 2290,
                      "general_knowledge": 69}
    return data_dir()


def test_prepared_data_are_the_tasks_examples(eval_data: Path) -> None:
    for task in BIGBENCH_TASKS:
        rows = [json.loads(line) for line in task_file(task, eval_data).read_text(encoding="utf-8").splitlines()]
        assert rows and all(0 <= r["gold"] < len(r["choices"]) and r["query"] for r in rows), task
        assert all(len(r["choices"]) >= 2 for r in rows), task


def zero_shot(args: list[str], env: dict[str, str], ranks: int = 1):
    launcher = ([str(DEEPSPEED), "--num_accelerators", str(ranks), "--master_port", str(free_port())]
                if ranks > 1 else [sys.executable])
    return run([*launcher, "run/zero_shot.py", *args], env, timeout=900)


def read(path: Path) -> dict[str, dict[str, float]]:
    return json.loads(path.read_text(encoding="utf-8"))


def check_accuracies(summary: dict, processes: int) -> None:
    assert summary["processes"] == processes and summary["num_fewshot"] == 0
    assert set(summary["tasks"]) == {GROUP, *TASK_NAMES}
    for name in TASK_NAMES:
        row = summary["tasks"][name]
        assert row["examples"] == LIMIT, name
        for metric in ("acc", "acc_norm"):
            assert 0.0 <= row[metric] <= 1.0, (name, row)
            assert row[f"{metric}_stderr"] is not None and row[f"{metric}_stderr"] >= 0, (name, row)


def perturbed_copy(export: Path, target: Path) -> None:
    """The export with every weight moved by Gaussian noise of its own scale (same files otherwise)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(export, target)
    gen = torch.Generator().manual_seed(1)
    weights = load_file(str(export / "model.safetensors"))
    noisy = {name: (w + w.float().std().nan_to_num(0.02) * torch.randn(w.shape, generator=gen)).to(w.dtype)
             for name, w in weights.items()}
    save_file(noisy, str(target / "model.safetensors"), metadata={"format": "pt"})


def export_copy(export: Path, target: Path) -> Path:
    """A copy of the session's export (``tests/conftest.py``): zero-shot writes its results next to the model."""
    shutil.copytree(export, target)
    return target


@pytest.mark.slow
@pytest.mark.distributed
def test_zero_shot_of_a_checkpoint_and_its_export_on_1_and_2_processes(zero2_ep2_run: Run, zero2_export: Path,
                                                                       eval_data: Path, tmp_path: Path) -> None:
    """2 ranks on the checkpoint (rank 0 exports it to a temporary directory), 1 on its export (run/export.py):
    the same accuracies, in [0, 1]; a copy of the export with perturbed weights: other accuracies."""
    scratch = tmp_path / "scratch"  # TMPDIR of the checkpoint run: its temporary export must be gone after
    scratch.mkdir()
    common = ["--limit", str(LIMIT), "--batch_size", "8"]
    proc = zero_shot([str(zero2_ep2_run.out), "--output", str(tmp_path / "ckpt.json"), *common],
                     environment(zero2_ep2_run.cache, HMOE_EVAL_DATA=str(eval_data), TMPDIR=str(scratch)), ranks=2)
    assert proc.returncode == 0, output(proc)
    assert not list(scratch.glob("hmoe-zero-shot-*")), list(scratch.iterdir())  # (torch leaves its own caches)
    two = read(tmp_path / "ckpt.json")
    check_accuracies(two, processes=2)
    assert two["source"] == "checkpoint"
    for name in TASK_NAMES:  # the printed table: one row per task
        assert name in proc.stdout

    env = environment(zero2_ep2_run.cache, HMOE_EVAL_DATA=str(eval_data))
    export = export_copy(zero2_export, tmp_path / "export")
    proc = zero_shot([str(export), *common], env)
    assert proc.returncode == 0, output(proc)
    one = read(export / "zero_shot.json")  # default output: next to the export
    check_accuracies(one, processes=1)
    assert one["source"] == "export"
    for name in TASK_NAMES:
        for metric in ("acc", "acc_norm"):
            # Same model, same requests: the 2 ranks scored disjoint halves. Batches differ, so a near-tie may
            # resolve the other way in float32: at most one example per task.
            assert abs(one["tasks"][name][metric] - two["tasks"][name][metric]) <= 1 / LIMIT + 1e-9, name

    perturbed_copy(export, tmp_path / "perturbed")
    proc = zero_shot([str(tmp_path / "perturbed"), *common], env)
    assert proc.returncode == 0, output(proc)
    other = read(tmp_path / "perturbed" / "zero_shot.json")
    check_accuracies(other, processes=1)
    moved = sum(abs(other["tasks"][n][m] - one["tasks"][n][m]) for n in TASK_NAMES for m in ("acc", "acc_norm"))
    assert moved > 0, "the accuracies do not depend on the weights"


@pytest.mark.slow
def test_unknown_task_and_missing_data_are_one_line_errors(eval_data: Path, tmp_path: Path) -> None:
    """Task names and task data are checked before the model: a path that is no model is not reached."""
    proc = zero_shot([str(tmp_path / "no_model"), "--tasks", "no_such_task", "--limit", "2"],
                     environment(tmp_path / "cache", HMOE_EVAL_DATA=str(eval_data)))
    assert proc.returncode == 2 and "error: unknown task(s) no_such_task" in proc.stderr, output(proc)
    assert "Traceback" not in proc.stderr and "no_model" not in proc.stderr
    proc = zero_shot([str(tmp_path / "no_model"), "--limit", "2"],
                     environment(tmp_path / "cache", HMOE_EVAL_DATA=str(tmp_path / "nowhere")))
    assert proc.returncode == 2 and "--prepare_data" in proc.stderr and "Traceback" not in proc.stderr, output(proc)
