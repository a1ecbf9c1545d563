#!/usr/bin/env bash
# Set up the environment with the test extra, check the import contract (.importlinter), then
# run the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh" test
cd "$ROOT"
python launch/check_imports.py
exec python -m pytest -q -p no:cacheprovider "$@"
