#!/usr/bin/env bash
# Static checks: ruff (style, pyflakes, import order; pyproject.toml [tool.ruff]) over the package, the tests
# and the benchmarks, then mypy (pyproject.toml [tool.mypy]: strict on the core modules). Both run even if the
# first fails; the exit status is non-zero if either reports anything.
#   MRGD_VENV   the environment holding ruff and mypy (default <repo>/.venv; scripts/setup_env.sh installs them)
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MRGD_VENV:-$repo/.venv}"
cd "$repo"
status=0
echo "== ruff check python tests benchmarks =="
"$venv/bin/ruff" check python tests benchmarks || status=1
echo "== mypy =="
"$venv/bin/mypy" || status=1
exit $status
