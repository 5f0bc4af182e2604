"""Crash-safe, self-describing training checkpoints around DeepSpeed's ``save_checkpoint``.

A checkpoint is ``<run>/checkpoints/step_<n>/``. DeepSpeed writes its own files
there (model/optimizer shards, one file per expert under ZeRO 0-2) with
``save_latest=False``; then every rank adds what DeepSpeed does not keep:

``hmoe_rank_<r>.pt``           this rank's data-loader position and RNG states (python, numpy, torch).
                               DeepSpeed's ``client_state`` is written by rank 0 only, so per-rank
                               state needs per-rank files.
``hmoe_shard_<r>.safetensors`` this rank's *logical* shard (:mod:`hmoe_ds.shards`): the fp32 master
                               weights and optimizer states of the parameter slices this rank owns,
                               under the parameter names of ``HMoEForCausalLM`` with ``ep_size=1``
                               and ``frontend="moe"`` whatever ZeRO stage, EP size, placement or
                               front-end trained it. Nothing is gathered: export, evaluation,
                               re-sharding and elastic resume stream them back
                               (``ShardReader``). DeepSpeed's ``zero_to_fp32``/``save_16bit_model``
                               cannot read these MoE checkpoints; the ``zero_to_fp32.py`` (and
                               ``zero_to_torch.py``) DeepSpeed copies into ``checkpoints/`` is
                               replaced after each save by one that runs hmoe-ds's exporter
                               (``zero_to_fp32_script.py``). (Format 1 checkpoints held one
                               consolidated ``hmoe_model.safetensors`` instead; they still load.)
``hmoe_probe.safetensors``     a short validation sequence and the logits the training engine
                               computed for it: export checks its result against these.
``hmoe_experiment.yaml``, ``tokenizer/``   the resolved experiment and the tokenizer, so a
                               checkpoint directory is self-contained.
``hmoe_complete.json``         the completion marker, written last by rank 0 after a barrier: step,
                               world size, ZeRO stage, the expert placement of every MoE layer, the
                               training and logical model configs, the storage mode (node-local: which
                               node and whose files) and every file with its size and content checksum
                               (XXH3-128, :mod:`hmoe_ds.integrity`).

With node-local storage (DeepSpeed's ``checkpoint.use_node_local_storage``) each
node has its own ``step_<n>/`` holding its ranks' files, written and marked by
its local rank 0; a resume takes the newest tag complete on every node
(:mod:`.storage`).

Only after the marker is durable is ``checkpoints/latest`` replaced (temp file +
``os.replace``), so a process killed at any moment leaves either the previous
complete checkpoint as newest, or the new one complete. ``--resume`` picks the
newest directory *with* a marker whose files all match their recorded sizes and
checksums, and says which ones it skipped and why (naming the damaged file);
skipped directories are moved to ``checkpoints_set_aside/``, never deleted or
overwritten.

One module per job: :mod:`.layout` (file names, tags, the error type),
:mod:`.atomic_io` (crash-proof writes), :mod:`.rank_state` (per-rank loader and
RNG state), :mod:`.marker` (completion marker, verification, fitting a run),
:mod:`.rundir` (``latest``, the resume choice, setting aside), :mod:`.storage`
(shared or node-local directories, who writes them, the tag every node agrees
on) and :mod:`.save` (the collective save). Logical names live in :mod:`hmoe_ds.naming`, the
logical shards in :mod:`hmoe_ds.shards`; training, export and evaluation use
them alike.
"""

from __future__ import annotations

from .atomic_io import atomic_safetensors, atomic_torch_save, atomic_write_text
from .layout import (
    EXPERIMENT_FILE,
    FORMAT,
    FORMAT_VERSION,
    LATEST,
    MARKER,
    MODEL_FILE,
    NODE_LOCAL,
    PROBE_FILE,
    PROBE_TOKENS,
    SET_ASIDE,
    SHARED,
    TAG_PREFIX,
    TOKENIZER_DIR,
    CheckpointError,
    rank_file,
    tag_for,
)
from .marker import (
    check_compatible,
    check_node_local_fit,
    missing_rank_files,
    node_local_fix,
    read_marker,
    verify_checkpoint,
    write_marker,
)
from .rank_state import load_rank_state, restore_cpu_adam_step_state, rng_state, save_rank_state, set_rng_state
from .rundir import (
    CheckpointInfo,
    checkpoint_dir_names,
    checkpoint_info,
    find_resume_checkpoint,
    has_checkpoint_dirs,
    marked_checkpoints,
    prepare_tag_dir,
    read_latest,
    set_aside,
    set_aside_newer_checkpoints,
    set_aside_unusable_checkpoints,
    truncate_metrics,
    write_latest,
)
from .save import maybe_kill_during_step, probe_logits, save_training_checkpoint
from .storage import (
    CheckpointStorage,
    agree_on_checkpoint,
    check_storage_is_node_local,
    checkpoint_storage,
    common_complete_tags,
)

__all__ = [
    "CheckpointError", "CheckpointInfo", "CheckpointStorage", "EXPERIMENT_FILE", "FORMAT", "FORMAT_VERSION", "LATEST",
    "MARKER", "MODEL_FILE", "NODE_LOCAL", "PROBE_FILE", "PROBE_TOKENS", "SET_ASIDE", "SHARED", "TAG_PREFIX",
    "TOKENIZER_DIR", "agree_on_checkpoint", "atomic_safetensors", "atomic_torch_save", "atomic_write_text",
    "check_compatible", "check_node_local_fit", "check_storage_is_node_local", "checkpoint_dir_names",
    "checkpoint_info", "checkpoint_storage", "common_complete_tags", "find_resume_checkpoint", "has_checkpoint_dirs",
    "load_rank_state", "marked_checkpoints", "maybe_kill_during_step", "missing_rank_files", "node_local_fix",
    "prepare_tag_dir", "probe_logits", "rank_file", "read_latest", "read_marker", "restore_cpu_adam_step_state", "rng_state",
    "save_rank_state", "save_training_checkpoint", "set_aside", "set_aside_newer_checkpoints",
    "set_aside_unusable_checkpoints", "set_rng_state", "tag_for", "truncate_metrics", "verify_checkpoint",
    "write_latest", "write_marker",
]
