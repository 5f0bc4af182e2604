"""``hmoe_ds.training.memlog``: off by default (writes nothing), one JSON line per mark when switched on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Allocates ~64 MiB between two marks, then frees it: the first interval's peak must see it, the second's not.
SCRIPT = """
import numpy as np
from hmoe_ds.training import memlog
memlog.mark("before")
block = np.ones(64 * 2**20 // 8)
del block
memlog.mark("alloc", 1)
memlog.mark("after", 2)
print(memlog.enabled())
"""


def _run(tmp_path: Path, log: Path | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "HMOE_DS_MEMORY_LOG"}
    if log is not None:
        env["HMOE_DS_MEMORY_LOG"] = str(log)
    env["RANK"] = "3"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True)
    return proc.stdout.strip()


def test_off_by_default_writes_nothing(tmp_path: Path) -> None:
    assert _run(tmp_path, None) == "False"
    assert list(tmp_path.iterdir()) == []


def test_each_mark_logs_the_peak_of_the_interval_it_ends(tmp_path: Path) -> None:
    log = tmp_path / "mem.jsonl"
    assert _run(tmp_path, log) == "True"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["phase"], r["step"], r["rank"]) for r in records] == [("before", None, 3), ("alloc", 1, 3),
                                                                      ("after", 2, 3)]
    for r in records:
        assert r["vmhwm_mib"] >= r["vmrss_mib"] > 0 and r["rssshmem_mib"] >= 0
    if all(r["reset"] for r in records):  # where the kernel lets a process reset its high-water mark
        alloc, after = records[1], records[2]
        assert alloc["vmhwm_mib"] >= alloc["vmrss_mib"] + 60  # the freed 64 MiB block is in that interval's peak
        assert after["vmhwm_mib"] < alloc["vmhwm_mib"] - 60  # ... and not in the next one's
