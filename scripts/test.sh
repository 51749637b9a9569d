#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv if missing, install with test extras, lint, then pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup-env.sh" test
# The report and demo tests open pages in headless Chromium (Debian's package; Playwright drives it, from the test
# extras). Installed here when missing and this user may (root with apt-get); otherwise those tests skip, and
# fail under CI.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
fi
venv="${DOGBENCH_VENV:-$repo/.venv}"
cd "$repo"
"$venv/bin/ruff" check src tests benchmarks
# One worker per core (DOGBENCH_TEST_WORKERS=0: no workers); a module's tests stay on one worker, which builds its
# module-scoped runs once; each worker runs torch on one thread (tests/conftest.py). xdist's own module order
# (most tests first) measured faster here than longest-first, which ran the multi-process tests side by side.
exec "$venv/bin/python" -m pytest -n "${DOGBENCH_TEST_WORKERS:-auto}" --dist loadscope "$@"
