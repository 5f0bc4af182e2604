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
    for name in ("ops HMoE", "ops loop", "ops plain"):
        i = layer["headers"].index(name)
        assert all(isinstance(row[i], int) and row[i] > 0 for row in layer["rows"]), name
    # The printed table carries the same ratios.
    printed = [ln for ln in proc.stdout.splitlines() if ln.startswith("|") and "top-k" in ln]
    assert printed, proc.stdout[-4000:]

    scaling = next(t for title, t in tables.items() if title.startswith("Routing + dispatch"))
    i = scaling["headers"].index("HMoE-k ns/(T*k)")
    assert all(math.isfinite(row[i]) and row[i] > 0 for row in scaling["rows"])
