"""Smoke test of benchmarks/bench_training.py: the --quick path runs and writes a complete result file.

Checks the documented JSON keys and that every method of every problem produced a finite loss curve with
non-decreasing wall times. The numbers themselves are not asserted (timings belong to benchmarks/).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_training.py"

pytestmark = pytest.mark.integration

pytest.importorskip("sklearn")

sys.path.insert(0, str(SCRIPT.parent))
import bench_training


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_training")
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], check=False, capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "training_cpu.json").read_text()), proc.stdout


def test_quick_writes_json_and_markdown(quick_result):
    out, payload, stdout = quick_result
    for key in bench_training.TOP_KEYS:
        assert key in payload, key
    assert payload["settings"]["quick"] is True
    assert set(payload["problems"]) == set(bench_training.PROBLEMS)
    md = (out / "training_cpu.md").read_text()
    # The target check is printed plainly, one verdict per multiscale problem.
    for name in bench_training.MLP_PROBLEMS:
        assert f"**{name}: PASS**" in md or f"**{name}: FAIL**" in md
    assert "**overall: " in md
    assert "wrote" in stdout


def test_every_method_has_a_finite_curve(quick_result):
    _, payload, _ = quick_result
    for name, res in payload["problems"].items():
        methods = {r["method"] for r in res["runs"]}
        assert methods == set(bench_training.METHODS), (name, methods)
        for run in res["runs"]:
            for key in bench_training.RUN_KEYS:
                assert key in run, (name, run["label"], key)
            curve = run["curve"]
            assert 2 <= len(curve["loss"]) <= bench_training.MAX_CURVE_POINTS
            assert len(curve["iter"]) == len(curve["loss"]) == len(curve["time_s"])
            if run["status"] == "ok":
                assert all(math.isfinite(v) for v in curve["loss"]), (name, run["label"])
            else:  # a diverged or failed run says why, and its curve starts finite
                assert run["reason"], (name, run["label"])
                assert math.isfinite(curve["loss"][0]), (name, run["label"])
            assert all(b >= a for a, b in zip(curve["time_s"], curve["time_s"][1:]))
        if name in bench_training.MLP_PROBLEMS:
            assert res["target_loss"] is not None and math.isfinite(res["target_loss"])
            for method in ("gd", "adam"):
                # The baselines' grids bracket a working rate: at least one setting trained without diverging.
                assert any(r["status"] == "ok" for r in res["runs"] if r["method"] == method), (name, method)
        # AutoMrGD counted its curvature measurements, the first one inside the wall time.
        for run in res["runs"]:
            if run["method"] in bench_training.MRGD_METHODS and run["status"] != "failed":
                assert run["estimation_hvps"] > 0 and run["events"]
                assert run["construct_s"] <= run["wall_s"]
                assert run["curve"]["time_s"][0] >= run["construct_s"]


def test_spec_check_is_consistent(quick_result):
    _, payload, _ = quick_result
    checks = payload["checks"]
    for name in bench_training.MLP_PROBLEMS:
        c = checks["per_problem"][name]
        assert c["target_loss"] == payload["problems"][name]["target_loss"]
        if c["ratio"] is not None:
            assert c["pass"] == (c["ratio"] <= 0.5)
        else:
            assert c["pass"] is False
    assert checks["pass"] == all(c["pass"] for c in checks["per_problem"].values())
