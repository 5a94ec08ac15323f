"""Smoke test of benchmarks/bench_training.py: a tiny run writes a complete, self-consistent result file.

Checks the documented JSON keys, that every method ran on every problem with a finite curve, that AutoMrGD
counted its curvature work, and that the target verdicts follow from the reported numbers. The numbers
themselves are not asserted (timings belong to benchmarks/).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_training.py"
PROBLEMS = ("ls_diabetes", "mlp_wine")  # one convex problem with f*, one network

pytestmark = pytest.mark.integration

pytest.importorskip("sklearn")

sys.path.insert(0, str(SCRIPT.parent))
import bench_training  # noqa: E402 - importable only once its folder is on sys.path


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_training")
    cmd = [sys.executable, str(SCRIPT), "--quick", "--seeds", "2", "--budget", "40,20", "--problems",
           ",".join(PROBLEMS), "--out", str(out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "training_cpu.json").read_text()), proc.stdout


def test_writes_json_and_markdown(tiny_result):
    out, payload, stdout = tiny_result
    for key in bench_training.TOP_KEYS:
        assert key in payload, key
    assert payload["settings"]["quick"] is True
    assert payload["settings"]["budget"] == {"convex": 40, "mlp": 20}
    assert set(payload["problems"]) == set(PROBLEMS)
    md = (out / "training_cpu.md").read_text()
    assert "**overall: " in md
    for name in PROBLEMS:
        assert f"## {name}:" in md
    assert "wrote" in stdout


def test_every_method_ran_with_a_finite_curve(tiny_result):
    _, payload, _ = tiny_result
    for name, res in payload["problems"].items():
        budget = payload["settings"]["budget"][res["kind"]]
        assert {r["method"] for r in res["runs"]} == set(bench_training.METHODS), name
        for run in res["runs"]:
            for key in bench_training.RUN_KEYS:
                assert key in run, (name, run["method"], key)
            curve = run["curve"]
            assert 2 <= len(curve["loss"]) <= bench_training.MAX_CURVE_POINTS
            assert len(curve["evals"]) == len(curve["loss"]) == len(curve["time_s"])
            assert all(b >= a for a, b in zip(curve["time_s"], curve["time_s"][1:]))
            if run["status"] == "ok":
                assert all(math.isfinite(v) for v in curve["loss"]), (name, run["method"])
                assert run["grad_evals"] <= budget + 25  # one step may take several evaluations (line search)
            else:
                assert run["reason"], (name, run["method"])
            if run["method"] in bench_training.AUTO_METHODS and run["status"] == "ok":
                assert run["hvps"] > 0 and run["events"] and 0 < run["estimation_s"] <= run["wall_s"]
        for method in bench_training.TUNED:
            grid = res["summary"][method]["grid"]
            assert grid["runs"] >= 2 and grid["grad_evals"] > 0
        if res["fstar"] is not None:
            assert all(r["final_loss"] >= res["fstar"] * (1 - 1e-9) for r in res["runs"] if r["status"] == "ok")


def test_target_verdicts_follow_from_the_numbers(tiny_result):
    _, payload, _ = tiny_result
    checks = payload["checks"]
    default = bench_training.DEFAULT_METHOD
    assert default in bench_training.AUTO_METHODS and bench_training.AUTO_ARGUMENTS[default] == {"mode": "subspace"}
    for name, c in checks["per_problem"].items():
        # The verdict is the defaults' alone; every variant is checked beside it.
        assert c["pass"] == all(i["pass"] for i in c["items"])
        assert all(i["what"].startswith(f"{default}: ") for i in c["items"])
        variants = {i["what"].split(":")[0] for i in c["variants"]}
        assert variants == set(bench_training.AUTO_METHODS) - {default}
        res = payload["problems"][name]
        never = all(r["status"] == "ok" for r in res["runs"] if r["method"] == default)
        assert c["items"][0]["pass"] == never
        share = next(i for i in c["items"] if "estimation" in i["what"])
        assert share["pass"] == (res["summary"][default]["estimation_share"] <= bench_training.ESTIMATION_SHARE)
    assert checks["pass"] == all(c["pass"] for c in checks["per_problem"].values())


def test_the_paper_mlp_problem_is_selectable_but_not_default():
    assert "mlp_paper_digits" in bench_training.EXTRA_PROBLEMS
    assert "mlp_paper_digits" not in bench_training.PROBLEMS
    prob = bench_training.make_problem("mlp_paper_digits")
    model = bench_training.model_for(prob, 0)
    assert sum(p.numel() for p in model.parameters()) == 64 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 10 + 10
    with torch.no_grad():
        assert math.isfinite(float(prob.loss_of(model)))


@pytest.mark.parametrize("name", ["../x", "a b", ""])
def test_results_name_must_be_a_plain_file_stem(name):
    with pytest.raises(SystemExit):
        bench_training.main(["--results-name", name, "--problems", "ls_diabetes", "--quick"])
