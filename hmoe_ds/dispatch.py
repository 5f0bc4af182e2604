"""Token dispatch and combine: group (token, expert) assignments by expert.

Shape legend: T tokens, D width, E experts, S expert slots (= E, in placement
order), A kept assignments, R rows received by this rank's experts.

Pipeline (no dense ``[T, E, capacity]`` tensor anywhere):

1. :func:`plan_dispatch` turns the router's ``[T, E]`` selection into a flat
   list of assignments sorted by expert slot, optionally enforcing a capacity
   (dropped assignments are counted). Its output is frozen metadata.
2. A :class:`TokenExchange` moves the grouped rows to the ranks that own the
   experts and back: :class:`LocalExchange` (``ep_size == 1``) is the identity,
   :class:`AllToAllExchange` does the uneven all-to-all (counts first, then
   ``all_to_all_single`` with split sizes), so layer math never calls
   ``torch.distributed`` itself. ``to_experts`` sends, ``from_experts``
   brings the expert outputs back in the sender's assignment order.
3. :func:`scatter_to_tokens` adds expert outputs back to their tokens
   weighted by the gates, accumulating in fp32.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
import torch.distributed as dist

from .routing import RouterOutput


def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """Per-expert capacity ``max(min_capacity, ceil(cf * assignments / E))``.

    Uses the real number of assignments (T*k for Top-K, variable for Top-P), so
    a capacity factor of 1.0 means "room for a perfectly balanced load".
    """
    return max(min_capacity, math.ceil(capacity_factor * num_assignments / num_experts))


@dataclass(frozen=True)
class DispatchPlan:
    """Assignments kept for computation, grouped by expert slot.

    Attributes:
        token_idx_A: source token of each kept assignment.
        gate_A: its gate weight (fp32, differentiable w.r.t. the router).
        counts_S: kept assignments per slot (long tensor, slot order).
        counts: the same as a Python list (split sizes for the exchange).
        kept_per_expert_E: kept assignments per *logical* expert.
        num_dropped: assignments removed by the capacity limit (0-dim tensor).
    """

    token_idx_A: torch.Tensor
    gate_A: torch.Tensor
    counts_S: torch.Tensor
    counts: list[int]
    kept_per_expert_E: torch.Tensor
    num_dropped: torch.Tensor


def plan_dispatch(
    router: RouterOutput,
    *,
    capacity: int | None,
    slot_to_expert_S: torch.Tensor | None = None,
) -> DispatchPlan:
    """Group the router's selection by expert slot.

    Args:
        router: the routing decision.
        capacity: ``None`` for dropless; otherwise each expert keeps
            ``capacity`` assignments and drops the rest: the first in token
            order, or the highest ``router.drop_priority_TE``. With
            ``router.renormalize_after_drop`` each token's gates are then
            renormalised over the experts that kept it (DeepSpeed's top-2/top-k).
        slot_to_expert_S: logical expert of each slot (placement order); the
            identity when ``None``.
    """
    mask_TE = router.mask_TE
    num_experts = mask_TE.shape[1]
    if capacity is not None:
        if router.drop_priority_TE is None:
            # Position of each assignment within its expert's queue, in token order.
            position_TE = torch.cumsum(mask_TE.to(torch.int32), dim=0)
            kept_TE = mask_TE & (position_TE <= capacity)
        else:
            kept_TE = mask_TE & (_rank_by_priority(router.drop_priority_TE, mask_TE) < capacity)
        num_dropped = mask_TE.sum() - kept_TE.sum()
    else:
        kept_TE = mask_TE
        num_dropped = torch.zeros((), dtype=torch.long, device=mask_TE.device)
    weights_TE = router.weights_TE
    if router.renormalize_after_drop and capacity is not None:
        kept_probs_TE = router.probs_TE * kept_TE
        weights_TE = kept_probs_TE / kept_probs_TE.sum(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps)
    if slot_to_expert_S is None:
        slot_to_expert_S = torch.arange(num_experts, device=mask_TE.device)
    # Transposing to [S, T] before nonzero() yields assignments already sorted
    # by slot, then by token: grouping without an argsort.
    kept_ST = kept_TE.index_select(1, slot_to_expert_S).t()
    slot_A, token_idx_A = kept_ST.nonzero(as_tuple=True)
    expert_A = slot_to_expert_S[slot_A]
    counts_S = kept_ST.sum(dim=1)
    return DispatchPlan(
        token_idx_A=token_idx_A,
        gate_A=weights_TE[token_idx_A, expert_A],
        counts_S=counts_S,
        counts=counts_S.tolist(),
        kept_per_expert_E=kept_TE.sum(dim=0),
        num_dropped=num_dropped,
    )


def _rank_by_priority(priority_TE: torch.Tensor, mask_TE: torch.Tensor) -> torch.Tensor:
    """Each assignment's place in its expert's queue (0 = kept first), highest priority first, ties in token order."""
    score_TE = priority_TE.float().masked_fill(~mask_TE, float("-inf"))
    order_TE = torch.argsort(score_TE, dim=0, descending=True, stable=True)
    places_TE = torch.arange(mask_TE.shape[0], device=mask_TE.device)[:, None].expand_as(order_TE)
    return torch.empty_like(order_TE).scatter_(0, order_TE, places_TE)


#: Rows per chunk of :func:`combine`'s fp32 temporaries: bounds them to 16k x D whatever the batch.
COMBINE_CHUNK_ROWS = 16384


class _GatedScatterAdd(torch.autograd.Function):
    """``out_TD = sum_a onehot(token_a) * g_a * y_a`` in fp32, and its gradient, with one ``[A, D]`` buffer.

    Autograd through ``index_add_(y.float() * gate)`` keeps the product, then
    builds three ``[A, D]`` tensors in backward (the gathered gradient, its
    product with the gates, and the product with ``y`` for the gate gradient).
    Here the forward product lives one chunk at a time, and the backward
    gathers the output gradient once, takes the gate gradient ``<dout_t, y_a>``
    chunk by chunk, and scales the gathered gradient by the gates in place.
    """

    @staticmethod
    def forward(ctx, y_AD: torch.Tensor, gate_A: torch.Tensor, token_idx_A: torch.Tensor,  # type: ignore[override]
                num_tokens: int) -> torch.Tensor:
        out_TD = torch.zeros(num_tokens, y_AD.shape[1], dtype=torch.float32, device=y_AD.device)
        for start in range(0, y_AD.shape[0], COMBINE_CHUNK_ROWS):
            end = start + COMBINE_CHUNK_ROWS
            out_TD.index_add_(0, token_idx_A[start:end], y_AD[start:end].float() * gate_A[start:end, None])
        ctx.save_for_backward(y_AD, gate_A, token_idx_A)
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):  # type: ignore[override]
        y_AD, gate_A, token_idx_A = ctx.saved_tensors
        grad_AD = grad_TD.float().index_select(0, token_idx_A)
        grad_gate = None
        if ctx.needs_input_grad[1]:
            grad_gate = torch.empty_like(gate_A)
            for start in range(0, y_AD.shape[0], COMBINE_CHUNK_ROWS):
                end = start + COMBINE_CHUNK_ROWS
                grad_gate[start:end] = (grad_AD[start:end] * y_AD[start:end].float()).sum(dim=1)
        grad_y = grad_AD.mul_(gate_A[:, None]).to(y_AD.dtype) if ctx.needs_input_grad[0] else None
        return grad_y, grad_gate, None, None


def scatter_to_tokens(y_AD: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """``out_t = sum_{e in E^t} g_{t,e} * expert_e(x_t)``, accumulated in fp32, returned in ``y_AD``'s dtype.

    The gates stay fp32 (they come from the fp32 router softmax); in bf16 the
    expert outputs are upcast chunk by chunk, so the sum over a token's experts
    is not rounded to bf16 before the final cast.
    """
    return _GatedScatterAdd.apply(y_AD, plan.gate_A, plan.token_idx_A, num_tokens).to(y_AD.dtype)


def combine(y_AD: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """Deprecated name of :func:`scatter_to_tokens` (removed in the next release)."""
    warnings.warn("hmoe_ds.dispatch.combine is deprecated; use scatter_to_tokens", DeprecationWarning, stacklevel=2)
    return scatter_to_tokens(y_AD, plan, num_tokens)


class TokenExchange(Protocol):
    """Moves grouped rows to the ranks owning their experts, and back."""

    def to_experts(self, x_AD: torch.Tensor, counts: Sequence[int]) -> tuple[torch.Tensor, list[int], Any]:
        """Return (rows for this rank's experts grouped by local slot, rows per local slot, context)."""
        ...

    def from_experts(self, y_RD: torch.Tensor, context: Any) -> torch.Tensor:
        """Inverse of :meth:`to_experts`: expert outputs back in the caller's assignment order."""
        ...


class LocalExchange:
    """``ep_size == 1``: every expert is local; nothing moves."""

    def to_experts(self, x_AD: torch.Tensor, counts: Sequence[int]) -> tuple[torch.Tensor, list[int], Any]:
        return x_AD, list(counts), None

    def from_experts(self, y_RD: torch.Tensor, context: Any) -> torch.Tensor:
        return y_RD


class _AllToAllSingle(torch.autograd.Function):
    """Differentiable uneven all-to-all; the backward is the reverse exchange.

    torch has one (``torch.distributed.nn.functional.all_to_all_single``), but
    torch 2.13 deprecates it (FutureWarning) in favour
    of the private ``torch.distributed._functional_collectives``; a dozen
    lines of our own are the stabler dependency.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:  # type: ignore[override]
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all_uneven(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """``all_to_all_single`` with split sizes and autograd support."""
    return _AllToAllSingle.apply(x, out_splits, in_splits, group)


@dataclass(frozen=True)
class _AllToAllContext:
    send_splits: list[int]
    recv_splits: list[int]
    regroup_R: torch.Tensor


class AllToAllExchange:
    """Dropless expert-parallel exchange over an expert-parallel process group.

    Slots are ordered rank by rank (see :class:`~hmoe_ds.placement.ExpertPlacement`),
    so rank r's rows are one contiguous block of the grouped buffer. Each step
    first exchanges per-slot counts (E integers), then the rows with uneven
    split sizes; received rows arrive ordered by source rank, then local slot,
    and are regrouped by local slot with one stable sort.
    """

    def __init__(self, group, ep_size: int, num_local_experts: int) -> None:
        self.group = group
        self.ep_size = ep_size
        self.num_local_experts = num_local_experts

    def to_experts(self, x_AD: torch.Tensor, counts: Sequence[int]) -> tuple[torch.Tensor, list[int], Any]:
        local = self.num_local_experts
        counts_S = torch.tensor(list(counts), dtype=torch.long)
        recv_counts = torch.empty_like(counts_S)
        # gloo and NCCL both take CPU/device tensors matching the backend; counts
        # travel on the data's device.
        counts_dev = counts_S.to(x_AD.device)
        recv_dev = recv_counts.to(x_AD.device)
        dist.all_to_all_single(recv_dev, counts_dev, group=self.group)
        recv_counts_PL = recv_dev.cpu().view(self.ep_size, local)  # [source rank, local slot]
        send_splits = counts_S.view(self.ep_size, local).sum(dim=1).tolist()
        recv_splits = recv_counts_PL.sum(dim=1).tolist()
        x_RD = all_to_all_uneven(x_AD, recv_splits, send_splits, self.group)
        slot_of_row_R = torch.repeat_interleave(
            torch.arange(local).repeat(self.ep_size), recv_counts_PL.reshape(-1)
        ).to(x_AD.device)
        regroup_R = torch.argsort(slot_of_row_R, stable=True)
        local_counts = recv_counts_PL.sum(dim=0).tolist()
        return x_RD.index_select(0, regroup_R), local_counts, _AllToAllContext(send_splits, recv_splits, regroup_R)

    def from_experts(self, y_RD: torch.Tensor, context: Any) -> torch.Tensor:
        ctx: _AllToAllContext = context
        y_source_order = torch.empty_like(y_RD).index_copy(0, ctx.regroup_R, y_RD)
        return all_to_all_uneven(y_source_order, ctx.send_splits, ctx.recv_splits, self.group)
