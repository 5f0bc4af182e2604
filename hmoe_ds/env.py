"""Process environment defaults for hmoe-ds entry points (the Python twin of ``run/env.sh``).

Call :func:`configure_environment` before DeepSpeed is imported: DeepSpeed picks
its accelerator at import time, and the CPU accelerator must be chosen when no
CUDA device exists so one command works on a laptop, in CI and on GPU nodes.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def configure_environment() -> None:
    """Set ``DS_ACCELERATOR=cpu`` without CUDA, keep every hub offline, build ops with this environment's ninja.

    Never overrides what the user set, except that this interpreter's ``bin`` goes first on ``PATH`` when
    another ``ninja`` would be found before the one installed there (see :func:`use_this_environments_ninja`).
    """
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    # Nothing is downloaded at run time: data and tokenizer come from installed packages or local files.
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DeepSpeed JIT-compiles C++ ops (cpu_adam, shm comm) into torch's extension cache. Keep that cache per
    # Python environment: a shared ~/.cache/torch_extensions is rebuilt whenever another venv's headers
    # differ, and a build killed part-way there leaves a lock on which every later run waits.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    use_this_environments_ninja()


def use_this_environments_ninja() -> None:
    """Put this interpreter's ``bin`` first on ``PATH`` if another ``ninja`` would be found before its own.

    DeepSpeed JIT-builds its C++ ops (the CPU all-reduce, CPU Adam) with whichever
    ``ninja`` is first on ``PATH``. The ``ninja`` package installs one in the venv's
    ``bin``; a rank started without that on ``PATH`` (``mpirun .venv/bin/python
    run/train.py``, a job script) found the system's instead, whose build log the
    venv's cannot read and vice versa: every switch between the two rebuilt the
    ops from scratch (about 45 s on a 2-core machine). ``run/env.sh`` puts the
    venv first for the shell; this does it for the Python entry points.
    """
    bin_dir = Path(sys.executable).parent
    own = bin_dir / "ninja"
    found = shutil.which("ninja")
    if not own.is_file() or (found is not None and Path(found).resolve() == own.resolve()):
        return
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(bin_dir), path]) if path else str(bin_dir)
