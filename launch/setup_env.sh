#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install megalora into it.
# Usage: source launch/setup_env.sh [extra]   e.g. `test` for the test extra.
# VENV (default .venv) chooses the folder. torch is pinned to the CPU build found on
# CPU-only machines; on GPU machines install the `gpu` extra as well.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
EXTRA="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
spec="$ROOT"
[ -n "$EXTRA" ] && spec="$ROOT[$EXTRA]"
"$VENV/bin/python" -m pip install -q -e "$spec"
export PATH="$VENV/bin:$PATH"
