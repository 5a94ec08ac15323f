"""Smoke test of benchmarks/bench_compile.py: a tiny run writes a complete, self-consistent result file.

Checks the documented JSON keys, that every timed variant has a positive time, that the ratios and the target
verdict follow from the reported times, that the compiled step did not recompile while timed and that MrGD
(a cycle of one repeated rate) did the same work as SGD. The times themselves are not asserted (timings
belong to benchmarks/).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_compile.py"

pytestmark = pytest.mark.integration

sys.path.insert(0, str(SCRIPT.parent))
import bench_compile  # noqa: E402 - importable only once its folder is on sys.path

STEP_VARIANTS = ("mrgd_eager_fused", "mrgd_compiled", "sgd_eager_fused")
TRAINING_VARIANTS = (*bench_compile.TRAINING_OPTIMIZERS, "mrgd_eager_step")


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_compile")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], check=False,
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "compile_cpu.json").read_text()), proc.stdout


def test_writes_json_and_markdown(tiny_result):
    out, payload, stdout = tiny_result
    for key in bench_compile.TOP_KEYS:
        assert key in payload, key
    assert payload["settings"]["quick"] is True and payload["settings"]["torch_threads"] == 1
    for key in ("date", "torch_version", "cpu"):
        assert payload["machine"][key]
    md = (out / "compile_cpu.md").read_text()
    assert "Byte floor: 12 B per element" in md and "Target (compiled no slower than eager fused)" in md
    assert "MrGD / SGD(fused=True)" in md
    assert "wrote" in stdout


def test_step_numbers_are_consistent(tiny_result):
    _, payload, _ = tiny_result
    s = payload["step"]
    assert s["n"] == 2**20 + 8 * 1000  # model_like_params: one 1 Mi matrix and eight biases
    for name in STEP_VARIANTS:
        assert s[f"{name}_ms"] > 0 and math.isfinite(s[f"{name}_ms"])
        # GB/s at the byte floor: 12 B per element over the median time.
        assert s[f"{name}_GBps"] == pytest.approx(12 * s["n"] / (s[f"{name}_ms"] * 1e-3) / 1e9, rel=1e-9)
    assert s["eager_fused_over_compiled"] == pytest.approx(s["mrgd_eager_fused_ms"] / s["mrgd_compiled_ms"])
    assert s["target_met"] == (s["mrgd_compiled_ms"] <= s["mrgd_eager_fused_ms"])
    # Compiled once (Dynamo may restart its analysis once); walking the 3-rate cycle did not recompile.
    assert 1 <= s["graphs_after_compile"] <= 2 and s["graphs_after_timing"] == s["graphs_after_compile"]


def test_training_numbers_are_consistent(tiny_result):
    _, payload, _ = tiny_result
    t = payload["training"]
    for name in TRAINING_VARIANTS:
        assert t[f"{name}_ms"] > 0 and t[f"{name}_compile_s"] > 0
    assert t["mrgd_over_sgd_fused"] == pytest.approx(t["mrgd_ms"] / t["sgd_fused_ms"])
    assert t["mrgd_over_sgd_foreach"] == pytest.approx(t["mrgd_ms"] / t["sgd_foreach_ms"])
    assert t["same_trajectory"] and t["no_recompile_while_timing"]
