#!/usr/bin/env bash
# Set up (idempotent), then run the whole test suite, slow multi-rank tests included.
# Extra arguments go to pytest, e.g. ./run/test.sh -m "not slow" -x
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/run/setup.sh"
cd "$repo"
source run/env.sh
exec .venv/bin/python -m pytest "$@"
