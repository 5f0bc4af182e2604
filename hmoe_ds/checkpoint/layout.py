"""What a checkpoint directory is made of: its file names, tags, format version, and the checkpoint error."""

from __future__ import annotations

from ..errors import CheckpointError  # re-exported: the old import path keeps working

__all__ = ["EXPERIMENT_FILE", "FORMAT", "FORMAT_VERSION", "LATEST", "MARKER", "MODEL_FILE", "NODE_LOCAL", "PROBE_FILE",
           "PROBE_TOKENS", "SET_ASIDE", "SHARED", "TAG_PREFIX", "TOKENIZER_DIR", "CheckpointError", "rank_file", "tag_for"]

FORMAT = "hmoe-ds-checkpoint"
# 2: per-rank logical shards replace the consolidated hmoe_model.safetensors, and ``files`` maps each file to
# ``{"size", "digest"}`` (1: to its size). Version 1 markers still verify, by size, and their checkpoints still
# export and resume at their own layout; an hmoe-ds that only knows 1 says "upgrade" for a version 2 marker.
FORMAT_VERSION = 2
MARKER = "hmoe_complete.json"
MODEL_FILE = "hmoe_model.safetensors"
PROBE_FILE = "hmoe_probe.safetensors"
EXPERIMENT_FILE = "hmoe_experiment.yaml"
TOKENIZER_DIR = "tokenizer"
LATEST = "latest"
SET_ASIDE = "checkpoints_set_aside"
TAG_PREFIX = "step_"
PROBE_TOKENS = 32
# The marker's ``storage.mode``: one directory for every rank, or one per node (DeepSpeed's
# ``checkpoint.use_node_local_storage``; :mod:`.storage`). A marker without ``storage`` is shared.
SHARED = "shared"
NODE_LOCAL = "node_local"


def tag_for(step: int) -> str:
    """The tag (directory name) of the checkpoint taken after optimizer step ``step``."""
    return f"{TAG_PREFIX}{step}"


def rank_file(rank: int) -> str:
    return f"hmoe_rank_{rank:05d}.pt"

