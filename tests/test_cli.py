"""The mrgd-ext command line, end to end in subprocesses (as a user runs it), on tiny sizes.

Argument mistakes and --help are checked in-process through ``main()`` (the same code path, without paying
an interpreter start per case); everything that computes, writes files or spawns the benchmark suite runs
in a subprocess.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mrgd_ext.cli import main

REPO = Path(__file__).resolve().parent.parent
RUN_ALL = REPO / "benchmarks" / "run_all.py"


def run_cli(*args, timeout=180, cwd=None):
    return subprocess.run([sys.executable, "-m", "mrgd_ext", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def run_blocking(blocked: str, *args):
    """The CLI with ``import <blocked>`` failing, as when an optional dependency is not installed."""
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "from mrgd_ext.cli import main\n"
            f"raise SystemExit(main({[str(a) for a in args]!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


# --------------------------------------------------------------------------------------------------------
# plan, info, help, argument mistakes


@pytest.mark.integration
def test_plan_prints_a_table_and_json():
    out = run_cli("plan", "--groups", "1:2,1e-3:2e-3", "--strategy", "nested")
    assert out.returncode == 0, out.stderr
    assert "cycle length" in out.stdout and "predicted iterations" in out.stdout
    js = run_cli("plan", "--groups", "1:2,1e-3:2e-3", "--json")
    data = json.loads(js.stdout)
    assert js.returncode == 0 and data["strategy"] in ("nested", "chebyshev-nested", "chebyshev")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["plan", "--groups", "1:2,3:4"], "sorted"),
        (["plan", "--groups", "1-2"], "'a:b'"),
        (["plan", "--groups", "x:2"], "not two numbers"),
        (["plan", "--groups", "2:1"], "item 0"),
        (["plan", "--groups", ""], "empty"),
        (["demo", "--seeds", "0"], "--seeds must be >= 1"),
        (["demo", "--tol", "2"], "--tol must be in (0, 1)"),
        (["demo", "--iterations", "0"], "--iterations must be >= 1"),
        (["demo", "--out", __file__], "exists and is not a directory"),
        # argparse's own errors: one line naming the argument, no usage block.
        (["spectrum", "--problem", "mnist"], "--problem"),
        (["plan", "--groups", "1:2", "--strategy", "foo"], "--strategy"),
        (["plan"], "--groups"),
        (["--bogus"], "--bogus"),
        (["demo", "--nope"], "--nope"),
        (["demo", "--seeds", "two"], "--seeds"),
        ([], "COMMAND"),
        (["reproduce"], "FIGURE"),
        (["plan", "--groups", "1e300:2e300,1e-300:2e-300"], "supports a spread up to"),
        (["reproduce", "fig3", "--problems", "two_scales,nope"], "choose from two_scales"),
        (["reproduce", "fig3", "--seeds", "-1"], "--seeds must be >= 1"),
        (["bench", "--benchmarks", "/nonexistent/folder"], "has no run_all.py"),
        (["bench", "--timeout", "0"], "--timeout must be > 0"),
        (["spectrum", "-k", "0"], "-k must be >= 1"),
        (["spectrum", "--min-gap", "1"], "--min-gap must be a ratio > 1"),
        (["spectrum", "--model-file", "/nonexistent/model.py", "--no-plot"], "does not exist"),
    ],
)
def test_mistakes_give_one_line_and_status_2(argv, needle, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = one_line_error(captured.err)
    assert line.startswith("mrgd-ext") and "error:" in line and needle in line, line
    assert captured.out == ""


@pytest.mark.integration
def test_argparse_mistake_in_a_subprocess_is_one_line_with_status_2():
    proc = run_cli("spectrum", "--problem", "mnist")
    assert proc.returncode == 2 and proc.stdout == ""
    line = one_line_error(proc.stderr)
    assert line.startswith("mrgd-ext spectrum: error:") and "--problem" in line and "mnist" in line, line


def test_help_on_every_command(capsys):
    for cmd in ([], ["demo"], ["plan"], ["info"], ["spectrum"], ["reproduce"], ["reproduce", "fig3"], ["bench"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*cmd, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: mrgd-ext"), (cmd, out[:200])
        assert " ".join(["mrgd-ext", *cmd]) in out.splitlines()[0]


@pytest.mark.integration
def test_info_reports_the_build():
    out = run_cli("info", "--json")
    info = json.loads(out.stdout)
    assert out.returncode == 0 and {"version", "torch_version", "cuda", "openmp", "cpu_isa"} <= set(info)


# --------------------------------------------------------------------------------------------------------
# demo


@pytest.mark.integration
def test_demo_compares_mrgd_sgd_and_heavy_ball_and_writes_the_plot(tmp_path):
    out_dir, js = tmp_path / "sub", tmp_path / "demo.json"
    png = out_dir / "mrgd_demo.png"
    # 1400 steps: just past the plan's predicted 1301 for the diabetes data, so MrGD must reach tol here.
    out = run_cli("demo", "--seeds", "1", "--iterations", "1400", "--out", out_dir, "--json", js, "--quiet")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # --quiet: no progress bars, no notices
    assert "MrGD auto" in out.stdout and "Heavy ball (optimal Polyak)" in out.stdout  # the Figure 3 table
    assert "SGD, best constant rate" in out.stdout and "Heavy ball, best tuning" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads(js.read_text())
    assert list(data["figure3"]["problems"]) == ["two_scales", "three_scales"]
    real = data["diabetes"]
    spectrum = real["spectrum"]
    assert spectrum == sorted(spectrum, reverse=True) and len(spectrum) == 11
    # Every eigenvalue lies in exactly one detected group, and groups are >= 10x apart (detect_scales' gap).
    groups = real["groups"]
    assert all(sum(a * (1 - 1e-12) <= v <= b * (1 + 1e-12) for a, b in groups) == 1 for v in spectrum)
    assert all(groups[k][0] >= 10 * groups[k + 1][1] for k in range(len(groups) - 1))
    mrgd, sgd, hb = (real["methods"][k] for k in ("mrgd", "sgd", "heavy_ball"))
    predicted = real["predicted_iterations"]["mrgd"]
    # The prediction is exact-arithmetic; rounding amplified by a cycle's largest step may cost one or two
    # extra steps (NOTE: [rounding at cycle ends] in mrgd_ext.experiments.reproduce), never a cycle.
    assert mrgd["iterations_to_tol"] is not None and mrgd["iterations_to_tol"] <= predicted + 2
    assert mrgd["final_rel_error"] < 1e-6
    # Both baselines hardly move along the smallest eigenvector (lambda_min / lambda_max ~ 2e-8) in 1400
    # steps, however they are tuned: their weight error stays of order one.
    assert sgd["iterations_to_tol"] is None and hb["iterations_to_tol"] is None
    assert sgd["final_rel_error"] > 0.5 and hb["final_rel_error"] > 0.5
    assert mrgd["final_rel_suboptimality"] < 1e-6 * min(sgd["final_rel_suboptimality"], hb["final_rel_suboptimality"])
    # "Best" means best of its grid on this budget.
    for entry in (sgd, hb):
        assert entry["final_loss"] == min(g["final_loss"] for g in entry["grid"])
    assert len(mrgd["history"]["loss"]) == 1401


@pytest.mark.integration
def test_demo_without_matplotlib_or_scikit_learn_says_what_to_install():
    out = run_blocking("matplotlib", "demo", "--seeds", "1")
    assert out.returncode == 2
    line = one_line_error(out.stderr)
    assert "needs matplotlib" in line and "pip install 'mrgd_ext[plot]'" in line and "--no-plot" in line
    out = run_blocking("sklearn", "demo", "--no-plot")
    assert out.returncode == 2
    assert "needs scikit-learn" in one_line_error(out.stderr)


# --------------------------------------------------------------------------------------------------------
# spectrum


@pytest.mark.integration
def test_spectrum_of_the_diabetes_problem_matches_its_exact_eigenvalues(tmp_path):
    out = run_cli("spectrum", "--problem", "diabetes", "-k", "5", "--block-size", "2", "--probes", "3", "--order",
                  "11", "--check-dense", "--out", tmp_path, "--json", tmp_path / "s.json", "--quiet")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    res = json.loads((tmp_path / "s.json").read_text())
    # Independent truth: the Hessian of 0.5*mean((Xw+b-y)^2) is [X 1]^T [X 1] / N in closed form.
    from mrgd_ext.experiments.data import load_diabetes_raw

    X, _ = load_diabetes_raw()
    exact = sorted(np.linalg.eigvalsh((X.T @ X / X.shape[0]).numpy()), reverse=True)
    # Lanczos on an 11-dim operator with a full basis is exact up to rounding: relative to lambda_max ~7e4,
    # 1e-10 leaves room for float64 HVPs through autograd (each ~1e-16 * |H| with |H| ~ 7e4).
    assert np.allclose(res["eigenvalues"], exact[:5], rtol=0, atol=1e-10 * exact[0])
    assert all(res["converged"]) and res["dense_check"]["max_diff_relative_to_lambda_max"] < 1e-10
    # Groups of the top 5 (gap >= 10x): 7.4e4 alone, then 95.7 .. 621.
    assert np.allclose(res["groups_top_k"], [[exact[0], exact[0]], [exact[4], exact[1]]], rtol=1e-12)
    assert (tmp_path / "mrgd_spectrum.png").read_bytes()[:4] == b"\x89PNG"
    assert "Top 5 eigenvalues" in out.stdout and "Dense check" in out.stdout


@pytest.mark.integration
def test_spectrum_of_a_user_model_file(tmp_path):
    model_file = tmp_path / "my_model.py"
    model_file.write_text(textwrap.dedent("""
        import torch
        gen = torch.Generator().manual_seed(0)
        X = torch.randn(64, 3, generator=gen, dtype=torch.float64) * torch.tensor([10.0, 1.0, 0.1], dtype=torch.float64)
        y = torch.randn(64, generator=gen, dtype=torch.float64)
        model = torch.nn.Linear(3, 1, bias=False, dtype=torch.float64)
        def loss_fn(out, target):
            return 0.5 * ((out.squeeze(-1) - target) ** 2).mean()
        data = [(X[:40], y[:40]), (X[40:], y[40:])]
        if __name__ == "__main__":
            raise SystemExit("must not run: the spectrum command loads this file as a module")
    """))
    out = run_cli("spectrum", "--model-file", model_file, "-k", "3", "--order", "3", "--no-plot",
                  "--json", tmp_path / "u.json")
    assert out.returncode == 0, out.stderr
    assert "Lanczos HVPs" in out.stderr  # progress bar, not --quiet
    res = json.loads((tmp_path / "u.json").read_text())
    # Batches weighted by size give the Hessian of the mean loss over all 64 samples: X^T X / 64.
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 3, generator=gen, dtype=torch.float64) * torch.tensor([10.0, 1.0, 0.1], dtype=torch.float64)
    exact = sorted(np.linalg.eigvalsh((X.T @ X / 64).numpy()), reverse=True)
    assert np.allclose(res["eigenvalues"], exact, rtol=1e-10)
    assert res["problem_name"] == "my_model.py" and res["n"] == 3 and res["num_samples"] == 64
    assert len(res["groups_top_k"]) == 3  # data scales 10, 1, 0.1 -> Hessian groups 100x apart


@pytest.mark.parametrize(
    "body,needle",
    [
        ("model = 1\nloss_fn = None\n", "must define model, loss_fn and data (missing: data)"),
        ("model = 1\nloss_fn = None\ndata = None\n", "model must be a torch.nn.Module, got int"),
        ("import torch\nmodel = torch.nn.Linear(2, 1)\nloss_fn = torch.nn.MSELoss()\ndata = 3\n",
         "cannot build the Hessian operator"),
        ("x = 1\ny = 1 / 0\n", "running it raised ZeroDivisionError at line 2"),
    ],
)
def test_spectrum_model_file_mistakes_give_one_line(tmp_path, body, needle, capsys):
    model_file = tmp_path / "bad.py"
    model_file.write_text(body)
    assert main(["spectrum", "--model-file", str(model_file), "--no-plot", "--quiet"]) == 2
    assert needle in one_line_error(capsys.readouterr().err)


# --------------------------------------------------------------------------------------------------------
# reproduce


@pytest.mark.integration
def test_reproduce_fig3_writes_json_markdown_and_png_with_a_progress_bar(tmp_path):
    out = run_cli("reproduce", "fig3", "--seeds", "1", "--problems", "two_scales", "--out", tmp_path / "r")
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "r" / "fig3.json").read_text())
    assert list(results["problems"]) == ["two_scales"] and results["meta"]["seeds"] == [0]
    assert results["checks"] and all(c["passed"] for c in results["checks"])
    assert "| MrGD auto |" in (tmp_path / "r" / "fig3.md").read_text()
    assert (tmp_path / "r" / "fig3.png").read_bytes()[:4] == b"\x89PNG"
    assert "MrGD auto" in out.stdout and "PASS:" in out.stdout
    assert "Figure 3" in out.stderr and "run" in out.stderr  # the tqdm bar (not --quiet)


@pytest.mark.integration
def test_reproduce_without_tqdm_runs_and_says_so_once(tmp_path):
    out = run_blocking("tqdm", "reproduce", "fig3", "--seeds", "1", "--problems", "two_scales", "--no-plot",
                       "--out", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "progress bars are off: tqdm is not installed" in one_line_error(out.stderr)
    assert (tmp_path / "fig3.json").is_file() and not (tmp_path / "fig3.png").exists()


# --------------------------------------------------------------------------------------------------------
# bench: benchmarks/run_all.py driven through the CLI, on a stand-in suite of tiny scripts

_FAKE = {
    # Takes --device, --out and --quick, writes a JSON + markdown pair like the real benchmarks.
    "bench_step.py": """
        import argparse, json, pathlib
        ap = argparse.ArgumentParser()
        ap.add_argument("--device", default="cpu"); ap.add_argument("--out")
        ap.add_argument("--quick", action="store_true")
        a = ap.parse_args()
        out = pathlib.Path(a.out)
        (out / "step.json").write_text(json.dumps(vars(a)))
        table = "| quick | device |\\n|---|---|\\n| %s | %s |\\n" % (a.quick, a.device)
        (out / "step.md").write_text("# Step table\\n\\n" + table)
        print("step done")
    """,
    # Like fig3.py: no --device, no --quick (run_all uses --seeds 1 for a quick run).
    "fig3.py": """
        import argparse, pathlib
        ap = argparse.ArgumentParser()
        ap.add_argument("--seeds", type=int, default=5); ap.add_argument("--out")
        a = ap.parse_args()
        (pathlib.Path(a.out) / "fig3.md").write_text("# Fig3 with %d seeds\\n" % a.seeds)
    """,
    "bench_lanczos_broken.py": """
        import argparse, sys
        ap = argparse.ArgumentParser()
        ap.add_argument("--device"); ap.add_argument("--out")
        ap.add_argument("--quick", action="store_true")
        ap.parse_args()
        sys.exit("boom: the kernel lost to the baseline")
    """,
    "bench_lanczos_slow.py": """
        import argparse, time
        ap = argparse.ArgumentParser()
        ap.add_argument("--device"); ap.add_argument("--out"); ap.add_argument("--quick", action="store_true")
        ap.parse_args()
        time.sleep(120)
    """,
    # No --out: writes to results/ beside itself (as the real scripts do by default), so it must not run in
    # a quick run, and in a full run its files are copied into OUT.
    "bench_lanczos_z_noout.py": """
        import argparse, pathlib
        ap = argparse.ArgumentParser()
        ap.add_argument("--device"); ap.add_argument("--quick", action="store_true")
        a = ap.parse_args()
        results = pathlib.Path(__file__).resolve().parent / "results"
        results.mkdir(exist_ok=True)
        (results / "noout.md").write_text("# No-out table\\n")
    """,
}


@pytest.fixture()
def fake_suite(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(RUN_ALL, suite / "run_all.py")
    for name, body in _FAKE.items():
        (suite / name).write_text(textwrap.dedent(body))
    return suite


@pytest.mark.integration
def test_bench_runs_the_suite_records_failures_and_timeouts(fake_suite, tmp_path):
    listing = subprocess.run([sys.executable, fake_suite / "run_all.py", "--list"], capture_output=True, text=True)
    names = [line.split()[0] for line in listing.stdout.splitlines()]
    assert names == ["bench_step", "fig3", "bench_lanczos_broken", "bench_lanczos_slow", "bench_lanczos_z_noout"]

    out_dir = tmp_path / "out"
    out = run_cli("bench", "--benchmarks", fake_suite, "--quick", "--out", out_dir, "--timeout", "4")
    assert out.returncode == 1, out.stdout + out.stderr  # one failed, one timed out
    assert "boom: the kernel lost" in out.stderr  # a failure shows the end of its log
    summary = (out_dir / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in summary.splitlines()
            if line.startswith(("| bench", "| fig3"))}
    assert "| ok |" in rows["bench_step"] and "--device cpu" in rows["bench_step"] and "--quick" in rows["bench_step"]
    assert "step.json, step.md" in rows["bench_step"]
    assert "| ok |" in rows["fig3"] and "--seeds 1" in rows["fig3"] and "takes no --device" in rows["fig3"]
    assert "FAILED (exit 1)" in rows["bench_lanczos_broken"]
    assert "TIMEOUT" in rows["bench_lanczos_slow"] and "killed after 4 s" in rows["bench_lanczos_slow"]
    assert "| skipped |" in rows["bench_lanczos_z_noout"] and "takes no --out" in rows["bench_lanczos_z_noout"]
    assert not (fake_suite / "results").exists()  # the skipped one did not run
    assert "FAILED: bench_lanczos_broken, bench_lanczos_slow" in summary
    # The benchmarks' own tables are embedded, their headings one level down.
    assert "## bench_step: step.md" in summary and "## Step table" in summary and "| True | cpu |" in summary
    assert "## Fig3 with 1 seeds" in summary
    assert "boom" in (out_dir / "logs" / "bench_lanczos_broken.log").read_text()


@pytest.mark.integration
def test_bench_full_run_collects_the_files_of_a_benchmark_without_out(fake_suite, tmp_path):
    out = run_cli("bench", "--benchmarks", fake_suite, "--only", "bench_lanczos_z_noout", "--out", tmp_path,
                  "--quiet")
    assert out.returncode == 0, out.stderr
    assert (fake_suite / "results" / "noout.md").is_file()  # where it writes by itself
    assert (tmp_path / "noout.md").read_text() == "# No-out table\n"  # copied into OUT
    summary = (tmp_path / "summary.md").read_text()
    assert "| bench_lanczos_z_noout | ok |" in summary and "## No-out table" in summary


@pytest.mark.integration
def test_bench_on_another_device_skips_device_free_benchmarks_and_rejects_unknown_names(fake_suite, tmp_path):
    out = run_cli("bench", "--benchmarks", fake_suite, "--device", "cuda", "--only", "fig3", "--out", tmp_path,
                  "--quiet")
    assert out.returncode == 0, out.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "| fig3 | skipped |" in summary and not (tmp_path / "fig3.md").exists()
    bad = subprocess.run([sys.executable, fake_suite / "run_all.py", "--only", "fig3,nope"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "unknown benchmark(s) ['nope']" in one_line_error(bad.stderr)


# --------------------------------------------------------------------------------------------------------
# benchmarks/gpu_suite.sh: what can be checked without a GPU (its steps, its bookkeeping when a step fails)

GPU_SUITE = REPO / "benchmarks" / "gpu_suite.sh"
GPU_STEPS = ["preflight", "build", "verify", "test-cuda-kernels", "test-cuda-marked", "memcheck", "racecheck",
             "benchmarks"]


@pytest.mark.integration
def test_gpu_suite_parses_and_its_dry_run_lists_every_step_and_writes_nothing(tmp_path):
    assert subprocess.run(["bash", "-n", GPU_SUITE], capture_output=True).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", GPU_SUITE, "--dry-run", tmp_path / "out"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    for step in GPU_STEPS:
        assert re.search(rf"^\[dry-run\] \d\d_{step}\b", out.stdout, re.MULTILINE), (step, out.stdout)
    assert "MRGD_REQUIRE_CUDA=1" in out.stdout and "--device cuda" in out.stdout and "PIP_NO_INDEX=1" in out.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_gpu_suite_records_a_failed_step_skips_what_depends_on_it_and_exits_1(tmp_path):
    # An interpreter that fails at once stands in for a machine without a usable GPU: the suite must write
    # its summary and exit 1 without building or installing anything.
    env = {**os.environ, "PYTHON": shutil.which("false")}
    out = subprocess.run(["bash", GPU_SUITE, tmp_path / "out"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    rows = {line.split()[0]: line for line in summary.splitlines() if line.split() and line.split()[0] in GPU_STEPS}
    assert "FAILED(1)" in rows["preflight"]
    assert all("SKIPPED" in rows[step] for step in GPU_STEPS[1:])
    assert "overall: FAIL (1 step(s) failed or timed out)" in summary
    assert (tmp_path / "out" / "logs").is_dir()


# --------------------------------------------------------------------------------------------------------
# reproduce fig1, fig2, fig4 (row diagnostics of an MLP on digits), tiny sizes

_TINY_ROWS = ("--hidden", "16,8", "--samples", "160")


@pytest.mark.parametrize("figure", ["fig1", "fig2", "fig4"])
@pytest.mark.integration
def test_reproduce_row_figures_write_json_and_png(tmp_path, figure):
    quiet = ("--quiet",) if figure != "fig1" else ()
    out = run_cli("reproduce", figure, *_TINY_ROWS, "--out", tmp_path / "r", *quiet)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "r" / f"{figure}.json").read_text())
    assert results["meta"]["figure"] == figure and results["meta"]["model"].startswith("64-16-8-10")
    assert results["meta"]["n_train"] + results["meta"]["n_test"] == 160
    milestones = {"fig1": [0.3, 0.5], "fig2": [0.3, 0.5], "fig4": [0.2, 0.5, 0.8]}[figure]
    assert results["meta"]["milestones"] == milestones and len(results["stages"]) == len(milestones)
    assert (tmp_path / "r" / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"
    assert out.stdout.startswith(f"{figure}: 64-16-8-10 MLP") and "summary:" in out.stdout
    if figure == "fig1":
        assert "Spearman" in out.stdout and "wrote" in out.stdout
        assert "Figure 1" in out.stderr and "run" in out.stderr  # the tqdm bar (not --quiet)
    else:
        assert "slope" in out.stdout and "wrote" not in out.stdout
        assert out.stderr == ""


@pytest.mark.integration
def test_reproduce_fig2_without_plot_on_the_multiscale_generator(tmp_path):
    out = run_cli("reproduce", "fig2", "--dataset", "multiscale", "--hidden", "8,4", "--samples", "80",
                  "--milestones", "0.99", "--max-steps", "2", "--no-plot", "--quiet", "--out", tmp_path)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "fig2.json").read_text())
    assert results["meta"]["dataset"] == "multiscale" and results["meta"]["steps_trained"] == 2
    assert results["stages"][0]["reached"] is False and not (tmp_path / "fig2.png").exists()
    assert "not reached" in out.stdout


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["reproduce", "fig2", "--hidden", "16"], "give two widths or more"),
        (["reproduce", "fig1", "--hidden", "16,x"], "--hidden '16,x' must be comma-separated integers"),
        (["reproduce", "fig1", "--hidden", "0"], "integers >= 1"),
        (["reproduce", "fig4", "--milestones", "0.5,0.3"], "ascending test accuracies"),
        (["reproduce", "fig1", "--milestones", "1.5"], "ascending test accuracies"),
        (["reproduce", "fig1", "--lr", "0"], "--lr must be > 0"),
        (["reproduce", "fig1", "--max-steps", "0"], "--max-steps must be >= 1"),
        (["reproduce", "fig1", "--samples", "3"], "--samples must be >= 8"),
        (["reproduce", "fig2", "--samples", "100000", "--no-plot"], "num_samples must be an integer in [8, 1797]"),
    ],
)
def test_reproduce_row_figure_mistakes_give_one_line(argv, needle, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path), "--quiet"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"mrgd-ext reproduce {argv[1]}: error:") and needle in line


@pytest.mark.integration
def test_reproduce_row_figure_without_matplotlib_says_what_to_install(tmp_path):
    out = run_blocking("matplotlib", "reproduce", "fig4", "--out", tmp_path)
    assert out.returncode == 2
    line = one_line_error(out.stderr)
    assert "needs matplotlib" in line and "--no-plot" in line


@pytest.mark.integration
def test_reproduce_blog_end_to_end(tmp_path):
    out = tmp_path / "walk"
    proc = run_cli("reproduce", "blog", "--samples", "300", "--dims", "4,4,8", "--max-iter", "300", "--out",
                   str(out), "--quiet", "--no-plot")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "blog.json").read_text())
    # One measured group per block, at the exact group ends: SLQ runs n steps here, so its nodes are the
    # eigenvalues up to the loss of orthogonality of Lanczos without reorthogonalisation (measured 2e-4
    # relative at worst on this 16-dim problem; 1e-3 is far below the 10x gaps between groups).
    assert len(results["hessian"]["measured_groups"]) == 3
    for measured, exact in zip(results["hessian"]["measured_groups"], results["hessian"]["exact_groups"]):
        assert measured == pytest.approx(exact, rel=1e-3)
    runs = {r["method"]: r for r in results["training"]}
    assert runs["AutoMrGD subspace"]["iterations"] is not None
    assert runs["AutoMrGD temporal"]["iterations"] is not None
    assert "## 4. Training" in (out / "blog.md").read_text()


@pytest.mark.integration
def test_reproduce_blog_mistakes_are_one_line():
    proc = run_cli("reproduce", "blog", "--dims", "4,4", "--scales", "1,0.1,0.01")
    assert proc.returncode == 2
    assert "--dims has 2 blocks" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("reproduce", "blog", "--scales", "0.1,1,0.01")
    assert proc.returncode == 2 and "descending" in proc.stderr


def test_spectrum_writes_into_out_dir_and_prints_full_paths(tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)  # relative --out and --json: the printed paths must still be absolute
    argv = ["spectrum", "--problem", "diabetes", "-k", "2", "--block-size", "1", "--probes", "1", "--order", "4",
            "--out", "plots", "--json", "s.json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    png, js = tmp_path / "plots" / "mrgd_spectrum.png", tmp_path / "s.json"
    assert png.read_bytes()[:4] == b"\x89PNG" and json.loads(js.read_text())["n"] == 11
    assert f"wrote {png.resolve()}" in out and f"wrote {js.resolve()}" in out
