#!/usr/bin/env bash
# Set up the environment if needed, then run the test suite.
#   bash tools/run_tests.sh                 # the default (fast) suite
#   bash tools/run_tests.sh -k registry     # extra args go to pytest
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash tools/setup_env.sh
VENV="${MMLOCAL_VENV:-$REPO/.venv}"
exec "$VENV/bin/python" -m pytest tests "$@"
