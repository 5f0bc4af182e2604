"""Deterministic, resumable, data-parallel batch iterators over packed LM datasets.

Training (:class:`TrainBatchIterator`), per epoch ``e``:

1. ``perm = numpy.random.default_rng([seed, e]).permutation(N)`` -- identical on every rank,
   with no communication, because it depends only on (seed, epoch, N);
2. the first ``usable = (N // (W * B)) * W * B`` entries are kept (the remaining
   ``N - usable`` examples, a different random subset each epoch, are skipped so
   that every rank runs the same number of steps and no collective waits forever);
3. rank ``r`` takes ``perm[:usable][r::W]`` and yields it in consecutive
   micro-batches of ``B``.

The whole state is ``(epoch, position)`` = batches already yielded in the
current epoch, so ``load_state_dict(state_dict())`` on a fresh iterator
continues with exactly the batches an uninterrupted one would yield.

Evaluation (:class:`EvalBatchIterator`): no shuffle; rank ``r`` takes
examples ``r, r+W, r+2W, ...`` in order; its last batch may be smaller than
``B``, nothing is dropped, so across ranks every example is seen exactly once.
Ranks can therefore get different batch counts (by at most one): accumulate
sums (loss x tokens, tokens) locally and all-reduce once after the loop, not
per batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["EvalBatchIterator", "TrainBatchIterator"]

Batch = dict[str, torch.Tensor]


def _check_dp(micro_batch_size: int, rank: int, world_size: int) -> None:
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} / world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size.")


def _fetch(dataset: Any, indices: Sequence[int]) -> Batch:
    """Gather rows into ``{"input_ids": LongTensor[B, L], "labels": copy}`` (labels unshifted; the model shifts)."""
    rows = dataset[[int(i) for i in indices]]["input_ids"]
    # shape: [B, L]
    ids = torch.as_tensor(np.asarray(rows), dtype=torch.long) if not isinstance(rows, torch.Tensor) else rows.long()
    # A copy, so that masking labels in place (e.g. -100 for padding) never alters input_ids.
    return {"input_ids": ids, "labels": ids.clone()}


class TrainBatchIterator:
    """Endless, epoch-based, sharded iterator of training micro-batches.

    Args:
        dataset: anything with ``len()`` whose ``dataset[list_of_indices]["input_ids"]``
            returns ``[B, L]`` ids (a ``datasets.Dataset`` from :func:`build_lm_datasets`).
        micro_batch_size: ``B``, examples per batch on this rank.
        rank, world_size: data-parallel rank and size (not the global rank when
            tensor/expert parallel groups replicate data).
        seed: seeds the per-epoch permutations.

    Yields ``{"input_ids": LongTensor[B, L], "labels": LongTensor[B, L]}`` forever;
    ``epoch`` and ``position`` tell where it is.
    """

    def __init__(self, dataset: Any, micro_batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        _check_dp(micro_batch_size, rank, world_size)
        self.dataset = dataset
        self.num_examples = len(dataset)
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.batches_per_epoch = self.num_examples // (world_size * micro_batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"Dataset has {self.num_examples} examples, fewer than world_size * micro_batch_size = "
                f"{world_size} * {micro_batch_size}; lower micro_batch_size or block_size, or add data."
            )
        self.epoch = 0
        self.position = 0  # batches already yielded in `epoch`
        self._shard: np.ndarray | None = None  # indices of this rank for `epoch`, built lazily

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's example indices for ``epoch``, in yield order; shape ``[batches_per_epoch * B]``."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        usable = self.batches_per_epoch * self.world_size * self.micro_batch_size
        return perm[:usable][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.position == self.batches_per_epoch:
            self.epoch, self.position, self._shard = self.epoch + 1, 0, None
        if self._shard is None:
            self._shard = self.epoch_indices(self.epoch)
        b = self.micro_batch_size
        batch = _fetch(self.dataset, self._shard[self.position * b : (self.position + 1) * b])
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """Position plus the settings it is only meaningful with."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
            "num_examples": self.num_examples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from :meth:`state_dict`. The settings must match, else the batches would differ."""
        for k in ("seed", "micro_batch_size", "world_size", "num_examples"):
            if state[k] != getattr(self, k):
                raise ValueError(
                    f"Cannot resume: saved {k}={state[k]} but this iterator has {k}={getattr(self, k)}; "
                    "resume with the same data, seed, micro_batch_size and data-parallel size."
                )
        if not 0 <= state["position"] <= self.batches_per_epoch or state["epoch"] < 0:
            raise ValueError(f"Invalid loader state epoch={state['epoch']} position={state['position']} (batches_per_epoch={self.batches_per_epoch}).")
        self.epoch, self.position, self._shard = int(state["epoch"]), int(state["position"]), None


    def load_global_state(self, state: dict[str, int]) -> None:
        """Resume a :meth:`state_dict` saved at another data-parallel size or micro-batch size.

        Rank r's micro-batch k holds entries ``(k*B + j)*W + r`` of the epoch's
        permutation, so after k micro-batches per rank the first ``k*B*W``
        entries are used, whatever W: the position carries over in samples and
        the following global batches contain the same examples (grouped into
        micro-batches differently). Only the end of an epoch differs (each
        layout drops its own ``N mod (W*B)`` remainder).
        """
        for k in ("seed", "num_examples"):
            if state[k] != getattr(self, k):
                raise ValueError(f"Cannot resume: saved {k}={state[k]} but this iterator has {k}={getattr(self, k)}; "
                                 "resume with the same data and seed.")
        consumed = int(state["position"]) * int(state["micro_batch_size"]) * int(state["world_size"])
        per_batch = self.micro_batch_size * self.world_size
        if consumed % per_batch:
            raise ValueError(f"Cannot resume: {consumed} samples of epoch {state['epoch']} were used, not a multiple of "
                             f"micro_batch_size x data-parallel size = {per_batch}; keep the global batch size")
        self.epoch, self.position, self._shard = int(state["epoch"]), min(consumed // per_batch,
                                                                          self.batches_per_epoch), None


class EvalBatchIterator:
    """Re-iterable pass over a validation set: rank-strided, in order, last batch possibly partial.

    ``len()`` is this rank's number of batches. See the module docstring for how
    to reduce across ranks.
    """

    def __init__(self, dataset: Any, micro_batch_size: int, *, rank: int = 0, world_size: int = 1) -> None:
        _check_dp(micro_batch_size, rank, world_size)
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.indices = np.arange(rank, len(dataset), world_size)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.micro_batch_size)

    def __iter__(self) -> Iterator[Batch]:
        b = self.micro_batch_size
        for start in range(0, len(self.indices), b):
            yield _fetch(self.dataset, self.indices[start : start + b])
