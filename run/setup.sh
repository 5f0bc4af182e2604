#!/usr/bin/env bash
# Idempotent set-up: create (or reuse) .venv in the repository and install
# hmoe-ds with its test and eval extras, and the zero-shot task data. Safe to run again; reinstalls only when
# pyproject.toml changed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "hmoe-ds needs Python >= 3.10; '$python' is $("$python" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$python" -m venv .venv
fi
# DeepSpeed JIT-compiles its CPU ops on first use. Build them here, once and serially, so the ranks of a
# run never compile concurrently (or get killed mid-build, leaving a lock every later run waits on).
build_ops() {
  local ops_stamp=".venv/.hmoe-ds-ops-built"
  [ -f "$ops_stamp" ] && return 0
  ( source run/env.sh
    [ "${DS_ACCELERATOR:-}" = cpu ] || exit 0
    echo "[setup] building DeepSpeed's CPU ops (cpu_adam, shm comm) into .venv/torch_extensions, once (~1-2 min)"
    if ! .venv/bin/python - > .venv/ops-build.log 2>&1 <<'PY'
from hmoe_ds.env import configure_environment

configure_environment()
from deepspeed.accelerator import get_accelerator

for name in ("CPUAdamBuilder", "ShareMemCommBuilder"):
    get_accelerator().create_op_builder(name).load(verbose=False)
PY
    then
      echo "[setup] building DeepSpeed's CPU ops failed (needs g++ and ninja); see .venv/ops-build.log" >&2
      exit 1
    fi )
  touch "$ops_stamp"
}

# The offline zero-shot tasks (run/zero_shot.py) read BIG-bench data extracted once from the bigbench sdist
# on PyPI into hmoe-ds's cache; a no-op when present.
prepare_eval_data() {
  if ! .venv/bin/python run/zero_shot.py --prepare_data; then
    echo "[setup] preparing the zero-shot task data failed (see above)" >&2
    exit 1
  fi
}

stamp=".venv/.hmoe-ds-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  build_ops
  prepare_eval_data
  echo "[setup] .venv is up to date"
  exit 0
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
# torch first: pinned to the tested release. Without a GPU this resolves to the
# CPU wheel (set HMOE_TORCH_INDEX_URL to a CPU wheel index elsewhere); with CUDA
# the same version's CUDA build is used. Installing it first stops any other
# package from pulling an unpinned, multi-GB CUDA build.
torch_args=(torch==2.13.0)
if [ -n "${HMOE_TORCH_INDEX_URL:-}" ]; then torch_args+=(--index-url "$HMOE_TORCH_INDEX_URL"); fi
echo "[setup] installing torch==2.13.0"
"${pip[@]}" install -q "${torch_args[@]}"
echo "[setup] installing hmoe-ds and its test and eval extras"
"${pip[@]}" install -q -e ".[test,eval]"
rm -f .venv/.hmoe-ds-ops-built  # new packages: build the ops against them
build_ops
prepare_eval_data
echo "$want" > "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch, deepspeed; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}")')"
