"""Smoke test of the benchmark command (``python -m benchmarks.run_all --quick``); no timing assertions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmarks_print_tables_with_finite_ratios(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--quick", "--json", str(out_json)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for title in ("Layer forward+backward", "Routing + dispatch + combine scaling", "Fit t = a", "Targets"):
        assert title in proc.stdout, proc.stdout[-4000:]

    tables = {t["title"]: t for t in json.loads(out_json.read_text())["tables"]}
    layer = next(t for title, t in tables.items() if title.startswith("Layer forward+backward"))
    assert layer["rows"], "empty layer table"
    for name in ("HMoE/floor", "HMoE/DS", "HMoE/plain", "HMoE ms", "floor ms", "DS-MoE ms", "bf16 HMoE/floor",
                 "HMoE MiB", "plain MiB", "DS MiB"):
        i = layer["headers"].index(name)
        for row in layer["rows"]:
            assert isinstance(row[i], float) and math.isfinite(row[i]) and (row[i] > 0 or "MiB" in name), (name, row)
    for name in ("ops HMoE", "ops grouped", "ops plain"):
        i = layer["headers"].index(name)
        assert all(isinstance(row[i], int) and row[i] > 0 for row in layer["rows"]), name
    # The printed table carries the same ratios.
    printed = [ln for ln in proc.stdout.splitlines() if ln.startswith("|") and "top-k" in ln]
    assert printed, proc.stdout[-4000:]

    scaling = next(t for title, t in tables.items() if title.startswith("Routing + dispatch"))
    i = scaling["headers"].index("HMoE-k ns/(T*k)")
    assert all(math.isfinite(row[i]) and row[i] > 0 for row in scaling["rows"])


@pytest.mark.slow
def test_layer_profile_runs_its_phases_prototypes_and_op_table(tmp_path: Path) -> None:
    """``benchmarks.profile_layer`` monkeypatches the experts' forward; it must follow the experts' call signature."""
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_layer", "--tokens", "256", "--experts", "4", "--d-model", "64",
         "--repeats", "1", "--threads", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for text in ("routing only", "experts only", "HMoE + ", "aten::mm"):
        assert text in proc.stdout, (text, proc.stdout[-4000:])


@pytest.mark.slow
def test_quick_memory_benchmark_produces_a_complete_table(tmp_path: Path) -> None:
    """``bench_memory --quick`` launches the real train/resume/export jobs at 1 and 2 ranks and tabulates them.

    Only the table's shape is checked (every phase measured, ratios finite), not the memory figures.
    """
    out_json = tmp_path / "memory.json"
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_memory", "--quick", "--ranks", "1,2", "--configs", "zero3",
         "--json", str(out_json)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Peak resident memory per rank (MiB), zero3" in proc.stdout, proc.stdout[-4000:]

    result = json.loads(out_json.read_text())
    measurements = result["measurements"]
    assert {(m["ranks"], m["model"]) for m in measurements} == {(1, "tiny"), (1, "small"), (2, "tiny"), (2, "small")}
    for m in measurements:
        assert m["error"] is None, m
        assert sorted(m["phases"]) == [str(r) for r in range(m["ranks"])], m  # every rank reported
        # The tiny model is the baseline: it only trains and saves; the measured one also resumes and exports.
        wanted = ("build@1", "train@1", "save@1") + (("resume@2", "train@2", "save@2") if m["model"] != "tiny" else ())
        for phases in m["phases"].values():
            for phase in wanted:
                assert phases[phase] > 0, (phase, m)
        assert m["model"] == "tiny" or m["export_mib"] > 0, m
    table = next(t for t in result["tables"] if t["title"].endswith("zero3"))
    assert [row[0] for row in table["rows"]] == [1, 2], table
    for name in ("ratio", "train ratio"):
        i = table["headers"].index(name)
        assert all(isinstance(row[i], float) and math.isfinite(row[i]) for row in table["rows"]), table
    targets = next(t for t in result["tables"] if t["title"].startswith("ZeRO-3 memory targets"))
    assert [row[:2] for row in targets["rows"]] == [["zero3", 2]], targets
    assert all(row[3] in ("PASS", "FAIL") for row in targets["rows"]), targets


def test_target_summary_checks_each_issue_target_once_per_row() -> None:
    """The layer benchmark's verdicts: each CPU target against its rows, with MET/MISSED and the rows that miss."""
    from benchmarks.common import Table
    from benchmarks.run_all import target_summary

    headers = ["T", "E", "d", "HMoE/floor", "HMoE/DS", "HMoE/plain", "HMoE MiB", "plain MiB"]
    rows = [
        [2048, 8, 256, 1.05, 0.9, 0.9, 34.0, 49.0],
        [8192, 8, 256, 1.01, 0.8, 0.9, 138.0, 194.0],
        [8192, 32, 512, 1.2, 1.01, 0.7, 278.0, 393.0],
        [2048, 32, 256, 1.6, 0.9, 0.8, 57.0, 55.0],
    ]
    lines = target_summary(Table("layer", headers, rows, []))
    assert "HMoE top-2 at most 1.1x the dense floor at E=8, T=2048, d=256: 1.05x -> MET" in lines
    assert "HMoE top-2 at most 1.0x the dense floor at E=8, T=8192, d=256: 1.01x -> MISSED" in lines
    assert "HMoE top-2 at most 1.3x the dense floor at E=32, T=8192, d=512: 1.20x -> MET" in lines
    assert "HMoE top-2 at most 1.5x the dense floor at E=32, T=2048, d=256: 1.60x -> MISSED" in lines
    assert "HMoE faster than DeepSpeed MoE: 3/4 rows; not at T=8192 E=32 d=512 (1.01x)" in lines
    assert "HMoE faster than the plain per-expert loop: 4/4 rows" in lines
    assert ("HMoE peak memory no higher than the plain loop's: 3/4 rows; higher at T=2048 E=32 d=256 "
            "(57 vs 55 MiB)") in lines
    assert not any(line.count("d=") > 1 for line in lines)
    # A target whose configuration the run did not include says so.
    only_e8 = target_summary(Table("layer", headers, rows[:1], []))
    assert "HMoE top-2 at most 1.3x the dense floor at E=32, T=8192, d=512: not measured in this mode" in only_e8
