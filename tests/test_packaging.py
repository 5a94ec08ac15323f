"""Packaging: one version source, and a wheel that installs and works in a fresh venv with the same torch.

The wheel test builds with ``pip wheel --no-build-isolation --no-deps .`` (against the torch running these
tests, as a user must), creates a venv without system site-packages, installs the same torch release into
it (pip takes it from this machine's disk) and then the wheel, and runs the installed ``mrgd-ext`` from
outside the repository, so nothing can be imported from the source tree. About 1-2 minutes (wheel ~35 s
with a fresh build folder, torch ~30 s); marked slow.
"""

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
VERSION_FILE = REPO / "python" / "mrgd_ext" / "_version.py"


def _version() -> str:
    match = re.search(r'^__version__ = "([^"]+)"$', VERSION_FILE.read_text(), re.MULTILINE)
    assert match, f"{VERSION_FILE} must assign __version__ = \"X.Y.Z\" on one line (the build reads it by regex)"
    return match.group(1)


def test_the_version_lives_only_in_version_py():
    text = (REPO / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^dynamic = \[.*"version".*\]', project, re.MULTILINE), "[project] must take version as dynamic"
    assert not re.search(r"^version\s*=", project, re.MULTILINE), "[project] must not hard-code a version"
    assert 'input = "python/mrgd_ext/_version.py"' in text
    version = _version()
    v = re.escape(version)
    # No other source file spells the version out (CMake gets it from scikit-build-core as
    # SKBUILD_PROJECT_VERSION, the package re-exports mrgd_ext._version.__version__). Result tables record
    # the version of the build they measured, as they should.
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    literal = re.compile(rf"""(["']{v}["']|VERSION\s+{v}\b|version\s*[:=]\s*{v}\b)""")
    spelled = [
        f for f in tracked
        if f.endswith((".py", ".toml", ".txt", ".cpp", ".h", ".cu", ".sh", ".cfg", ".md"))
        and f != "python/mrgd_ext/_version.py" and not f.startswith("benchmarks/results/")
        and (REPO / f).is_file() and literal.search((REPO / f).read_text(errors="replace"))
    ]
    assert spelled == [], f"the version {version} is hard-coded in {spelled}"


def _run(cmd, cwd, timeout, what):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.integration
def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    version = _version()
    wheels = tmp_path / "wheels"
    # A build folder of its own: the development install's build/{wheel_tag} may be in use by another build.
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", ".", "-w", wheels,
          "-C", "build-dir=build/packaging-test/{wheel_tag}"], REPO, 900, "pip wheel")
    built = sorted(wheels.glob("mrgd_ext-*.whl"))
    assert len(built) == 1, built
    wheel = built[0]
    assert wheel.name.startswith(f"mrgd_ext-{version}-")

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(f"mrgd_ext-{version}.dist-info/METADATA").decode()
        entry_points = zf.read(f"mrgd_ext-{version}.dist-info/entry_points.txt").decode()
    assert "mrgd_ext/py.typed" in names
    assert any(re.fullmatch(r"mrgd_ext/_C\..*\.so", n) for n in names), names
    assert not any(n.startswith(("tests/", "benchmarks/", "csrc/")) for n in names)
    assert f"\nVersion: {version}\n" in meta
    for extra in ("plot", "cli", "dev"):
        assert f"Provides-Extra: {extra}" in meta
    assert re.search(r"^Requires-Dist: torch>=2\.4$", meta, re.MULTILINE)
    for dep in ("tqdm", "matplotlib", "scikit-learn"):  # what the CLI's optional commands import
        assert re.search(rf"^Requires-Dist: {dep}\b.*extra == \"cli\"", meta, re.MULTILINE), dep
    assert "mrgd-ext = mrgd_ext.cli:main" in entry_points

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path, 300, "python -m venv")
    py, cli = venv / "bin" / "python", venv / "bin" / "mrgd-ext"
    torch_spec = f"torch=={torch.__version__}"
    proc = subprocess.run([py, "-m", "pip", "install", "-q", torch_spec], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        if "No matching distribution found" in proc.stderr:
            pytest.skip(f"{torch_spec} cannot be installed into a fresh venv here (no local copy, no index)")
        pytest.fail(f"installing {torch_spec} failed:\n{proc.stderr[-3000:]}")
    _run([py, "-m", "pip", "install", "-q", wheel], tmp_path, 600, "installing the wheel")

    # From outside the repository: only the installed package can be imported.
    where = _run([py, "-c", "import mrgd_ext, torch; print(mrgd_ext.__file__); print(torch.__version__)"],
                 tmp_path, 120, "import mrgd_ext").stdout.split()
    package = Path(where[0]).parent
    assert package.is_relative_to(venv) and (package / "py.typed").is_file()
    assert where[1] == torch.__version__
    info = json.loads(_run([cli, "info", "--json"], tmp_path, 120, "mrgd-ext info").stdout)
    assert info["version"] == version and info["torch_version"] == torch.__version__
    plan = json.loads(_run([cli, "plan", "--groups", "1:2,1e-3:2e-3", "--json"], tmp_path, 120, "mrgd-ext plan").stdout)
    assert plan["cycle"] and all(r > 0 for r in plan["cycle"])
    _run([py, "-c", "import torch, mrgd_ext\n"
                    "p = torch.ones(5, requires_grad=True); p.grad = torch.ones(5)\n"
                    "mrgd_ext.MrGD([p], plan=[0.25], fused=True).step()\n"
                    "assert p.tolist() == [0.75] * 5, p"], tmp_path, 120, "a fused MrGD step")

    # The fresh venv has none of the CLI's optional dependencies: the commands that need them say which, in
    # one line; the benchmark suite is not in the wheel.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for argv, needle in ((["demo", "--no-plot"], "needs scikit-learn"), (["bench"], "no benchmark suite")):
        proc = subprocess.run([cli, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
