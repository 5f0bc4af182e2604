"""The standalone Hugging Face model files that every export carries.

``configuration_hmoe.py`` and ``modeling_hmoe.py`` import only torch,
transformers and the standard library. ``run/export.py`` copies them verbatim
next to the weights (:data:`MODEL_FILES`) and points ``auto_map`` in
``config.json`` at them, so an export loads with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` without
hmoe-ds or DeepSpeed. :mod:`hmoe_ds.modeling` builds the training model on the
same classes, replacing only the MoE layer.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["AUTO_MAP", "MODEL_FILES", "source_files"]

#: The files copied into an export, in this package's directory.
MODEL_FILES = ("configuration_hmoe.py", "modeling_hmoe.py")

#: ``config.json``'s ``auto_map``: where ``trust_remote_code`` finds the classes in an export.
AUTO_MAP = {
    "AutoConfig": "configuration_hmoe.HMoEConfig",
    "AutoModel": "modeling_hmoe.HMoEModel",
    "AutoModelForCausalLM": "modeling_hmoe.HMoEForCausalLM",
}


def source_files() -> list[Path]:
    """Paths of :data:`MODEL_FILES` in the installed package."""
    here = Path(__file__).resolve().parent
    return [here / name for name in MODEL_FILES]
