#!/usr/bin/env bash
# Set up (idempotent), then run the whole test suite, slow multi-rank tests included.
# Tests run on HMOE_DS_TEST_WORKERS pytest-xdist workers (default 2; the tests that share a launched
# run stay on one worker, tests/conftest.py). Extra arguments go to pytest and win over these defaults,
# e.g. ./run/test.sh -m "not slow" -x, or ./run/test.sh -n 0 -s to debug in one process.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/run/setup.sh"
cd "$repo"
source run/env.sh
exec .venv/bin/python -m pytest -n "${HMOE_DS_TEST_WORKERS:-2}" --dist loadgroup --no-loadscope-reorder "$@"
