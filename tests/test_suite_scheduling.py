"""The suite's own scheduling on pytest-xdist workers (``run/test.sh`` runs it on 2).

A launched training run shared by several tests (a session fixture of :data:`tests.conftest.SESSION_RUNS`,
or a test module's own module-scoped fixture) is set up once per worker that runs one of its tests. If the
grouping silently stops working (it did, with pytest 9.2 and pytest-xdist 3.8), every such run is launched
on both workers: the suite still passes and takes twice as long. Here a small pytest-xdist session, with
this suite's ``conftest.py`` as a plugin, records which worker ran each test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import SESSION_RUNS

REPO = Path(__file__).resolve().parents[1]

MODULE_WITH_A_SHARED_RUN = '''
import json, os, pytest

def record(request):
    with open(os.environ["RECORD"], "a") as f:
        f.write(json.dumps([request.node.nodeid.split("@")[0], os.environ["PYTEST_XDIST_WORKER"]]) + "\\n")

@pytest.fixture(scope="session")
def {session_run}():
    return "stands in for a launched run shared by several modules"

@pytest.fixture(scope="module")
def trained():
    return "stands in for this module's launched run"

@pytest.mark.parametrize("i", range(6))
def test_uses_the_module_run(trained, i, request):
    record(request)

@pytest.mark.parametrize("i", range(2))
def test_uses_the_session_run({session_run}, i, request):
    record(request)

@pytest.mark.slow
@pytest.mark.parametrize("i", range(8))
def test_alone(i, request):
    record(request)
'''


@pytest.mark.slow
def test_tests_of_one_shared_run_share_a_worker_and_long_units_go_first(tmp_path: Path) -> None:
    session_run = sorted(SESSION_RUNS)[0]
    for name in ("test_first.py", "test_second.py"):
        (tmp_path / name).write_text(MODULE_WITH_A_SHARED_RUN.format(session_run=session_run))
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n    distributed: ranks\n"
                                         "    xdist_group(name): group\n")
    record = tmp_path / "record.jsonl"
    env = {**os.environ, "RECORD": str(record), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q", "-n", "2",
         "--dist", "loadgroup", "--no-loadscope-reorder", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(runs) == 2 * (6 + 2 + 8)

    def workers(part: str) -> set[str]:
        return {gw for nodeid, gw in runs if part in nodeid}

    for module in ("test_first.py", "test_second.py"):
        assert len(workers(f"{module}::test_uses_the_module_run")) == 1, runs
    assert len(workers("::test_uses_the_session_run")) == 1, runs  # one group across both modules
    assert workers("::test_alone") == {"gw0", "gw1"}, runs  # lone tests are spread over both workers
    # The groups (6 and 4 tests, none slow) come after the 16 lone slow tests, which go first.
    order = {gw: [nodeid for nodeid, g in runs if g == gw] for gw in ("gw0", "gw1")}
    for nodeids in order.values():
        firsts = [n for n in nodeids if "test_alone" in n]
        assert nodeids[:len(firsts)] == firsts, nodeids
