"""Smoke test of benchmarks/bench_minibatch.py: a tiny run writes a complete, self-consistent result file.

Checks the documented JSON keys, that every method ran on every seed with one full-batch loss per epoch, that
AutoMrGD counted its curvature work, and that the verdicts follow from the reported numbers (the numbers
themselves are not asserted: timings belong to benchmarks/)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_minibatch.py"

pytestmark = pytest.mark.integration

pytest.importorskip("sklearn")

sys.path.insert(0, str(SCRIPT.parent))
import bench_minibatch  # noqa: E402 - importable only once its folder is on sys.path


def test_tiny_minibatch_run_is_complete_and_consistent(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--quick", "--seeds", "2", "--epochs", "2", "--batch", "256",
           "--problems", "mlp_multiscale", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "minibatch_cpu.json").read_text())
    assert {"machine", "torch_version", "date", "settings", "problems", "checks", "runtime_s"} <= set(payload)
    res = payload["problems"]["mlp_multiscale"]
    for method in bench_minibatch.METHODS:
        runs = [r for r in res["runs"] if r["method"] == method]
        assert len(runs) == 2, method
        for r in runs:
            if r["status"] == "ok":
                assert len(r["losses"]) == 3 and len(r["times"]) == 3  # start + one per epoch
                assert all(math.isfinite(v) for v in r["losses"])
                assert r["times"] == sorted(r["times"])
    autos = [r for r in res["runs"] if r["method"] == "auto"]
    assert all(r["hvps"] > 0 for r in autos if r["status"] == "ok")
    # The verdicts follow from the numbers.
    s = res["summary"]
    check = payload["checks"]["per_problem"]["mlp_multiscale"]
    never = next(i for i in check["items"] if "never" in i["what"])
    assert never["pass"] == (s["auto"]["ok"] == s["auto"]["runs"])
    speed = next(i for i in check["items"] if "time to" in i["what"])
    a, b = s["auto"]["target_s"], s["sgd_momentum"]["target_s"]
    expected = a is not None and (b is None or (a <= b if b > 0 else a == 0))
    assert speed["pass"] == expected
    md = (tmp_path / "minibatch_cpu.md").read_text()
    assert "## Target check" in md and "mlp_multiscale" in md
