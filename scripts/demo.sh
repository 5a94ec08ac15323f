#!/usr/bin/env bash
# Set up .venv (scripts/setup_env.sh) and run the main demo: `mrgd-ext demo`. Extra arguments go to it.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
exec "$venv/bin/mrgd-ext" demo "$@"
