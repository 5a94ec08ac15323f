#!/usr/bin/env bash
# Static checks: ruff (style, pyflakes, import order, bugbear, pyupgrade; pyproject.toml [tool.ruff]) over the
# package, the tests, the benchmarks and the examples, then mypy (pyproject.toml [tool.mypy]: strict on the
# core modules, check_untyped_defs on the rest). Both run even if the first fails; the exit status is non-zero
# if either reports anything.
#   MRGD_VENV   the environment holding ruff and mypy (default <repo>/.venv). mypy needs torch and numpy
#               there too (their annotations), so when the tools are missing scripts/setup_env.sh creates
#               or completes the environment first.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MRGD_VENV:-$repo/.venv}"
if [ ! -x "$venv/bin/ruff" ] || [ ! -x "$venv/bin/mypy" ]; then
  MRGD_VENV="$venv" bash "$repo/scripts/setup_env.sh" || exit 1
fi
cd "$repo"
status=0
echo "== ruff check python tests benchmarks examples =="
"$venv/bin/ruff" check python tests benchmarks examples || status=1
echo "== mypy =="
"$venv/bin/mypy" || status=1
exit $status
