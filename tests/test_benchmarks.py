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
        # One thread: a smoke test beside another pytest worker, where a second OpenMP thread only spins.
        [sys.executable, "-m", "benchmarks.run_all", "--quick", "--threads", "1", "--json", str(out_json)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for title in ("Layer forward+backward", "Routing + dispatch + combine scaling", "Fit t = a", "Targets"):
        assert title in proc.stdout, proc.stdout[-4000:]

    tables = {t["title"]: t for t in json.loads(out_json.read_text())["tables"]}
    layer = next(t for title, t in tables.items() if title.startswith("Layer forward+backward"))
    assert layer["rows"], "empty layer table"
    for name in ("HMoE/floor", "HMoE/DS", "HMoE/DS dropless", "HMoE/plain", "HMoE ms", "floor ms", "DS-MoE ms",
                 "DS dropless ms", "bf16 HMoE/floor",
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
    """``bench_memory --quick`` launches the real train/resume/export jobs and tabulates them.

    One rank (the ratio's reference row): every launch costs about 20 s of start-up here, and the tables at
    N > 1 are checked from measurements below. Only the table's shape is checked, not the memory figures.
    """
    out_json = tmp_path / "memory.json"
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_memory", "--quick", "--ranks", "1", "--configs", "zero3",
         "--json", str(out_json)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Peak resident memory per rank (MiB), zero3" in proc.stdout, proc.stdout[-4000:]

    result = json.loads(out_json.read_text())
    measurements = result["measurements"]
    assert {(m["ranks"], m["model"]) for m in measurements} == {(1, "tiny"), (1, "small")}
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
    assert [row[0] for row in table["rows"]] == [1], table
    for name in ("ratio", "train ratio"):
        i = table["headers"].index(name)
        assert table["rows"][0][i] == 1.0, table  # the reference row is its own reference


def test_memory_tables_from_measurements_at_one_and_two_ranks() -> None:
    """Model part, ratios, per-rank ranges and target verdicts of ``bench_memory`` from known per-rank peaks."""
    from benchmarks.bench_memory import TRAIN_STEPS, Measurement, build_tables

    def job(ranks: int, model: str, build: list[float], train: list[float], save: list[float],
            export: float = float("nan")) -> Measurement:
        m = Measurement("zero3", ranks, model, export_mib=export, steps={1: TRAIN_STEPS, 2: TRAIN_STEPS + 1})
        for r in range(ranks):
            m.phases[r] = {"build@1": build[r], "train@1": train[r], "save@1": save[r]}
            if model != "tiny":
                m.phases[r].update({"resume@2": train[r] - 10, "train@2": train[r], "save@2": save[r]})
        return m

    results = {
        ("zero3", 1, "tiny"): job(1, "tiny", [300], [400], [380]),
        ("zero3", 1, "small"): job(1, "small", [500], [800], [700], export=600),  # model part 800 - 400 = 400
        ("zero3", 2, "tiny"): job(2, "tiny", [300, 310], [400, 410], [390, 400]),
        # job peaks 650 and 720 (rank 1's save is above its training): model parts 250 and 310, ratio
        # 310 / (400 / 2) = 1.55; training peaks 650 and 710: train ratio 300 / 200 = 1.5
        ("zero3", 2, "small"): job(2, "small", [450, 460], [650, 710], [600, 720], export=650),
    }
    per_config, targets = build_tables(results, ["zero3"], [1, 2], "small", 10**8)
    rows = {row[0]: dict(zip(per_config.headers, row)) for row in per_config.rows}
    assert rows[1]["ratio"] == 1.0 and rows[1]["model part"] == 400
    assert rows[2]["model part"] == "250-310" and rows[2]["peak"] == "650-720" and rows[2]["ratio"] == 1.55
    assert rows[2]["train ratio"] == 1.5 and rows[2]["save<=train"] == "NO" and rows[2]["export<=train"] == "yes"
    assert targets.rows == [["zero3", 2, 1.55, "FAIL", 1.5, "FAIL", "NO", "yes"]]


def test_target_summary_checks_each_issue_target_once_per_row() -> None:
    """The layer benchmark's verdicts: each CPU target against its rows, with MET/MISSED and the rows that miss."""
    from benchmarks.common import Table
    from benchmarks.run_all import target_summary

    headers = ["T", "E", "d", "HMoE/floor", "HMoE/DS", "HMoE/DS dropless", "HMoE/plain", "HMoE MiB", "plain MiB"]
    rows = [
        [2048, 8, 256, 1.05, 0.9, 0.8, 0.9, 34.0, 49.0],
        [8192, 8, 256, 1.01, 0.8, 0.7, 0.9, 138.0, 194.0],
        [8192, 32, 512, 1.2, 1.01, 0.9, 0.7, 278.0, 393.0],
        [2048, 32, 256, 1.6, 0.9, 1.0, 0.8, 57.0, 55.0],
    ]
    lines = target_summary(Table("layer", headers, rows, []))
    assert "HMoE top-2 at most 1.1x the dense floor at E=8, T=2048, d=256: 1.05x -> MET" in lines
    assert "HMoE top-2 at most 1.0x the dense floor at E=8, T=8192, d=256: 1.01x -> MISSED" in lines
    assert "HMoE top-2 at most 1.3x the dense floor at E=32, T=8192, d=512: 1.20x -> MET" in lines
    assert "HMoE top-2 at most 1.5x the dense floor at E=32, T=2048, d=256: 1.60x -> MISSED" in lines
    assert "HMoE faster than DeepSpeed MoE: 3/4 rows; not at T=8192 E=32 d=512 (1.01x)" in lines
    assert "HMoE faster than the plain per-expert loop: 4/4 rows" in lines
    assert "HMoE faster than DeepSpeed MoE without drops: 3/4 rows; not at T=2048 E=32 d=256 (1.00x)" in lines
    assert ("HMoE peak memory no higher than the plain loop's: 3/4 rows; higher at T=2048 E=32 d=256 "
            "(57 vs 55 MiB)") in lines
    assert not any(line.count("d=") > 1 for line in lines)
    # A target whose configuration the run did not include says so.
    only_e8 = target_summary(Table("layer", headers, rows[:1], []))
    assert "HMoE top-2 at most 1.3x the dense floor at E=32, T=8192, d=512: not measured in this mode" in only_e8
