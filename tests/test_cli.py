"""The mrgd-ext command line, end to end in subprocesses (as a user runs it)."""

import json
import subprocess
import sys

import pytest


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "mrgd_ext", *args], capture_output=True, text=True, timeout=timeout)


def test_plan_prints_a_table_and_json():
    out = run_cli("plan", "--groups", "1:2,1e-3:2e-3", "--strategy", "nested")
    assert out.returncode == 0, out.stderr
    assert "cycle length" in out.stdout and "predicted iterations" in out.stdout
    js = run_cli("plan", "--groups", "1:2,1e-3:2e-3", "--json")
    data = json.loads(js.stdout)
    assert js.returncode == 0 and data["strategy"] in ("nested", "chebyshev-nested", "chebyshev")


@pytest.mark.parametrize(
    "groups,needle",
    [("1:2,3:4", "sorted"), ("1-2", "'a:b'"), ("x:2", "not two numbers"), ("2:1", "item 0"), ("", "empty")],
)
def test_plan_mistakes_give_one_line_and_status_2(groups, needle):
    out = run_cli("plan", "--groups", groups)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert needle in out.stderr


def test_info_reports_the_build():
    out = run_cli("info", "--json")
    info = json.loads(out.stdout)
    assert out.returncode == 0 and {"version", "torch_version", "cuda", "openmp", "cpu_isa"} <= set(info)


def test_demo_prints_the_figure3_table():
    out = run_cli("demo", "--seeds", "1", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "MrGD auto" in out.stdout and "Heavy ball" in out.stdout and "GD, lr" in out.stdout


def test_help_on_every_command():
    for cmd in ([], ["demo"], ["plan"], ["info"]):
        out = run_cli(*cmd, "--help")
        assert out.returncode == 0 and "usage: mrgd-ext" in out.stdout
