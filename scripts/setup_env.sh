#!/usr/bin/env bash
# Create (or reuse) the project virtual environment .venv and build mrgd_ext into it.
#
# Needs only python3 (>= 3.10), a C++20 compiler and the package registries. Sourced by scripts/test.sh and
# scripts/demo.sh; safe to run again (it reinstalls only what is missing and rebuilds incrementally).
#   MRGD_VENV         where the environment lives (default: <repo>/.venv)
#   MRGD_TORCH_SPEC   which torch to install when none is present (default: torch==2.13.0, the CPU build;
#                     any torch >= 2.4 works, e.g. a CUDA build to get the CUDA kernels)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MRGD_VENV:-$repo/.venv}"
torch_spec="${MRGD_TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install --disable-pip-version-check -q)

if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing $torch_spec"
  "${pip[@]}" "$torch_spec"
fi
# Build tools and the test/demo dependencies (build isolation is off so the build sees the installed torch;
# the installed torch is pinned in the same call so no dependency, curvlinops included, can move it).
installed_torch="torch==$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')"
"${pip[@]}" "$installed_torch" numpy "pybind11>=2.12" "scikit-build-core>=0.10" "cmake>=3.26" ninja \
  pytest pytest-timeout hypothesis scipy scikit-learn matplotlib tqdm ruff mypy curvlinops-for-pytorch
# Benchmark-only comparison libraries (benchmarks/bench_lanczos.py --problem wine); --no-deps so they cannot
# move torch (their own dependencies, numpy, scipy, torch and tqdm, are installed above).
"${pip[@]}" --no-deps "pyhessian==0.1" "hessian-eigenthings==1.0.0a5"

echo "[setup] building mrgd_ext against $("$py" -c 'import torch; print(torch.__version__)')"
( cd "$repo" && "${pip[@]}" --no-build-isolation --no-deps . )
"$py" -c "import mrgd_ext; print('[setup] mrgd_ext', mrgd_ext.__version__, mrgd_ext.build_info())"
