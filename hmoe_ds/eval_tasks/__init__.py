"""Offline multiple-choice tasks for lm-evaluation-harness, over data that installs from PyPI.

The harness task definitions (``*.yaml`` beside this file) read BIG-bench tasks
from local JSON Lines files; nothing is fetched from a hub at run time. The data
come from the ``task.json`` files of the ``bigbench`` source distribution on PyPI
(version :data:`BIGBENCH_VERSION`, Apache-2.0), extracted once by
:func:`prepare_bigbench` (``run/setup.sh`` does it; ``run/zero_shot.py --prepare_data``
by hand) into :func:`data_dir`, and checked against the SHA-256 sums in
:data:`BIGBENCH_SHA256`.

Each example becomes ``{"query", "choices", "gold"}``: the query is the task's
own zero-shot prompt (``task_prefix`` + input prefix + input + output prefix,
BIG-bench's defaults ``"Q: "`` / ``"A:"`` where the task sets none), the choices
are the keys of ``target_scores`` and ``gold`` the single one scored 1. Examples
without exactly one correct choice are left out (one in ``general_knowledge``).
BIG-bench's ``append_choices_to_input`` is not applied: as in the harness's own
PIQA/ARC tasks, the model scores each choice's log-likelihood without seeing the list.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = ["BIGBENCH_SHA256", "BIGBENCH_TASKS", "BIGBENCH_VERSION", "GROUP", "TASK_DIR", "TASK_NAMES",
           "EvalDataMissing", "check_prepared", "data_dir", "prepare_bigbench", "task_file"]

#: The ``bigbench`` sdist on PyPI whose ``task.json`` files are the data.
BIGBENCH_VERSION = "1.0.0"
#: BIG-bench task -> SHA-256 of its ``bigbench/benchmark_tasks/<task>/task.json`` in that sdist.
BIGBENCH_SHA256: dict[str, str] = {
    "social_iqa": "edc9f568b70ae6d4af0783764dbe4e4f18aa1242c675a93f534338d73a565348",
    "physical_intuition": "dd1e8e8fe97e08d064788eed8fb0f1bd13013d5fa028617bdf418685f4ca726f",
    "winowhy": "c36fa38ab146fd7cc60e9f4b7a34c979c5ffbcb4a6870302bf8d785fbe64d1f6",
    "strategyqa": "60af9081fed20102fd8bb1e02dc7d9f12238efcba33e4c1a56b4d61cb6409803",
    "general_knowledge": "7d8f07136b3539d5555f0452355fed441d94f02edf730745a772f2c612ce3445",
}
BIGBENCH_TASKS: tuple[str, ...] = tuple(BIGBENCH_SHA256)
#: The harness's name of each shipped task, and of the group of all of them.
TASK_NAMES: tuple[str, ...] = tuple(f"hmoe_bigbench_{task}" for task in BIGBENCH_TASKS)
GROUP = "hmoe_bigbench"
#: The directory the harness's TaskManager is pointed at (``include_path``).
TASK_DIR = Path(__file__).resolve().parent

_MEMBER = "bigbench/benchmark_tasks/{task}/task.json"


class EvalDataMissing(RuntimeError):
    """The prepared task data are not there (or not the expected files)."""


def data_dir() -> Path:
    """Where the prepared JSON Lines live: ``$HMOE_EVAL_DATA``, else ``<cache>/eval_data/bigbench-<version>``.

    ``<cache>`` is hmoe-ds's cache root (``$HMOE_DS_CACHE``, else ``~/.cache/hmoe_ds``), as for the corpus.
    """
    if os.environ.get("HMOE_EVAL_DATA"):
        return Path(os.environ["HMOE_EVAL_DATA"]).expanduser()
    root = Path(os.environ.get("HMOE_DS_CACHE") or Path.home() / ".cache" / "hmoe_ds").expanduser()
    return root / "eval_data" / f"bigbench-{BIGBENCH_VERSION}"


def task_file(task: str, root: Path | None = None) -> Path:
    """The prepared JSON Lines file of BIG-bench ``task``; :class:`EvalDataMissing` with the fix when absent."""
    path = (root or data_dir()) / f"{task}.jsonl"
    if not path.is_file():
        raise EvalDataMissing(
            f"{path} is missing: the offline zero-shot tasks are extracted once from the bigbench=="
            f"{BIGBENCH_VERSION} source distribution on PyPI. Run `python run/zero_shot.py --prepare_data` "
            f"(run/setup.sh does it), or set HMOE_EVAL_DATA to a directory prepared elsewhere")
    return path


def check_prepared(tasks: Sequence[str] = BIGBENCH_TASKS, root: Path | None = None) -> None:
    """:class:`EvalDataMissing` (with the fix) unless every BIG-bench task in ``tasks`` has its prepared file."""
    for task in tasks:
        task_file(task, root)


def _examples(task_json: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The task's examples as ``{"query", "choices", "gold"}`` (only those with exactly one correct choice)."""
    prefix = task_json.get("task_prefix", "")
    in_prefix = task_json.get("example_input_prefix", "\nQ: ")
    out_prefix = task_json.get("example_output_prefix", "\nA: ")
    for example in task_json["examples"]:
        scores = example["target_scores"]
        best = max(scores.values())
        if best != 1 or list(scores.values()).count(best) != 1:
            continue
        choices = list(scores)
        query = (prefix + in_prefix + example["input"].strip() + out_prefix).strip()
        yield {"query": query, "choices": choices, "gold": choices.index(next(c for c in choices if scores[c] == best))}


def _write_task(task: str, raw: bytes, dest: Path) -> int:
    digest = hashlib.sha256(raw).hexdigest()
    if digest != BIGBENCH_SHA256[task]:
        raise EvalDataMissing(f"bigbench=={BIGBENCH_VERSION} {_MEMBER.format(task=task)}: sha256 {digest}, "
                              f"expected {BIGBENCH_SHA256[task]} (another release of the package?)")
    rows = list(_examples(json.loads(raw)))
    tmp = dest / f".{task}.jsonl.tmp"
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(dest / f"{task}.jsonl")  # a file appears complete or not at all
    return len(rows)


def _find_task_files(root: Path) -> dict[str, bytes]:
    """The tasks' ``task.json`` bytes from what pip left under ``root`` (an unpacked tree or the archive)."""
    found: dict[str, bytes] = {}
    for task in BIGBENCH_TASKS:
        for path in root.rglob(_MEMBER.format(task=task)):
            found[task] = path.read_bytes()
            break
    for archive in root.rglob(f"bigbench-{BIGBENCH_VERSION}.tar.gz"):
        with tarfile.open(archive) as tar:
            for member in tar:
                for task in BIGBENCH_TASKS:
                    if task not in found and member.name.endswith("/" + _MEMBER.format(task=task)):
                        found[task] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return found


def prepare_bigbench(dest: Path | None = None, *, force: bool = False) -> dict[str, int]:
    """Fetch the ``bigbench`` sdist with pip and extract the tasks' data into ``dest`` (default :func:`data_dir`).

    Idempotent: tasks already prepared are kept unless ``force``. Returns ``{task: examples}``.
    The sdist is fetched with this Python's pip (its configured index, so a mirror works).
    Its ``setup.py`` declares a dependency by direct URL, which pip refuses after
    unpacking it; only the unpacked ``task.json`` files are needed, so pip runs with
    ``--no-clean`` in a private temporary directory and the files are read from there.
    """
    dest = (dest or data_dir()).expanduser()
    todo = [t for t in BIGBENCH_TASKS if force or not (dest / f"{t}.jsonl").is_file()]
    counts: dict[str, int] = {}
    if todo:
        dest.mkdir(parents=True, exist_ok=True)
        # Near dest, not in /tmp: the unpacked sdist is ~1.8 GB (every BIG-bench task).
        tmp = Path(tempfile.mkdtemp(prefix=".bigbench-sdist-", dir=dest))
        try:
            cmd = [sys.executable, "-m", "pip", "download", f"bigbench=={BIGBENCH_VERSION}", "--no-deps",
                   "--no-binary", ":all:", "--no-build-isolation", "--no-clean", "--disable-pip-version-check",
                   "-d", str(tmp / "download")]
            proc = subprocess.run(cmd, env=dict(os.environ, TMPDIR=str(tmp)), capture_output=True, text=True)
            found = _find_task_files(tmp)
            missing = [t for t in todo if t not in found]
            if missing:
                raise EvalDataMissing(
                    f"could not get {', '.join(missing)} from bigbench=={BIGBENCH_VERSION} "
                    f"({' '.join(cmd)} exited {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")
            for task in todo:
                counts[task] = _write_task(task, found[task], dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for task in BIGBENCH_TASKS:
        if task not in counts:
            with task_file(task, dest).open(encoding="utf-8") as fh:
                counts[task] = sum(1 for _ in fh)
    return counts
