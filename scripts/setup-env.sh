#!/usr/bin/env bash
# Create .venv if missing and install dogbench into it (idempotent). Sourced by run.sh and test.sh.
# torch/torchvision are pinned to releases that pip can take from this machine's disk (x86_64: 2.14.1/0.29.1,
# aarch64: 2.9.1/0.24.1); elsewhere pip downloads them. Set DOGBENCH_VENV to use another folder.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DOGBENCH_VENV:-$repo/.venv}"
extras="${1:-}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$py" -c "import torch, torchvision" 2>/dev/null; then
  case "$(uname -m)" in
    aarch64|arm64) "$py" -m pip install -q torch==2.9.1 torchvision==0.24.1 ;;
    *) "$py" -m pip install -q torch==2.14.1 torchvision==0.29.1 ;;
  esac
fi
# Reinstall only when pyproject.toml (or the extras asked for) changed since the last install into this venv.
stamp="$venv/.dogbench-install-${extras:-base}"
want="$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1) $repo"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$py" -c "import dogbench" 2>/dev/null; then
  "$py" -m pip install -q -e "$repo${extras:+[$extras]}"
  echo "$want" > "$stamp"
fi
