#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv if missing, install, then `dogbench run` (defaults or your flags).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup-env.sh" >&2
exec "${DOGBENCH_VENV:-$repo/.venv}/bin/dogbench" run "$@"
