"""Process environment defaults for hmoe-ds entry points (the Python twin of ``run/env.sh``).

Call :func:`configure_environment` before DeepSpeed is imported: DeepSpeed picks
its accelerator at import time, and the CPU accelerator must be chosen when no
CUDA device exists so one command works on a laptop, in CI and on GPU nodes.
"""

from __future__ import annotations

import os
import sys


def configure_environment() -> None:
    """Set ``DS_ACCELERATOR=cpu`` without CUDA, and keep every hub offline; never override the user."""
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
