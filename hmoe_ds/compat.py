"""The DeepSpeed versions hmoe-ds is tested with, checked where we rely on internals.

Both layer front-ends depend on DeepSpeed details that are not public API: the
``deepspeed_moe.experts.deepspeed_experts`` naming the engine's per-expert
checkpoint files key on, ``groups._create_expert_and_data_parallel``, and (for
ZeRO-3) ``AutoEPMoELayer``'s attributes and placement tags. Outside the tested
range we refuse to build a layer rather than train silently wrong; set
``HMOE_DS_SKIP_VERSION_CHECK=1`` to try anyway.
"""

from __future__ import annotations

import os

import deepspeed
from packaging.version import Version

TESTED_DEEPSPEED_MIN = Version("0.19.8")
TESTED_DEEPSPEED_BELOW = Version("0.20.0")


def check_deepspeed_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless DeepSpeed is in ``[0.19.8, 0.20.0)``."""
    if os.environ.get("HMOE_DS_SKIP_VERSION_CHECK") == "1":
        return
    found = Version(version or deepspeed.__version__)
    if not (TESTED_DEEPSPEED_MIN <= found < TESTED_DEEPSPEED_BELOW):
        raise RuntimeError(
            f"hmoe-ds is tested with deepspeed >= {TESTED_DEEPSPEED_MIN}, < {TESTED_DEEPSPEED_BELOW}; found "
            f"{found}. Install the tested release (pip install deepspeed==0.19.8, or ./run/setup.sh), or set "
            "HMOE_DS_SKIP_VERSION_CHECK=1 to try this version at your own risk."
        )
