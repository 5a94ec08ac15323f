#!/usr/bin/env bash
# Set up .venv (scripts/setup_env.sh) and run the whole test suite: the unit tier and the integration tier
# (plain `pytest` runs only the unit tier; see pyproject.toml's [tool.pytest.ini_options]). Extra arguments go
# to pytest; a later `-m EXPR` replaces the `-m ""` that selects both tiers.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
exec "$venv/bin/python" -m pytest -q -m "" "$@"
