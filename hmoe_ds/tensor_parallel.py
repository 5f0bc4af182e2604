"""Tensor parallelism around the experts, as DeepSpeed's ``MoE`` does it with a Megatron-style ``mpu``.

Shape legend: A assignments (rows this rank sends to the experts), R rows
received by this rank's experts, D model width.

With a tensor-parallel (TP) model the non-expert layers are split over a TP
group and every rank of that group holds the *same* tokens. DeepSpeed's
``MoE`` (``deepspeed/moe/sharded_moe.py``, ``MOELayer.forward``) then does
one of two things, and HMoE does the same, as a variant of the token exchange
(:class:`~hmoe_ds.dispatch.TokenExchange`) so the layer keeps one code path:

``enable_expert_tensor_parallelism=True`` (:class:`ExpertTensorParallelExchange`):
    every TP rank computes every token, and each expert is itself split over
    the TP group. DeepSpeed leaves that split to the user's expert module (a
    Megatron ``ColumnParallelLinear``/``RowParallelLinear`` pair) and only
    builds the process groups with ``groups._create_expert_data_and_model_parallel``
    (expert TP size = TP size). HMoE does the same for the user's modules; its
    built-in FFN experts are split by HMoE: TP rank ``t`` holds hidden units
    ``[t h/tp, (t+1) h/tp)`` of each expert (rows of ``w1``/``w3``, columns of
    ``w2``), which is exact because SwiGLU hidden units are independent, and
    the partial outputs are summed over the TP group: the rows entering the
    experts pass :func:`copy_to_tensor_parallel` (forward identity, backward
    all-reduce) and the expert outputs :func:`reduce_from_tensor_parallel`
    (forward all-reduce, backward identity), Megatron's column/row pair.

``enable_expert_tensor_parallelism=False`` with TP > 1 (:class:`DuplicateTokenExchange`):
    the experts are whole, so the duplicated tokens must be computed once.
    DeepSpeed drops each TP rank's share of the capacity buffer before the
    all-to-all and gathers the outputs afterwards (``drop_tokens`` /
    ``gather_tokens``); HMoE's dispatch has no capacity buffer, so each TP rank
    sends an equal contiguous share of the assignment rows and the outputs are
    all-gathered back (forward narrow / backward all-gather, and the reverse),
    so every rank ends with every token's output and full input gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .dispatch import TokenExchange


@dataclass(frozen=True)
class TensorParallel:
    """The tensor-parallel group of this rank, as a Megatron-style ``mpu`` describes it.

    Attributes:
        group: the TP process group (``mpu.get_tensor_model_parallel_group()`` or
            ``get_model_parallel_group()``, as DeepSpeed's ``bwc`` helpers pick).
        size: TP world size.
        rank: this process's rank in it.
    """

    group: Any
    size: int
    rank: int

    @classmethod
    def from_mpu(cls, mpu: Any) -> "TensorParallel | None":
        """The TP group of ``mpu`` (DeepSpeed's ``bwc_tensor_model_parallel_*`` rules); ``None`` without one."""
        if mpu is None:
            return None
        from deepspeed.utils.bwc import (bwc_tensor_model_parallel_group, bwc_tensor_model_parallel_rank,
                                         bwc_tensor_model_parallel_world_size)

        size = int(bwc_tensor_model_parallel_world_size(mpu))
        if size <= 1:
            return None
        return cls(bwc_tensor_model_parallel_group(mpu), size, int(bwc_tensor_model_parallel_rank(mpu)))

    def hidden_slice(self, ffn_size: int) -> slice:
        """This rank's hidden units of an expert of FFN size ``ffn_size`` (which the TP size divides)."""
        part = ffn_size // self.size
        return slice(self.rank * part, (self.rank + 1) * part)


def check_divisible(expert_sizes: Sequence[int], tp_size: int) -> None:
    """Every expert's FFN size must split evenly over the TP group; else a ``ValueError`` naming both."""
    bad = [h for h in expert_sizes if h % tp_size != 0]
    if bad:
        raise ValueError(
            f"enable_expert_tensor_parallelism=True splits each expert's hidden units over the tensor-parallel "
            f"group of size {tp_size}, but expert size(s) {bad} are not multiples of {tp_size}: choose expert_sizes "
            f"divisible by {tp_size} (e.g. {[-(-h // tp_size) * tp_size for h in bad]})"
        )


class _CopyToTensorParallel(torch.autograd.Function):
    """Forward identity, backward all-reduce (sum) over the TP group: Megatron's ``copy_to_..._region``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Forward all-reduce (sum) over the TP group, backward identity: Megatron's ``reduce_from_..._region``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def copy_to_tensor_parallel(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """``x`` unchanged; its gradient is summed over the TP group (each rank's experts saw a slice)."""
    return _CopyToTensorParallel.apply(x, tp.group)


def reduce_from_tensor_parallel(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """The sum of ``x`` over the TP group (partial expert outputs); the gradient passes unchanged."""
    return _ReduceFromTensorParallel.apply(x, tp.group)


def _share(num_rows: int, tp: TensorParallel) -> tuple[int, int, int]:
    """``(start, end, chunk)``: this rank's contiguous share of ``num_rows`` rows, and the padded share size."""
    chunk = -(-num_rows // tp.size)
    start = min(tp.rank * chunk, num_rows)
    return start, min(start + chunk, num_rows), chunk


def _gather_shares(x_share: torch.Tensor, num_rows: int, tp: TensorParallel) -> torch.Tensor:
    """Every rank's share (padded to one size for the collective), concatenated back to ``num_rows`` rows."""
    chunk = -(-num_rows // tp.size)
    padded = x_share.new_zeros((chunk,) + tuple(x_share.shape[1:]))
    padded[: x_share.shape[0]] = x_share
    gathered = x_share.new_empty((chunk * tp.size,) + tuple(x_share.shape[1:]))
    dist.all_gather_into_tensor(gathered, padded.contiguous(), group=tp.group)
    return gathered[:num_rows]


class _DropRows(torch.autograd.Function):
    """Forward: this TP rank's share of the rows; backward: every rank's share gathered (DeepSpeed's ``_DropTokens``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:  # type: ignore[override]
        ctx.tp, ctx.num_rows = tp, x.shape[0]
        start, end, _ = _share(x.shape[0], tp)
        return x[start:end]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _gather_shares(grad.contiguous(), ctx.num_rows, ctx.tp), None


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's share gathered; backward: this rank's share (DeepSpeed's ``_GatherTokens``)."""

    @staticmethod
    def forward(ctx, x_share: torch.Tensor, num_rows: int, tp: TensorParallel) -> torch.Tensor:  # type: ignore[override]
        ctx.tp = tp
        ctx.span = _share(num_rows, tp)[:2]
        return _gather_shares(x_share.contiguous(), num_rows, tp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        start, end = ctx.span
        return grad[start:end].contiguous(), None, None


@dataclass(frozen=True)
class _ShareContext:
    inner: Any
    num_rows: int


class DuplicateTokenExchange:
    """TP > 1 with whole experts: each TP rank sends only its share of the (duplicated) assignment rows.

    Wraps the expert-parallel exchange. The assignment rows, grouped by slot,
    are the same on every rank of a TP group; rank ``t`` keeps the ``t``-th
    contiguous share (``ceil(A / tp)`` rows), recounts how many of them fall in
    each slot, and exchanges only those. After the reverse exchange the shares
    are all-gathered, so every TP rank combines every token as before: each
    assignment is computed once per TP group, as DeepSpeed's
    ``drop_tokens``/``gather_tokens`` arrange.
    """

    def __init__(self, inner: TokenExchange, tp: TensorParallel) -> None:
        self.inner = inner
        self.tp = tp

    def to_experts(self, x_AD: torch.Tensor, counts: Sequence[int]) -> tuple[torch.Tensor, list[int], Any]:
        num_rows = x_AD.shape[0]
        start, end, _ = _share(num_rows, self.tp)
        share_counts, row = [], 0
        for count in counts:  # rows of each slot inside [start, end)
            share_counts.append(max(0, min(row + int(count), end) - max(row, start)))
            row += int(count)
        x_share = _DropRows.apply(x_AD, self.tp)
        x_RD, local_counts, inner = self.inner.to_experts(x_share, share_counts)
        return x_RD, local_counts, _ShareContext(inner, num_rows)

    def from_experts(self, y_RD: torch.Tensor, context: Any) -> torch.Tensor:
        ctx: _ShareContext = context
        y_share = self.inner.from_experts(y_RD, ctx.inner)
        return _GatherRows.apply(y_share, ctx.num_rows, self.tp)


class ExpertTensorParallelExchange:
    """Expert tensor parallelism for HMoE's built-in experts, each TP rank holding a hidden slice.

    Every TP rank exchanges all its rows (the same on every rank of the TP
    group, and the expert-parallel groups pair equal TP ranks, so the same
    rows reach the same experts on each TP rank). The rows enter the experts
    through :func:`copy_to_tensor_parallel` and the partial outputs leave
    through :func:`reduce_from_tensor_parallel`, so the output, the input
    gradient and each slice's weight gradient equal those of the whole expert.
    """

    def __init__(self, inner: TokenExchange, tp: TensorParallel) -> None:
        self.inner = inner
        self.tp = tp

    def to_experts(self, x_AD: torch.Tensor, counts: Sequence[int]) -> tuple[torch.Tensor, list[int], Any]:
        x_RD, local_counts, context = self.inner.to_experts(x_AD, counts)
        return copy_to_tensor_parallel(x_RD, self.tp), local_counts, context

    def from_experts(self, y_RD: torch.Tensor, context: Any) -> torch.Tensor:
        return self.inner.from_experts(reduce_from_tensor_parallel(y_RD, self.tp), context)


def all_gather_hidden(weight: torch.Tensor, tp: TensorParallel, dim: int) -> torch.Tensor:
    """The whole expert matrix from every TP rank's hidden slice (``dim`` 0 for ``w1``/``w3``, 1 for ``w2``)."""
    pieces = [torch.empty_like(weight) for _ in range(tp.size)]
    dist.all_gather(pieces, weight.contiguous(), group=tp.group)
    return torch.cat(pieces, dim=dim)


__all__ = ["DuplicateTokenExchange", "ExpertTensorParallelExchange", "TensorParallel", "all_gather_hidden",
           "check_divisible", "copy_to_tensor_parallel", "reduce_from_tensor_parallel"]
