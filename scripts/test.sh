#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv if missing, install with test extras, lint, then pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup-env.sh" test
venv="${DOGBENCH_VENV:-$repo/.venv}"
cd "$repo"
"$venv/bin/ruff" check src tests benchmarks
exec "$venv/bin/python" -m pytest "$@"
