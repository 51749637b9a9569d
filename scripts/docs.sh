#!/usr/bin/env bash
# The documentation's checks (CI runs them after the test suite, in the test venv): the generated CLI and config
# references match the code; the site builds with `mkdocs build --strict` and reads in headless Chromium (search
# included); every runnable block of the tutorials runs, offline, against ../shared's data and weights.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${DOGBENCH_VENV:-$repo/.venv}/bin/python"
cd "$repo"
"$py" scripts/docs_reference.py --check
"$py" scripts/check_site.py "$@"
shared="${DOGBENCH_SHARED:-$repo/../shared}"
if [ -d "$shared/data/stanford-dogs-dev" ]; then
  "$py" scripts/run_tutorials.py --shared "$shared"
elif [ -n "${CI:-}" ]; then
  echo "CI: $shared/data/stanford-dogs-dev is missing, so the tutorials cannot run" >&2
  exit 1
else
  echo "no $shared: the tutorials' runnable blocks were not run"
fi
