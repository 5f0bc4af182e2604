"""Expert FFNs of unequal width and their grouped computation.

Shape legend: R rows (tokens routed to this rank's experts, grouped by expert),
D model width, H an expert's (or a width bucket's) hidden width, G experts in
a bucket.

An HMoE expert is a LLaMA-style FFN whose hidden width h_i differs per expert
(HMoE paper, Sec. 3.1). This module is the one place that computes experts.
Two paths give the same numbers (fp32 round-off; both are tested against a
per-row reference in ``tests/reference.py``):

``loop``: one GEMM chain per expert on contiguous slices of the grouped token
buffer, 3 matmuls forward and 6 backward *per expert*, all experts in one
autograd node (:class:`_ExpertLoopFFN`) that writes each expert's rows of the
output in place and keeps only a copy of its input rows and the two
pre-activations per expert, freed expert by expert in backward. Its
operator count grows with the number of experts; its GEMMs are exactly the
experts' own, with no padding and no weight copy. With a :class:`TokenRoute`
(``ep_size == 1``: nothing stands between the layer's row gather, the experts
and the gate-weighted scatter-add), :class:`_RoutedLoopFFN` does the gather
and the scatter-add per expert too, so no ``[assignments, D]`` tensor exists.

``grouped``: experts are put in *width buckets*;
each bucket is computed with one ``torch.nn.functional.grouped_mm`` per
projection, whose jagged dimension is the bucket's token rows (``offs``), by
one custom autograd function for all buckets (:class:`_GroupedFFN`).
``grouped_mm`` allows one jagged dimension, and HMoE experts differ in both
token count and hidden width, so widths within a bucket are padded to the
bucket's largest (rounded up to a multiple of 8). Padding is exact: a padded
hidden unit's ``w2`` column is zero, so it adds nothing to the output and gets
no gradient into the real weights (SwiGLU hidden units are independent). The
buckets come from :func:`plan_width_buckets`: equal widths share a bucket, and
when there are more distinct widths than ``max_buckets`` (8) adjacent widths
are merged by dynamic programming to minimise padded parameters. The operator
count per layer is then at most ``max_buckets`` x a constant, whatever the
number of experts; :attr:`WidthBucket.padding` reports the waste (none up to 8
distinct widths; for the arithmetic sizes of ``solve_expert_sizes`` at E=32/64,
0.8% of the expert FLOPs at d=256 (9 widths) and 3.5% at d=512 (17 widths)).

Which path runs (:func:`resolve_expert_compute`): ``auto`` builds the grouped
plan (its row order) wherever ``grouped_mm`` can run and uses it on
accelerators, where one grouped-GEMM kernel per bucket replaces E small ones,
but runs the loop on CPU, where ``grouped_mm`` is itself a loop of GEMMs and
padded buckets add weight copies (measured in the README, "Benchmarks").

Why buckets (README, "Expert computation"): the alternatives were (a)
splitting every expert into equal blocks of width g and repeating each token
once per block of its expert, exact but it multiplies the gathered input by
h/g (4-24x for arithmetic sizes at g=64: memory-bound and over the plain
loop's peak memory); (b) one bucket padded to the widest expert, ~44% wasted
FLOPs for arithmetic sizes {9..23}; (c) jagged weights (``offs`` over the
hidden dimension), which needs every expert to see the same tokens, i.e.
padding tokens to the busiest expert. Width buckets pad nothing for repeated
widths, keep each expert's GEMM its own size, and on CUDA (sm90+, bf16) each
bucket projection is one grouped-GEMM kernel. On CPU ``grouped_mm`` runs the
groups' GEMMs back to back in C++, so the gain there is the Python/autograd
overhead, the concatenation of expert outputs, and memory: the autograd
function saves only the input rows and the two pre-activations ``w1 x`` and
``w3 x`` per bucket, recomputes the activation in backward (the per-expert
loop keeps four ``[R, H]`` tensors), and releases each bucket's tensors as
soon as its backward is done. A bucket's weights are read as one strided view
when they already lie at a constant distance in memory (always for
:class:`HeteroExperts`, whose equal-width parameters share one block per
bucket; for the packed storage when the bucket's experts are neighbours);
otherwise (padded buckets, weights scattered by e.g. a dtype conversion) one
stacked copy is built transiently, one matrix at a time, in forward and again
in backward, never kept.

Token rows arrive grouped in :attr:`compute_order` (local slots sorted by
bucket), so every bucket's rows are one contiguous block: the layer passes
that order to the dispatch plan (see ``hmoe_ds.moe_core.MoECore``), which costs
nothing, instead of permuting rows here. Every expert runs (and gets a zero
gradient) even without tokens, so that ZeRO's gradient hooks fire on every
rank and no reduction waits for an idle expert (DeepSpeed issue 4808).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ExpertActivation, ExpertCompute

#: One expert's ``(w1 [h, D], w2 [D, h], w3 [h, D] | None)``, in ``nn.Linear`` layout.
ExpertWeights = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def ffn_forward(
    x_RD: torch.Tensor,
    w1_HD: torch.Tensor,
    w2_DH: torch.Tensor,
    w3_HD: torch.Tensor | None,
    activation: ExpertActivation | str,
) -> torch.Tensor:
    """One expert FFN on a slice of tokens.

    Gated (SwiGLU/GeGLU): ``w2(act(w1 x) * w3 x)``; plain (GELU/ReLU):
    ``w2(act(w1 x))``. Weights use ``nn.Linear``'s [out, in] layout so packed
    weights (a later ZeRO-3 layer) and module weights share this function.
    """
    activation = ExpertActivation(activation)
    h_RH = F.linear(x_RD, w1_HD)
    if activation is ExpertActivation.SWIGLU:
        h_RH = F.silu(h_RH) * F.linear(x_RD, w3_HD)
    elif activation is ExpertActivation.GEGLU:
        h_RH = F.gelu(h_RH) * F.linear(x_RD, w3_HD)
    elif activation is ExpertActivation.GELU:
        h_RH = F.gelu(h_RH)
    else:
        h_RH = F.relu(h_RH)
    return F.linear(h_RH, w2_DH)


def _rng_untouched() -> contextlib.AbstractContextManager[None]:
    """Run expert initialisation without advancing torch's global (CPU) RNG.

    How many experts a rank builds depends on the EP size and placement; if
    building them consumed global random numbers, every weight initialised
    afterwards (the rest of the model) would differ between runs that differ
    only in parallelism.
    """
    return torch.random.fork_rng(devices=[])


# --------------------------------------------------------------------------- grouped path

#: ``grouped_mm`` needs every stride to be a multiple of 16 bytes: 8 elements in bf16/fp16.
GROUPED_ALIGN = 8
#: Default bound on width buckets per rank (each bucket is one grouped GEMM per projection).
MAX_WIDTH_BUCKETS = 8


@dataclass(frozen=True)
class WidthBucket:
    """Local experts computed together by one grouped GEMM per projection.

    Attributes:
        slots: local slot indices of the experts, in compute order.
        sizes: their real hidden widths.
        width: the padded width H of the bucket (>= every size, multiple of 8).
    """

    slots: tuple[int, ...]
    sizes: tuple[int, ...]
    width: int

    @property
    def padding(self) -> float:
        """Padded hidden units / real hidden units of the bucket (FLOP waste at equal load)."""
        return self.width * len(self.sizes) / sum(self.sizes) - 1.0


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_width_buckets(sizes: Sequence[int], max_buckets: int = MAX_WIDTH_BUCKETS,
                       align: int = GROUPED_ALIGN) -> list[WidthBucket]:
    """Partition local experts into at most ``max_buckets`` buckets of adjacent (sorted) widths.

    Widths are first rounded up to ``align``; equal widths always share a
    bucket. With more distinct widths than ``max_buckets``, the sorted distinct
    widths are cut into ``max_buckets`` contiguous runs minimising the padded
    parameters ``sum_i (H_bucket(i) - h_i)`` (dynamic programming over cut
    points, O(W^2 B) for W distinct widths), i.e. the wasted FLOPs when experts
    are equally loaded. Buckets are ordered by width, slots within a bucket by
    slot index; the result depends only on ``sizes``, so every rank can compute
    every other rank's order.
    """
    if max_buckets < 1:
        raise ValueError(f"max_buckets={max_buckets}: must be >= 1")
    rounded = [_round_up(int(h), align) for h in sizes]
    widths = sorted(set(rounded))
    count = {w: rounded.count(w) for w in widths}
    real = {w: sum(h for h, r in zip(sizes, rounded) if r == w) for w in widths}
    n, b = len(widths), min(max_buckets, len(widths))

    def waste(i: int, j: int) -> int:  # widths[i..j] padded to widths[j]
        return sum(widths[j] * count[widths[k]] - real[widths[k]] for k in range(i, j + 1))

    inf = float("inf")
    # best[k][j]: least waste covering widths[0..j] with k buckets; cut[k][j]: start of the last bucket.
    best = [[inf] * n for _ in range(b + 1)]
    cut = [[0] * n for _ in range(b + 1)]
    for j in range(n):
        best[1][j] = waste(0, j)
    for k in range(2, b + 1):
        for j in range(k - 1, n):
            for i in range(k - 1, j + 1):
                cost = best[k - 1][i - 1] + waste(i, j)
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    runs, j, k = [], n - 1, b
    while k >= 1:
        i = cut[k][j] if k > 1 else 0
        runs.append((i, j))
        j, k = i - 1, k - 1
    buckets = []
    for i, j in reversed(runs):
        members = [s for s, r in enumerate(rounded) if widths[i] <= r <= widths[j]]
        buckets.append(WidthBucket(tuple(members), tuple(int(sizes[s]) for s in members), widths[j]))
    return buckets


def resolve_expert_compute(mode: ExpertCompute | str, hidden_size: int, sizes: Sequence[int]) -> ExpertCompute:
    """The expert path a layer is built for: ``grouped`` (its plan and row order) or ``loop``.

    ``auto`` resolves to ``grouped`` whenever the grouped path can run:
    ``hidden_size`` a multiple of 8 (``grouped_mm``'s 16-byte stride rule,
    bf16 included) and a ``grouped_mm`` in this torch. Which kernel a call
    then runs depends on the device (``runs_grouped`` of the experts module):
    with ``auto``, grouped GEMMs on accelerators and the per-expert loop on
    CPU. The CPU rule is measured (README, "Benchmarks": layer forward+backward
    on a quiet 2-core machine): ``grouped_mm``'s CPU kernel runs the groups'
    GEMMs one after another, so it saves nothing there, while padded buckets
    cost a weight copy per projection in forward and backward; the loop was
    faster in every row with padded buckets (E=32/64; for example 1.20x against
    1.51x the dense floor at E=32, d=512, 8,192 tokens) and equal within noise
    at E=8, where both run the same GEMMs. On a GPU the grouped path launches one
    kernel per bucket and projection instead of one per expert, which is where
    the per-expert loop loses at 32-64 experts. Forcing ``grouped`` runs
    ``grouped_mm`` on every device (for tests and measurements); forcing it
    where it cannot run is a ``ValueError`` naming the fix.
    """
    mode = ExpertCompute(mode)
    if mode is ExpertCompute.LOOP:
        return mode
    reason = None
    if not hasattr(F, "grouped_mm"):
        reason = f"torch {torch.__version__} has no torch.nn.functional.grouped_mm (needs torch >= 2.9)"
    elif hidden_size % GROUPED_ALIGN != 0:
        reason = (f"hidden_size={hidden_size} is not a multiple of {GROUPED_ALIGN} "
                  "(grouped_mm needs 16-byte strides)")
    if reason is None:
        return ExpertCompute.GROUPED
    if mode is ExpertCompute.GROUPED:
        raise ValueError(f"expert_compute='grouped' cannot run here: {reason}; use expert_compute='auto' or 'loop'")
    return ExpertCompute.LOOP


def expert_compute_order(mode: ExpertCompute | str, hidden_size: int, sizes: Sequence[int],
                         max_buckets: int = MAX_WIDTH_BUCKETS) -> list[int]:
    """Local slots in the order their token rows must arrive (identity for the loop path)."""
    if resolve_expert_compute(mode, hidden_size, sizes) is ExpertCompute.LOOP:
        return list(range(len(sizes)))
    return [s for bucket in plan_width_buckets(sizes, max_buckets) for s in bucket.slots]


Weights = Sequence[tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]]


def _strided_view(pieces: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``[G, r, c]`` *view* of equal-shape pieces that lie at a constant distance in one storage, else None.

    True for a one-expert bucket; for :class:`HeteroExperts`, whose parameters
    are allocated bucket by bucket (:meth:`HeteroExperts._share_bucket_storage`);
    for the packed (ZeRO-3) storage when a bucket's experts are neighbours in it;
    and for DeepSpeed's flat ZeRO-1/2 buffers when equal experts follow each
    other. Those buckets cost no weight copy. Only called inside the autograd
    function, where no graph is recorded.
    """
    first = pieces[0]
    size = first.element_size()
    storage = first.untyped_storage().data_ptr()
    step = (pieces[1].data_ptr() - first.data_ptr()) // size if len(pieces) > 1 else first.numel()
    if step <= 0:
        return None
    for i, piece in enumerate(pieces):
        if (piece.shape != first.shape or piece.stride() != first.stride()
                or piece.untyped_storage().data_ptr() != storage or piece.data_ptr() != first.data_ptr() + i * step * size):
            return None
    return first.as_strided((len(pieces), *first.shape), (step, *first.stride()))


def _stack_padded(pieces: Sequence[torch.Tensor], width: int, index: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Stack G expert matrices into ``[G, ...]``, padding their width dimension ``dim`` (0 or 1) to ``width``.

    Equal widths: a view when the pieces lie at a constant distance in memory
    (:func:`_strided_view`), else one ``torch.stack``. Otherwise one ``cat``
    of the pieces and a zero slice along ``dim``, then one ``index_select`` by
    ``index``, which maps each padded position to a real row (column) or to the
    zero slice. Either way the operator count does not depend on G, and the
    copy reads each weight in its storage order (no transposed, strided copy).
    """
    if index is None:  # every width == bucket width
        view = _strided_view(pieces)
        return view if view is not None else torch.stack(list(pieces))
    shape = list(pieces[0].shape)
    shape[dim] = 1
    rows = torch.cat([*pieces, pieces[0].new_zeros(shape)], dim=dim).index_select(dim, index)
    if dim == 0:
        return rows.view(len(pieces), width, -1)
    return rows.view(rows.shape[0], len(pieces), width).transpose(0, 1)


def _act_forward(h1: torch.Tensor, activation: ExpertActivation) -> torch.Tensor:
    if activation in (ExpertActivation.SWIGLU,):
        return F.silu(h1)
    if activation in (ExpertActivation.GEGLU, ExpertActivation.GELU):
        return F.gelu(h1)
    return F.relu(h1)


def _act_backward(grad: torch.Tensor, h1: torch.Tensor, activation: ExpertActivation,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``grad * act'(h1)`` with ATen's own derivative kernels (autograd uses the same); into ``out`` if given.

    ``out`` may be ``h1`` itself (elementwise, each element read before it is written).
    """
    if out is None:
        out = torch.empty_like(h1)
    if activation is ExpertActivation.SWIGLU:
        return torch.ops.aten.silu_backward.grad_input(grad, h1, grad_input=out)
    if activation in (ExpertActivation.GEGLU, ExpertActivation.GELU):
        return torch.ops.aten.gelu_backward.grad_input(grad, h1, grad_input=out)
    return torch.ops.aten.threshold_backward.grad_input(grad, h1, 0, grad_input=out)


@contextlib.contextmanager
def _pack_views_saved_by_position(packs: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside it, autograd saves a view of one of ``packs`` as its position in the pack, not as the view.

    Expert weights are views of larger parameters in the ZeRO-3 storages
    (:class:`PackedHeteroExperts`, :class:`PackedModuleExperts`), and the
    nodes that compute with them (this module's, or the user's modules'
    ``F.linear``) save them for backward. A saved view would keep the storage
    of the gathered parameter alive from forward to backward on every rank:
    ZeRO-3 releases a gathered parameter by swapping its ``.data`` for an
    empty tensor, which frees the gathered buffer only when nothing else
    refers to it, so every layer's experts would stay gathered (the whole
    model, whatever the rank count). So a view is saved as (pack, offset,
    shape, strides) and backward reads the same elements from the pack as
    ZeRO-3 has gathered it again (same shape, contiguous), as DeepSpeed's own
    ``LinearFunctionForZeroStage3`` reads its weight ``Parameter`` again.
    Several packs may be views of one gathered buffer (DeepSpeed's coalesced
    all-gather), so a view belongs to the pack whose elements contain its
    first one. Other saved tensors are kept as usual.
    """
    def pack_hook(tensor: torch.Tensor) -> object:
        storage, start = tensor.untyped_storage().data_ptr(), tensor.storage_offset()
        for index, pack in enumerate(packs):
            if (pack.numel() and storage == pack.untyped_storage().data_ptr()
                    and pack.storage_offset() <= start < pack.storage_offset() + pack.numel()):
                return (index, start - pack.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        return tensor

    def unpack_hook(saved: object) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        index, offset, shape, stride = saved  # type: ignore[misc]
        pack = packs[index].detach()
        return pack.as_strided(shape, stride, pack.storage_offset() + offset)

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, unpack_hook):
        yield


@dataclass(frozen=True)
class _BucketRuntime:
    """Per-call data of one bucket: its rows and the group offsets (``offs``) of ``grouped_mm``."""

    row_start: int
    row_end: int
    offs: torch.Tensor | None  # int32 [G] cumulative counts; None when the bucket has no rows


class _GroupedFFN(torch.autograd.Function):
    """Every bucket's FFN, forward and backward, with ``grouped_mm``; one autograd node per layer.

    Forward per bucket (rows X [n, D], stacked weights W1, W3 [G, H, D] and
    W2 [G, D, H], ``nn.Linear`` layout; for gated activations)::

        A1 = X W1^T,  A3 = X W3^T,  Y = (act(A1) * A3) W2^T        (grouped over G by offs)

    Backward, with ``Z = act(A1) * A3`` recomputed from the saved A1, A3::

        dW2  = dY^T Z          dZ  = dY W2
        dA3  = dZ * act(A1)    dA1 = act'(A1) * dZ * A3
        dW1  = dA1^T X         dW3 = dA3^T X         dX = dA1 W1 + dA3 W3

    (jagged-K ``grouped_mm`` for the weight gradients). Saved: X (a view of
    the input), A1 and A3, each bucket's pair released as soon as its backward
    is done. Stacked weights are rebuilt in backward from the saved per-expert
    views rather than kept.
    """

    @staticmethod
    def forward(ctx, x_RD: torch.Tensor, plan: "_GroupedPlan", runtime: list[_BucketRuntime],  # type: ignore[override]
                output_grad_is_scratch: bool, *flat_weights: torch.Tensor) -> torch.Tensor:
        weights = plan.unflatten(flat_weights)
        x_RD = x_RD.contiguous()
        y_RD = x_RD.new_empty(x_RD.shape)
        saved: list[torch.Tensor] = []
        for bucket, rt, index in zip(plan.buckets, runtime, plan.indices):
            if rt.offs is None:
                saved += [x_RD.new_empty(0), x_RD.new_empty(0)]
                continue
            x_nD = x_RD[rt.row_start:rt.row_end]
            # One stacked (padded) weight copy alive at a time: they are transient, never saved.
            a1 = F.grouped_mm(x_nD, plan.stack(weights, bucket, index, 0).transpose(1, 2), offs=rt.offs)
            z = _act_forward(a1, plan.activation)
            a3 = None
            if plan.gated:
                a3 = F.grouped_mm(x_nD, plan.stack(weights, bucket, index, 2).transpose(1, 2), offs=rt.offs)
                z = z.mul_(a3)
            y_RD[rt.row_start:rt.row_end] = F.grouped_mm(z, plan.stack(weights, bucket, index, 1).transpose(1, 2),
                                                         offs=rt.offs)
            del z
            saved += [a1, a3 if a3 is not None else x_RD.new_empty(0)]
        ctx.plan, ctx.runtime, ctx.output_grad_is_scratch = plan, runtime, output_grad_is_scratch
        ctx.input_meta = (x_RD.shape, x_RD.dtype, x_RD.device)
        ctx.save_for_backward(x_RD, *flat_weights)
        # Intermediates (not inputs or outputs) may live on ctx directly; unlike saved tensors,
        # backward can then drop each bucket's pair as soon as it is used, which keeps the peak of
        # backward (all weight gradients + remaining activations) at the per-expert loop's level.
        ctx.activations = saved
        return y_RD

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor):  # type: ignore[override]
        plan: _GroupedPlan = ctx.plan
        runtime: list[_BucketRuntime] = ctx.runtime
        x_RD, *flat_weights = ctx.saved_tensors
        saved: list[torch.Tensor | None] = ctx.activations
        ctx.activations = None
        weights = plan.unflatten(flat_weights)
        grad_RD = grad_RD.contiguous()
        grad_x = _input_grad_buffer(ctx, grad_RD)
        grads: list[list[torch.Tensor | None]] = [[None, None, None] for _ in weights]
        for b, (bucket, rt, index) in enumerate(zip(plan.buckets, runtime, plan.indices)):
            if rt.offs is None:  # no rows: zero gradients, so every expert's gradient hook still fires
                for slot in bucket.slots:
                    grads[slot] = [None if w is None else torch.zeros_like(w) for w in weights[slot]]
                continue
            a1, a3 = saved[2 * b], saved[2 * b + 1]
            saved[2 * b] = saved[2 * b + 1] = None
            x_nD, dy = x_RD[rt.row_start:rt.row_end], grad_RD[rt.row_start:rt.row_end]
            gated = plan.gated
            # Ordered so that at most ~5 [n, H] temporaries and one stacked weight copy are alive at once.
            act = _act_forward(a1, plan.activation)
            z = act * a3 if gated else act
            dw2 = F.grouped_mm(dy.t(), z, offs=rt.offs)  # [G, D, H]
            del z
            dz = F.grouped_mm(dy, plan.stack(weights, bucket, index, 1), offs=rt.offs)  # [n, H]
            dx = None
            dw3 = None
            if gated:
                da3 = dz * act
                dw3 = F.grouped_mm(da3.t(), x_nD, offs=rt.offs)
                if grad_x is not None:
                    dx = F.grouped_mm(da3, plan.stack(weights, bucket, index, 2), offs=rt.offs)
                del da3
                dz = dz.mul_(a3)
            del act
            da1 = _act_backward(dz, a1, plan.activation)
            del dz
            dw1 = F.grouped_mm(da1.t(), x_nD, offs=rt.offs)
            if grad_x is not None:
                dx1 = F.grouped_mm(da1, plan.stack(weights, bucket, index, 0), offs=rt.offs)
                grad_x[rt.row_start:rt.row_end] = dx1 if dx is None else dx.add_(dx1)
                del dx, dx1
            del da1, a1, a3
            for g, (slot, h) in enumerate(zip(bucket.slots, bucket.sizes)):
                grads[slot] = [dw1[g, :h], dw2[g, :, :h], dw3[g, :h] if gated else None]
        flat_grads = [g for slot_grads, w in zip(grads, weights) for g, wt in zip(slot_grads, w) if wt is not None]
        return (grad_x, None, None, None, *flat_grads)


def _input_grad_buffer(ctx: Any, grad_RD: torch.Tensor) -> torch.Tensor | None:
    """Where backward writes the input gradient: the output gradient's own rows, when the caller allows it.

    Each expert (bucket) reads its rows of ``grad_RD`` (dW2 and dZ) before it
    writes the same rows of dX, so dX can overwrite dY in place. That spares a
    second ``[rows, D]`` buffer at the end of backward, when every weight
    gradient is alive: the moment the layer's peak memory is set at small batches.
    """
    if not ctx.needs_input_grad[0]:
        return None
    shape, dtype, device = ctx.input_meta
    if ctx.output_grad_is_scratch and grad_RD.dtype == dtype and grad_RD.shape == shape:
        return grad_RD
    return torch.empty(shape, dtype=dtype, device=device)


class _GroupedPlan:
    """Static description of a rank's grouped computation: buckets, padding indices, activation."""

    def __init__(self, sizes: Sequence[int], activation: ExpertActivation, max_buckets: int) -> None:
        self.sizes = [int(h) for h in sizes]
        self.activation = ExpertActivation(activation)
        self.gated = self.activation.gated
        self.buckets = plan_width_buckets(self.sizes, max_buckets)
        self.num_flat = len(self.sizes) * (3 if self.gated else 2)
        self.compute_order = [s for bucket in self.buckets for s in bucket.slots]
        # Row gather index of each padded bucket (None when its widths are all equal).
        self._indices_cpu: list[torch.Tensor | None] = []
        for bucket in self.buckets:
            if all(h == bucket.width for h in bucket.sizes):
                self._indices_cpu.append(None)
                continue
            zero_row, index, start = sum(bucket.sizes), [], 0
            for h in bucket.sizes:
                index += list(range(start, start + h)) + [zero_row] * (bucket.width - h)
                start += h
            self._indices_cpu.append(torch.tensor(index, dtype=torch.long))
        self._device_indices: dict[torch.device, list[torch.Tensor | None]] = {}
        self.indices: list[torch.Tensor | None] = self._indices_cpu

    def on(self, device: torch.device) -> "_GroupedPlan":
        """Move the padding indices to ``device`` once (cached)."""
        if device not in self._device_indices:
            self._device_indices[device] = [None if i is None else i.to(device) for i in self._indices_cpu]
        self.indices = self._device_indices[device]
        return self

    def flatten(self, weights: Weights) -> list[torch.Tensor]:
        return [w for triple in weights for w in triple if w is not None]

    def unflatten(self, flat: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        return _unflatten(flat, self.gated)

    def stack(self, weights, bucket: WidthBucket, index: torch.Tensor | None, which: int) -> torch.Tensor:
        """Padded copy of one bucket's ``w1`` (``which=0``, ``[G, H, D]``), ``w2`` (1, ``[G, D, H]``) or ``w3`` (2)."""
        return _stack_padded([weights[s][which] for s in bucket.slots], bucket.width, index, 1 if which == 1 else 0)

    def runtime(self, counts: Sequence[int], device: torch.device) -> list[_BucketRuntime]:
        """Row ranges and ``offs`` of every bucket for this call's token counts (in compute order)."""
        counts_by_slot = dict(zip(self.compute_order, counts))
        out, row, offsets, spans = [], 0, [], []
        for bucket in self.buckets:
            n_bucket, cum = 0, []
            for slot in bucket.slots:
                n_bucket += int(counts_by_slot[slot])
                cum.append(n_bucket)
            spans.append((row, row + n_bucket))
            offsets.append(cum)
            row += n_bucket
        # One host-to-device copy for every bucket's offsets.
        flat = torch.tensor([c for cum in offsets for c in cum], dtype=torch.int32).to(device)
        pos = 0
        for (start, end), cum in zip(spans, offsets):
            offs = flat[pos:pos + len(cum)] if end > start else None
            out.append(_BucketRuntime(start, end, offs))
            pos += len(cum)
        return out


def grouped_ffn_forward(x_RD: torch.Tensor, counts: Sequence[int], weights: Weights, plan: _GroupedPlan,
                        output_grad_is_scratch: bool = False) -> torch.Tensor:
    """Apply every local expert to its rows (grouped in ``plan.compute_order``) with grouped GEMMs.

    ``output_grad_is_scratch``: see :meth:`HeteroExperts.forward`.
    """
    plan = plan.on(x_RD.device)
    return _GroupedFFN.apply(x_RD, plan, plan.runtime(counts, x_RD.device), output_grad_is_scratch,
                             *plan.flatten(weights))


class _ExpertLoopFFN(torch.autograd.Function):
    """Every local expert's FFN, one GEMM chain per expert, as one autograd node (the ``loop`` path).

    Expert j reads rows ``spans[j]`` of the grouped input and writes the same
    rows of a preallocated output, so no per-expert output is concatenated.
    The math per expert is :class:`_GroupedFFN`'s with G = 1; the activation
    is recomputed in backward. An expert without rows still returns a zero
    gradient (an ``[h, 0] x [0, D]`` product), so ZeRO's hooks fire.

    Memory, measured against per-expert autograd (the plain loop): forward
    keeps, per expert, a copy of its input rows and the pre-activations
    ``w1 x`` and ``w3 x`` (autograd keeps four ``[n, h]`` tensors); backward
    releases each expert's three as soon as it is done, from the expert with
    the most ``rows x width`` down, so that when every weight gradient is alive
    (the end of backward, where the peak is at small batches) only the smallest
    expert's temporaries are. The row copies cost one ``[rows, D]`` copy in
    forward; holding the whole input instead would keep it alive to the end.
    """

    @staticmethod
    def forward(ctx, x_RD: torch.Tensor, spans: list[tuple[int, int]], activation: ExpertActivation,  # type: ignore[override]
                output_grad_is_scratch: bool, *flat_weights: torch.Tensor) -> torch.Tensor:
        weights = _unflatten(flat_weights, activation.gated)
        y_RD = x_RD.new_empty(x_RD.shape)
        saved: list[list[torch.Tensor | None] | None] = []
        for (start, end), (w1, w2, w3) in zip(spans, weights):
            x_nD = x_RD[start:end].clone(memory_format=torch.contiguous_format)
            a1, a3, z = _expert_hidden(x_nD, w1, w3, activation)
            torch.mm(z, w2.t(), out=y_RD[start:end])
            saved.append([x_nD, a1, a3])
        ctx.spans, ctx.activation, ctx.output_grad_is_scratch = spans, activation, output_grad_is_scratch
        ctx.input_meta = (x_RD.shape, x_RD.dtype, x_RD.device)
        ctx.save_for_backward(*flat_weights)
        ctx.activations = saved  # intermediates on ctx, so backward can drop each expert's three early
        return y_RD

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor):  # type: ignore[override]
        activation: ExpertActivation = ctx.activation
        weights = _unflatten(ctx.saved_tensors, activation.gated)
        saved = ctx.activations
        ctx.activations = None
        grad_RD = grad_RD.contiguous()
        grad_x = _input_grad_buffer(ctx, grad_RD)
        grads: list[list[torch.Tensor]] = [[] for _ in weights]
        for j in _heaviest_first(ctx.spans, weights):
            start, end = ctx.spans[j]
            state, saved[j] = saved[j], None
            grads[j], _ = _expert_backward([grad_RD[start:end], *state], weights[j], activation, grad_x is not None,
                                           out=None if grad_x is None else grad_x[start:end])
        return (grad_x, None, None, None, *[g for expert in grads for g in expert])


def _unflatten(flat: Sequence[torch.Tensor], gated: bool) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    step = 3 if gated else 2
    return [(flat[i], flat[i + 1], flat[i + 2] if gated else None) for i in range(0, len(flat), step)]


def _spans(counts: Sequence[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of each expert's rows when expert j has ``counts[j]`` of them, in order."""
    spans, row = [], 0
    for count in counts:
        spans.append((row, row + int(count)))
        row += int(count)
    return spans


def _heaviest_first(spans: Sequence[tuple[int, int]], weights: Weights) -> list[int]:
    """Experts by ``rows x width``, largest first: the order backward frees their saved tensors in, so that when
    every weight gradient is alive (the end of backward) only the smallest expert's temporaries are."""
    return sorted(range(len(weights)), key=lambda j: -(spans[j][1] - spans[j][0]) * weights[j][0].shape[0])


def _expert_hidden(x_nD: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor | None, activation: ExpertActivation
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One expert's pre-activations ``a1 = x w1^T``, ``a3 = x w3^T`` (gated only) and ``z = act(a1) * a3``."""
    a1 = torch.mm(x_nD, w1.t())
    z = _act_forward(a1, activation)
    a3 = None
    if activation.gated:
        a3 = torch.mm(x_nD, w3.t())
        z = z.mul_(a3)
    return a1, a3, z


def _expert_backward(state: list[torch.Tensor | None], weights: ExpertWeights, activation: ExpertActivation,
                     input_grad: bool, out: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """One expert's weight gradients ``[dw1, dw2(, dw3)]`` and input gradient (into ``out`` when given).

    ``state`` is ``[dy, x_nD, a1, a3]``: the output gradient, the input rows and
    the pre-activations of :func:`_expert_hidden`. It is emptied here, so that
    each tensor is freed at its last use (the activation is recomputed from
    ``a1``, and ``a1``'s storage takes its own gradient).
    """
    w1, w2, w3 = weights
    gated = activation.gated
    dy, x_nD, a1, a3 = state
    state.clear()
    act = _act_forward(a1, activation)
    dw2 = torch.mm(dy.t(), act * a3 if gated else act)  # [D, h]
    dz = torch.mm(dy, w2)  # [n, h]
    del dy
    da3 = dw3 = None
    if gated:
        da3 = act.mul_(dz)  # act is not needed again
        dw3 = torch.mm(da3.t(), x_nD)
        dz = dz.mul_(a3)
    del act, a3
    da1 = _act_backward(dz, a1, activation, out=a1)  # a1 is not needed again
    del dz
    dw1 = torch.mm(da1.t(), x_nD)
    del x_nD
    dx = None
    if input_grad:
        dx = torch.mm(da1, w1) if out is None else torch.mm(da1, w1, out=out)
        if gated:
            dx.addmm_(da3, w3)
    return [dw1, dw2] + ([dw3] if gated else []), dx


def loop_ffn_forward(x_RD: torch.Tensor, counts: Sequence[int], weights: Weights,
                     activation: ExpertActivation | str, output_grad_is_scratch: bool = False) -> torch.Tensor:
    """Apply expert j to rows ``[sum(counts[:j]), sum(counts[:j+1]))``, one GEMM chain per expert.

    One autograd node for all experts (:class:`_ExpertLoopFFN`); the operator
    count grows with the number of experts, the bytes moved do not exceed the
    GEMMs' own. ``output_grad_is_scratch``: see :meth:`HeteroExperts.forward`.
    """
    activation = ExpertActivation(activation)
    flat = [w for triple in weights for w in triple if w is not None]
    return _ExpertLoopFFN.apply(x_RD, _spans(counts), activation, output_grad_is_scratch, *flat)


@dataclass(frozen=True)
class TokenRoute:
    """Where each row of the experts' input comes from and how much of it goes back (``ep_size == 1``).

    Given to the built-in experts' ``forward`` (``route=``), it lets them
    gather their rows from the tokens ``[T, D]`` and add their gate-weighted
    outputs back into ``[T, D]`` themselves (:func:`routed_loop_ffn_forward`),
    instead of the layer gathering an ``[assignments, D]`` buffer before and
    scattering one after.

    Attributes:
        token_idx_A: the source token of each assignment, grouped by expert in compute order.
        gate_A: each assignment's gate weight (fp32, differentiable w.r.t. the router).
    """

    token_idx_A: torch.Tensor
    gate_A: torch.Tensor


class _RoutedLoopFFN(torch.autograd.Function):
    """``out_TD = sum_a onehot(token_a) g_a FFN_e(a)(x_token_a)`` for every local expert as one autograd node.

    The ``loop`` path of :class:`_ExpertLoopFFN` with the row gather before it
    and the gate-weighted scatter-add after it
    (:func:`hmoe_ds.dispatch.scatter_to_tokens`) folded in, for ``ep_size ==
    1``, where no exchange separates them. Per expert: gather its tokens'
    rows, the SwiGLU chain, ``out.index_add_(rows, g * y)`` (fp32). Backward
    per expert, heaviest first: gather its rows of the output gradient, the
    gate gradient ``<dout_t, y_a>``, then :class:`_ExpertLoopFFN`'s backward on
    ``g * dout``, and ``dx.index_add_`` into the input gradient.

    Memory: no ``[assignments, D]`` tensor exists at any time. Saved per
    expert: the pre-activations ``w1 x``, ``w3 x`` and the output ``y`` (the
    gate gradient needs it), released expert by expert in backward; the input
    rows are gathered again from ``x_TD`` (alive anyway: it is the layer's
    input) instead of kept. The summation order into each token is the
    unfused path's (assignments in expert order), so both give the same
    numbers up to fp32 round-off.
    """

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, gate_A: torch.Tensor, token_idx_A: torch.Tensor,  # type: ignore[override]
                spans: list[tuple[int, int]], activation: ExpertActivation, *flat_weights: torch.Tensor) -> torch.Tensor:
        weights = _unflatten(flat_weights, activation.gated)
        out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        saved: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None] = []
        for (start, end), (w1, w2, w3) in zip(spans, weights):
            rows = token_idx_A[start:end]
            a1, a3, z = _expert_hidden(x_TD.index_select(0, rows), w1, w3, activation)
            y = torch.mm(z, w2.t())
            del z
            out_TD.index_add_(0, rows, y.float() * gate_A[start:end, None])
            saved.append((a1, a3, y))
        ctx.spans, ctx.activation = spans, activation
        ctx.save_for_backward(x_TD, gate_A, token_idx_A, *flat_weights)
        ctx.activations = saved  # intermediates on ctx, so backward can drop each expert's three early
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):  # type: ignore[override]
        activation: ExpertActivation = ctx.activation
        x_TD, gate_A, token_idx_A, *flat_weights = ctx.saved_tensors
        weights = _unflatten(flat_weights, activation.gated)
        saved = ctx.activations
        ctx.activations = None
        grad_TD = grad_TD.float()
        grad_x = torch.zeros_like(x_TD) if ctx.needs_input_grad[0] else None
        grad_gate = torch.empty_like(gate_A) if ctx.needs_input_grad[1] else None
        grads: list[list[torch.Tensor]] = [[] for _ in weights]
        for j in _heaviest_first(ctx.spans, weights):
            start, end = ctx.spans[j]
            a1, a3, y = saved[j]
            saved[j] = None
            rows = token_idx_A[start:end]
            dout = grad_TD.index_select(0, rows)  # fp32 [n, D]
            if grad_gate is not None:
                grad_gate[start:end] = (dout * y.float()).sum(dim=1)
            del y
            state = [dout.mul_(gate_A[start:end, None]).to(x_TD.dtype), x_TD.index_select(0, rows), a1, a3]
            del dout, a1, a3
            grads[j], dx = _expert_backward(state, weights[j], activation, grad_x is not None)
            if dx is not None:
                grad_x.index_add_(0, rows, dx)
            del dx
        return (grad_x, grad_gate, None, None, None, *[g for expert in grads for g in expert])


def routed_loop_ffn_forward(x_TD: torch.Tensor, counts: Sequence[int], route: TokenRoute, weights: Weights,
                            activation: ExpertActivation | str) -> torch.Tensor:
    """The fp32 ``[T, D]`` sum over each token's experts of ``gate * FFN(x)``; expert j takes assignments
    ``[sum(counts[:j]), sum(counts[:j+1]))`` of ``route`` (see :class:`_RoutedLoopFFN`)."""
    activation = ExpertActivation(activation)
    spans = _spans(counts)
    row = spans[-1][1] if spans else 0
    if row != route.token_idx_A.shape[0]:
        raise ValueError(f"token counts {list(counts)} do not add up to the {route.token_idx_A.shape[0]} assignments "
                         "routed")
    flat = [w for triple in weights for w in triple if w is not None]
    return _RoutedLoopFFN.apply(x_TD, route.gate_A, route.token_idx_A, spans, activation, *flat)


class _ExpertComputeMixin:
    """What both storages share: the path choice, the bucket plan, and ``forward``."""

    #: ``forward`` takes ``output_grad_is_scratch`` (the MoE layer passes it; user expert modules do not).
    supports_scratch_output_grad = True
    #: ``forward`` takes ``route`` (a :class:`TokenRoute`) on the per-expert loop.
    supports_token_route = True
    activation: ExpertActivation
    expert_compute: ExpertCompute
    _requested_compute: ExpertCompute
    _plan: _GroupedPlan | None

    def _init_compute(self, hidden_size: int, sizes: Sequence[int], mode: ExpertCompute | str,
                      max_buckets: int) -> None:
        self._requested_compute = ExpertCompute(mode)
        self.expert_compute = resolve_expert_compute(mode, hidden_size, sizes)
        self._plan = (_GroupedPlan(sizes, self.activation, max_buckets)
                      if self.expert_compute is ExpertCompute.GROUPED else None)

    @property
    def compute_order(self) -> list[int]:
        """Local slots in the order their token rows must arrive (see the module docstring)."""
        if self._plan is None:
            return list(range(len(self.per_expert_weights())))
        return list(self._plan.compute_order)

    @property
    def width_buckets(self) -> list[WidthBucket]:
        """The grouped path's buckets (empty for the loop path)."""
        return [] if self._plan is None else list(self._plan.buckets)

    def runs_grouped(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> bool:
        """Whether a call on ``device``/``dtype`` runs the grouped GEMMs (else the per-expert loop).

        ``grouped`` forced: wherever ``grouped_mm`` has a kernel for the dtype.
        ``auto``: the same, except on CPU, where the loop runs (in the grouped
        row order): :func:`resolve_expert_compute` explains the measurement.
        """
        if self._plan is None or dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        return self._requested_compute is ExpertCompute.GROUPED or torch.device(device).type != "cpu"

    def compute_path(self) -> str:
        """How these experts are computed, for reprs and logs: ``grouped (n width buckets)`` or ``loop``."""
        if self._plan is None:
            return "loop"
        grouped = f"grouped ({len(self._plan.buckets)} width buckets)"
        if self._requested_compute is ExpertCompute.GROUPED:
            return grouped
        return f"{grouped} on accelerators, loop on CPU"

    def per_expert_weights(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        raise NotImplementedError

    def _compute_routed(self, x_TD: torch.Tensor, counts: Sequence[int], route: TokenRoute) -> torch.Tensor:
        weights = self.per_expert_weights()
        if len(counts) != len(weights):
            raise ValueError(f"got {len(counts)} token counts for {len(weights)} local experts")
        if self.runs_grouped(x_TD.device, x_TD.dtype):
            raise ValueError("route= is for the per-expert loop; the grouped path takes grouped rows")
        return routed_loop_ffn_forward(x_TD, counts, route, self._in_compute_order(weights), self.activation)

    def _in_compute_order(self, weights: Weights) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Per-expert weights in the order rows arrive (slot order for the loop path, bucket order when a grouped
        plan fixed the dispatch order)."""
        return list(weights) if self._plan is None else [weights[j] for j in self._plan.compute_order]

    def _compute(self, x_RD: torch.Tensor, counts: Sequence[int], output_grad_is_scratch: bool) -> torch.Tensor:
        weights = self.per_expert_weights()
        if len(counts) != len(weights):
            raise ValueError(f"got {len(counts)} token counts for {len(weights)} local experts")
        if sum(int(c) for c in counts) != x_RD.shape[0]:
            raise ValueError(f"token counts {list(counts)} do not add up to the {x_RD.shape[0]} rows received")
        if self._plan is None or not self.runs_grouped(x_RD.device, x_RD.dtype):
            # With a grouped plan the rows still come in its compute order (fixed at construction for dispatch).
            return loop_ffn_forward(x_RD, counts, self._in_compute_order(weights), self.activation,
                                    output_grad_is_scratch)
        return grouped_ffn_forward(x_RD, counts, weights, self._plan, output_grad_is_scratch)


class FFNExpert(nn.Module):
    """A single expert: ``hidden_size -> ffn_size -> hidden_size``, no biases.

    Attribute names follow LLaMA/Mixtral (w1 gate, w3 up, w2 down), so weights
    load into HF Mixtral-style layouts and into DeepSpeed's ``MoE`` unchanged.
    """

    def __init__(self, hidden_size: int, ffn_size: int, activation: ExpertActivation | str = "swiglu") -> None:
        super().__init__()
        self.activation = ExpertActivation(activation)
        self.hidden_size = hidden_size
        self.ffn_size = ffn_size
        self.w1 = nn.Linear(hidden_size, ffn_size, bias=False)
        self.w2 = nn.Linear(ffn_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, ffn_size, bias=False) if self.activation.gated else None

    def forward(self, x_RD: torch.Tensor) -> torch.Tensor:
        w3 = self.w3.weight if self.w3 is not None else None
        return ffn_forward(x_RD, self.w1.weight, self.w2.weight, w3, self.activation)

    def extra_repr(self) -> str:
        return f"{self.hidden_size} -> {self.ffn_size} -> {self.hidden_size}, {self.activation}"


class _DeepSpeedExpertList:
    """What both module-list storages share: experts in ``deepspeed_experts``, tagged as DeepSpeed tags them."""

    deepspeed_experts: nn.ModuleList
    expert_group_name: str

    def tag_expert_parameters(self) -> None:
        """Mark every expert parameter as DeepSpeed's ``Experts`` does.

        Call again after anything that replaces the parameter objects (e.g. HF
        ``from_pretrained``), since the tags are attributes of the objects.
        """
        for param in self.deepspeed_experts.parameters():
            param.allreduce = False
            param.group_name = self.expert_group_name


class HeteroExperts(_DeepSpeedExpertList, _ExpertComputeMixin, nn.Module):
    """This rank's experts, each of its own width, held as a ``ModuleList``.

    The attribute is called ``deepspeed_experts`` on purpose: DeepSpeed's
    engine finds expert parameters for its per-expert checkpoint files by the
    name ``.deepspeed_moe.experts.deepspeed_experts.<local id>.``.

    Args:
        hidden_size: model width D.
        expert_sizes: hidden widths of the experts held on this rank, in local
            slot order.
        activation: expert FFN type.
        expert_group_name: DeepSpeed expert-parallel group name; tagged on each
            parameter (with ``allreduce=False``) exactly as DeepSpeed's
            ``Experts`` does, so the engine reduces these gradients over the
            expert-data-parallel group and puts them in MoE optimizer groups.
        expert_compute: ``auto``, ``grouped`` or ``loop`` (:func:`resolve_expert_compute`).
        max_buckets: bound on the grouped path's width buckets (:func:`plan_width_buckets`).
    """

    def __init__(
        self,
        hidden_size: int,
        expert_sizes: Sequence[int],
        activation: ExpertActivation | str,
        expert_group_name: str,
        expert_compute: ExpertCompute | str = ExpertCompute.AUTO,
        max_buckets: int = MAX_WIDTH_BUCKETS,
    ) -> None:
        super().__init__()
        self.activation = ExpertActivation(activation)
        with _rng_untouched():
            self.deepspeed_experts = nn.ModuleList(FFNExpert(hidden_size, h, activation) for h in expert_sizes)
        self.num_local_experts = len(self.deepspeed_experts)
        self.expert_group_name = expert_group_name
        self._init_compute(hidden_size, expert_sizes, expert_compute, max_buckets)
        if self._plan is not None:
            self._share_bucket_storage()
        self.tag_expert_parameters()

    def extra_repr(self) -> str:
        return f"{self.num_local_experts} local experts, {self.compute_path()} path"

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """After ``.to(dtype/device)`` (new tensors per parameter), share the bucket blocks again."""
        out = super()._apply(fn, recurse)
        if self._plan is not None:
            self._share_bucket_storage()
        return out

    @torch.no_grad()
    def _share_bucket_storage(self) -> None:
        """Re-home each equal-width bucket's weights in one ``[G, h, D]`` (``[G, D, h]`` for w2) block.

        The parameters stay the same ``nn.Parameter`` objects, one per expert
        matrix (names, checkpoints, optimizer groups and DeepSpeed's per-expert
        files are unchanged); their ``.data`` become views of a shared block, so the grouped path reads a bucket's weights as
        one strided view instead of stacking a copy every forward and backward.
        Values are copied over, so initialisation is unchanged. Anything that
        later replaces the parameter tensors (``.to(dtype)``, DeepSpeed's flat
        buffers) only loses the zero-copy property, never correctness.
        """
        if self._plan is None or not all(isinstance(e, FFNExpert) for e in self.deepspeed_experts):
            return  # experts swapped for something else (e.g. identity stand-ins in a benchmark)
        for bucket, index in zip(self._plan.buckets, self._plan.indices):
            if index is not None or len(bucket.slots) < 2:
                continue
            experts = [self.deepspeed_experts[s] for s in bucket.slots]
            for name in ("w1", "w2", "w3"):
                linears = [getattr(e, name) for e in experts]
                if linears[0] is None:
                    continue
                if _strided_view([lin.weight for lin in linears]) is not None:
                    continue  # already one block
                block = torch.stack([lin.weight.detach() for lin in linears])
                for g, lin in enumerate(linears):
                    # Same Parameter object (optimizer groups and DeepSpeed's tags refer to it), new storage.
                    lin.weight.data = block[g]

    def per_expert_weights(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """``(w1 [h, D], w2 [D, h], w3 [h, D] | None)`` of each local expert, as views."""
        return [
            (e.w1.weight, e.w2.weight, e.w3.weight if e.w3 is not None else None) for e in self.deepspeed_experts
        ]

    def full_values(self, per_expert: Sequence[ExpertWeights]) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``(parameter, its full value)`` for storing ``per_expert`` (one tuple per local expert, slot order)."""
        out = []
        for expert, weights in zip(self.deepspeed_experts, _checked(per_expert, self.num_local_experts)):
            for linear, value in zip((expert.w1, expert.w2, expert.w3), weights):
                if linear is not None:
                    out.append((linear.weight, value))
        return out

    def forward(self, x_RD: torch.Tensor, counts: Sequence[int], *,
                output_grad_is_scratch: bool = False, route: TokenRoute | None = None) -> torch.Tensor:
        """Apply local expert ``compute_order[j]`` to rows ``[sum(counts[:j]), sum(counts[:j+1]))``.

        ``output_grad_is_scratch``: the caller promises that the gradient
        arriving for the output is a buffer nothing else reads, so backward may
        overwrite it with the input gradient instead of allocating another
        ``[rows, D]`` buffer. True inside the MoE layer, where that gradient
        comes fresh from the gate-weighted combine or the all-to-all; leave it
        False when the output has other users.

        ``route`` (per-expert loop only, see :meth:`runs_grouped`): the input is
        the tokens ``[T, D]`` instead of grouped rows, ``counts`` count the
        assignments of ``route`` per expert, and the result is the fp32 ``[T, D]``
        gate-weighted sum of each token's expert outputs (:class:`TokenRoute`).
        """
        if route is not None:
            return self._compute_routed(x_RD, counts, route)
        return self._compute(x_RD, counts, output_grad_is_scratch)


class _UserModulesOneByOne:
    """What both storages of the user's own expert modules share: slot order, no buckets, the loop."""

    expert_compute = ExpertCompute.LOOP
    num_local_experts: int

    @property
    def compute_order(self) -> list[int]:
        return list(range(self.num_local_experts))

    @property
    def width_buckets(self) -> list[WidthBucket]:
        return []

    def _one_by_one(self, x_RD: torch.Tensor, counts: Sequence[int],
                    run: Callable[[int, torch.Tensor], Any]) -> torch.Tensor:
        """``run(j, rows)`` for local expert j on rows ``[sum(counts[:j]), sum(counts[:j+1]))``, concatenated.

        Every expert runs, also on 0 rows, so its parameters always receive a
        gradient (ZeRO's hooks fire). A tuple output's first item is used, as
        DeepSpeed does for Megatron-style ``(output, bias)``.
        """
        if len(counts) != self.num_local_experts:
            raise ValueError(f"got {len(counts)} token counts for {self.num_local_experts} local experts")
        outputs = []
        for j, chunk in enumerate(torch.split(x_RD, list(counts), dim=0)):
            out = run(j, chunk)
            outputs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outputs, dim=0)


class ModuleExperts(_DeepSpeedExpertList, _UserModulesOneByOne, nn.Module):
    """This rank's experts as the user's own modules, run one by one (DeepSpeed's ``Experts``).

    Each module maps ``[rows, D] -> [rows, D]`` (a tuple output's first item
    is used, as DeepSpeed does for Megatron-style ``(output, bias)``). They
    live in ``deepspeed_experts.<local id>`` under the user's own parameter
    names, tagged ``allreduce=False`` with the expert group name, so a
    DeepSpeed model that swaps its ``MoE`` for ``HMoE`` keeps its parameter
    names, optimizer groups and checkpoints. Nothing can group arbitrary
    modules into one GEMM: this is the ``loop`` path by construction.

    Args:
        experts: the local experts, in local slot order.
        expert_group_name: DeepSpeed expert-parallel group name.
    """

    def __init__(self, experts: Sequence[nn.Module], expert_group_name: str) -> None:
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(experts)
        self.num_local_experts = len(self.deepspeed_experts)
        self.expert_group_name = expert_group_name
        self.tag_expert_parameters()

    def forward(self, x_RD: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Apply local expert j to rows ``[sum(counts[:j]), sum(counts[:j+1]))``."""
        return self._one_by_one(x_RD, counts, lambda j, rows: self.deepspeed_experts[j](rows))

    def extra_repr(self) -> str:
        return f"user expert modules, {self.num_local_experts} local, computed one by one (loop path)"


#: The names of the packed parameters of the ZeRO-3 front-end: DeepSpeed 0.19.8's engine reads exactly
#: these three attributes of an AutoEP layer's ``experts`` when it saves a checkpoint.
PACK_NAMES = ("w1", "w2", "w3")


@dataclass(frozen=True)
class PackedMember:
    """Where one parameter of one user expert lies in the packs of :class:`PackedModuleExperts`.

    Attributes:
        slot: the local expert (slot order of the rank's experts).
        name: the parameter's name in the user's module (``0.weight``, ``fc1.bias``, ...).
        pack: which pack holds it: an index into :data:`PACK_NAMES`.
        offset: its first element in the flattened pack.
        shape: its shape.
    """

    slot: int
    name: str
    pack: int
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


ExpertShapes = Sequence[Sequence[tuple[str, tuple[int, ...]]]]


def plan_user_expert_packs(expert_shapes: ExpertShapes, num_packs: int = len(PACK_NAMES)
                           ) -> tuple[list[PackedMember], list[int]]:
    """Lay out the parameters of a rank's user experts over ``num_packs`` flat packs.

    ``expert_shapes[j]`` lists local expert j's ``(name, shape)`` pairs, in
    ``named_parameters`` order. Each parameter goes whole into one pack
    (largest first, into the pack with the fewest elements so far; ties to
    the lower pack, then in slot and name order), so the packs hold about a
    third each. Returns ``(members, elements per pack)``; depends only on the
    shapes, so every rank can lay out every other rank's packs.
    """
    items = [(slot, name, tuple(int(n) for n in shape)) for slot, shapes in enumerate(expert_shapes)
             for name, shape in shapes]
    order = sorted(range(len(items)), key=lambda i: (-math.prod(items[i][2]), i))
    fill = [0] * num_packs
    placed: dict[int, PackedMember] = {}
    for i in order:
        slot, name, shape = items[i]
        pack = min(range(num_packs), key=lambda k: (fill[k], k))
        placed[i] = PackedMember(slot, name, pack, fill[pack], shape)
        fill[pack] += math.prod(shape)
    return [placed[i] for i in range(len(items))], fill  # slot order, each expert's in named_parameters order


def packed_rows(per_rank_expert_shapes: Sequence[ExpertShapes], hidden_size: int) -> int:
    """Rows of every pack (``[1, rows, hidden_size]``), the same on every EP rank: the fullest pack of any rank."""
    most = max((max(plan_user_expert_packs(shapes)[1]) for shapes in per_rank_expert_shapes), default=0)
    return max(1, -(-most // hidden_size))


def _skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are all ``None`` (their values come from the packs at call time)."""
    return copy.deepcopy(module, memo={id(p): None for p in module.parameters()})


class PackedModuleExperts(_UserModulesOneByOne, nn.Module):
    """This rank's user expert modules with their parameters packed, for ZeRO-3 (the AutoEP front-end).

    ZeRO-3 (DeepSpeed 0.19.8) partitions expert parameters over the
    expert-data-parallel group only when they are an AutoEP layer's
    ``experts.w1/w2/w3`` carrying its placement metadata, and it decides
    prefetch and persistence from parameter sizes, so every EP rank must hold
    parameters of the same shapes or the ranks' all-gathers stop matching (a
    gloo "collective mismatch"). Arbitrary user modules satisfy neither: their
    parameter names are the user's, and unequal experts (a factory) differ in
    shape from rank to rank. So, as :class:`PackedHeteroExperts` does for the
    built-in FFN, the parameters of all local experts live in three flat
    packs ``w1``, ``w2``, ``w3`` of shape ``[1, rows, D]``, the same on every
    EP rank (``rows`` from the fullest pack of any rank, :func:`packed_rows`;
    the leading 1 keeps DeepSpeed's per-expert checkpoint code on its 3-D
    path). Each user parameter lies whole in one pack
    (:func:`plan_user_expert_packs`, about a third of the elements each),
    as a view; elements past the last parameter are padding: never read,
    hence a zero gradient, and they stay zero (the AdamW step of a zero value
    with a zero gradient is zero). Equal-size template copies on equal
    ranks need no padding beyond rounding up to whole rows.

    The modules themselves are kept as parameter-less skeletons (copies whose
    parameters are ``None``), outside the module tree so that neither ZeRO-3's
    hooks nor ``named_parameters`` see them, and each is run with
    :func:`torch.func.functional_call` on views of the packs: the user's own
    ``forward``, one expert after another (the ``loop`` path; nothing can
    group arbitrary modules). Modules with buffers are refused (a buffer would
    be invisible to ``state_dict`` and to ZeRO). :meth:`train`/``eval``
    reach the skeletons, so dropout behaves as in the user's module.

    Args:
        hidden_size: model width D (the packs' row length).
        experts: the local experts, in slot order, with ordinary (not
            ZeRO-partitioned) parameters: their values initialise the packs.
        rows: rows of each pack (:func:`packed_rows` over every EP rank).
        tag_parameter: called on each pack before the constructor returns
            (under ``deepspeed.zero.Init`` that is when it is partitioned).
    """

    def __init__(self, hidden_size: int, experts: Sequence[nn.Module], rows: int,
                 tag_parameter: Callable[[nn.Parameter], None] | None = None) -> None:
        super().__init__()
        for j, module in enumerate(experts):
            buffers = [name for name, _ in module.named_buffers()]
            if buffers:
                raise ValueError(f"user expert {j} ({type(module).__name__}) has buffers {buffers[:3]}: the ZeRO-3 "
                                 "front-end packs expert parameters only, so buffers would be neither saved nor "
                                 "partitioned; make them parameters (requires_grad=False is not supported either) "
                                 "or train with ZeRO 1/2")
            frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
            if frozen:
                raise ValueError(f"user expert {j} has frozen parameters {frozen[:3]}: DeepSpeed 0.19.8 cannot "
                                 "checkpoint frozen AutoEP expert parameters under ZeRO-3")
        self.hidden_size = hidden_size
        self.num_local_experts = len(experts)
        shapes = [[(name, tuple(p.shape)) for name, p in module.named_parameters()] for module in experts]
        self.members, fill = plan_user_expert_packs(shapes)
        if max(fill, default=0) > rows * hidden_size:
            raise ValueError(f"rows={rows} x {hidden_size} cannot hold a pack of {max(fill)} elements")
        self.rows = int(rows)
        self.used = tuple(fill)  # elements of each pack holding parameters; the rest is padding
        self._skeletons = [_skeleton(module) for module in experts]  # a plain list: not submodules
        dtype = next((p.dtype for module in experts for p in module.parameters()), torch.get_default_dtype())
        self.w1 = nn.Parameter(torch.zeros(1, self.rows, hidden_size, dtype=dtype))
        self.w2 = nn.Parameter(torch.zeros(1, self.rows, hidden_size, dtype=dtype))
        self.w3 = nn.Parameter(torch.zeros(1, self.rows, hidden_size, dtype=dtype))
        with torch.no_grad():
            values = [dict(module.named_parameters()) for module in experts]
            for member, view in zip(self.members, self._views()):
                view.copy_(values[member.slot][member.name])
        if tag_parameter is not None:
            for param in self.parameters():
                tag_parameter(param)

    @property
    def skeletons(self) -> list[nn.Module]:
        """The user's modules without parameters, in slot order (read-only use: their structure and repr)."""
        return list(self._skeletons)

    def packs(self) -> list[nn.Parameter]:
        return [self.w1, self.w2, self.w3]

    def _views(self, packs: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Each member's view into ``packs`` (default: the parameters), in :attr:`members` order."""
        flats = [p.reshape(-1) for p in (packs if packs is not None else self.packs())]
        return [flats[m.pack].narrow(0, m.offset, m.numel).view(m.shape) for m in self.members]

    def expert_parameters(self, packs: Sequence[torch.Tensor] | None = None) -> list[dict[str, torch.Tensor]]:
        """``{user name: view}`` of each local expert into ``packs`` (default: the packs, gathered under ZeRO-3)."""
        out: list[dict[str, torch.Tensor]] = [{} for _ in range(self.num_local_experts)]
        for member, view in zip(self.members, self._views(packs)):
            out[member.slot][member.name] = view
        return out

    def full_values(self, per_expert: Sequence[dict[str, torch.Tensor]]) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``(pack, its full value)`` for storing ``per_expert`` (``{user name: tensor}`` per local expert).

        Shapes are checked, so weights of another expert structure fail loudly;
        the packs are assembled here so that they can be written into ZeRO-3
        partitions without gathering (:func:`hmoe_ds.partitioned.write_full`).
        """
        if len(per_expert) != self.num_local_experts:
            raise ValueError(f"got weights for {len(per_expert)} experts, this rank holds {self.num_local_experts}")
        packs = [torch.zeros(1, self.rows, self.hidden_size) for _ in PACK_NAMES]
        for member, view in zip(self.members, self._views(packs)):
            expected = {m.name for m in self.members if m.slot == member.slot}
            got = set(per_expert[member.slot])
            if got != expected:
                raise ValueError(f"local expert {member.slot}: got parameters {sorted(got)}, the module has "
                                 f"{sorted(expected)}")
            value = per_expert[member.slot][member.name]
            if tuple(value.shape) != member.shape:
                raise ValueError(f"local expert {member.slot} {member.name}: shape {tuple(value.shape)}, the module's "
                                 f"is {member.shape}")
            view.copy_(value)
        return list(zip(self.packs(), packs))

    def forward(self, x_RD: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Apply local expert j (the user's module) to rows ``[sum(counts[:j]), sum(counts[:j+1]))``."""
        params = self.expert_parameters()
        with _pack_views_saved_by_position(self.packs()):
            return self._one_by_one(
                x_RD, counts, lambda j, rows: torch.func.functional_call(self._skeletons[j], params[j], (rows,)))

    def train(self, mode: bool = True) -> "PackedModuleExperts":
        super().train(mode)
        for skeleton in self._skeletons:
            skeleton.train(mode)
        return self

    def extra_repr(self) -> str:
        used = sum(self.used)
        return (f"user expert modules ({', '.join(type(s).__name__ for s in self._skeletons)}), "
                f"{self.num_local_experts} local, packed {used} of 3 x {self.rows} x {self.hidden_size} elements, "
                "computed one by one (loop path)")


class PackedHeteroExperts(_ExpertComputeMixin, nn.Module):
    """This rank's unequal experts packed into three 3-D parameters.

    ``w1``/``w3``: ``[1, H_pack, D]``, ``w2``: ``[1, D, H_pack]``; expert j owns
    rows (columns for ``w2``) ``[sum(h[:j]), sum(h[:j+1]))``. ``H_pack`` is
    ``padded_width`` when given, else the sum of the local widths: the layer
    pads every EP rank's pack to the same width, because ZeRO-3 decides
    prefetching and persistence from parameter sizes, and packs of different
    sizes on different ranks make those decisions, hence the collectives,
    differ between ranks (a gloo "collective mismatch" with contiguous
    placement at realistic sizes). Padding rows are zero, never computed, and
    so receive zero gradients and stay zero. This is the layout DeepSpeed's
    AutoEP layer uses for one expert per rank, which is what lets ZeRO-3
    partition these parameters over the expert-data-parallel group
    (``hmoe_ds.layer_autoep``); the leading 1 keeps DeepSpeed's per-expert
    checkpoint and universal-checkpoint code on its 3-D path.

    Each slice is initialised as the matching ``nn.Linear`` would be, so a
    packed layer and a :class:`HeteroExperts` layer are statistically alike.
    The computation reads the weights only through :meth:`per_expert_weights`.

    Non-gated activations (``gelu``, ``relu``) have no up projection, but
    DeepSpeed 0.19.8's engine reads an AutoEP layer's ``experts.w3`` like
    ``w1``/``w2`` when it saves a checkpoint (its placement metadata, its
    ZeRO-3 optimizer shapes, one slice per expert file), and fails on
    ``None``. So ``w3`` is then a placeholder: a ``[1, 1, D]`` zero parameter
    (:attr:`w3_is_placeholder`), never read by the computation, tied to the
    output with a zero gradient (so ZeRO's gradient hooks fire for it as for
    any trained parameter) and therefore zero forever (AdamW moves a zero
    value with a zero gradient nowhere). :meth:`per_expert_weights` and
    :meth:`full_values` leave it out; hmoe-ds's shards store it as a pack
    holding no expert.
    """

    def __init__(
        self,
        hidden_size: int,
        expert_sizes: Sequence[int],
        activation: ExpertActivation | str,
        expert_compute: ExpertCompute | str = ExpertCompute.AUTO,
        max_buckets: int = MAX_WIDTH_BUCKETS,
        padded_width: int | None = None,
        tag_parameter: Callable[[nn.Parameter], None] | None = None,
    ) -> None:
        super().__init__()
        self.activation = ExpertActivation(activation)
        self.hidden_size = hidden_size
        self.expert_sizes = [int(h) for h in expert_sizes]
        total = sum(self.expert_sizes)
        width = total if padded_width is None else int(padded_width)
        if width < total:
            raise ValueError(f"padded_width={width} is smaller than the local experts' total width {total}")
        self.packed_width = width
        self.w1 = nn.Parameter(torch.empty(1, width, hidden_size))
        self.w2 = nn.Parameter(torch.empty(1, hidden_size, width))
        #: Non-gated: ``w3`` is a zero placeholder for DeepSpeed's AutoEP checkpoint code (see the class docstring).
        self.w3_is_placeholder = not self.activation.gated
        self.w3 = nn.Parameter(torch.empty(1, width if self.activation.gated else 1, hidden_size))
        with _rng_untouched():
            self.reset_parameters()
        self._init_compute(hidden_size, self.expert_sizes, expert_compute, max_buckets)
        # Tags must be on the parameters before this constructor returns: under ``deepspeed.zero.Init``
        # that is when they are partitioned, over the group the tags name.
        if tag_parameter is not None:
            for param in self.parameters():
                tag_parameter(param)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for param in self.parameters():
            param.zero_()  # the padding stays exactly zero
        for w1, w2, w3 in self.per_expert_weights():
            for weight in (w1, w2, w3):
                if weight is not None:  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                    bound = 1.0 / math.sqrt(weight.shape[1])
                    weight.uniform_(-bound, bound)

    def per_expert_weights(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Views ``(w1 [h, D], w2 [D, h], w3 [h, D] | None)`` of each local expert."""
        return _pack_views(self.expert_sizes, self.w1, self.w2, self._w3())

    def packs(self) -> list[nn.Parameter]:
        """The parameters :meth:`per_expert_weights` are views of (``w3`` only when gated)."""
        return [self.w1, self.w2] + ([] if self.w3_is_placeholder else [self.w3])

    def _w3(self) -> torch.Tensor | None:
        """The up-projection pack, or None for a non-gated activation (``w3`` is then a placeholder)."""
        return None if self.w3_is_placeholder else self.w3

    def full_values(self, per_expert: Sequence[ExpertWeights]) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``(parameter, its full packed value)`` for storing ``per_expert`` (one tuple per local expert).

        The packs are assembled here (one layer's local experts at a time), so
        they can be written into ZeRO-3 partitions without gathering.
        """
        per_expert = _checked(per_expert, len(self.expert_sizes))
        pad = self.packed_width - sum(self.expert_sizes)
        d = self.hidden_size

        def pack(index: int, dim: int) -> torch.Tensor:
            parts = [weights[index].float() for weights in per_expert]
            parts.append(torch.zeros((pad, d) if dim == 0 else (d, pad)))
            return torch.cat(parts, dim=dim).unsqueeze(0)

        out = [(self.w1, pack(0, 0)), (self.w2, pack(1, 1))]
        if not self.w3_is_placeholder:
            out.append((self.w3, pack(2, 0)))
        return out

    def forward(self, x_RD: torch.Tensor, counts: Sequence[int], *,
                output_grad_is_scratch: bool = False, route: TokenRoute | None = None) -> torch.Tensor:
        """Apply local expert ``compute_order[j]`` to rows ``[sum(counts[:j]), sum(counts[:j+1]))``.

        ``output_grad_is_scratch`` and ``route``: as for :meth:`HeteroExperts.forward`.
        """
        with _pack_views_saved_by_position(self.packs()):
            if route is not None:
                out = self._compute_routed(x_RD, counts, route)
            else:
                out = self._compute(x_RD, counts, output_grad_is_scratch)
        if self.w3_is_placeholder:
            out = _ZeroGradientTie.apply(out, self.w3)
        return out

    def extra_repr(self) -> str:
        padding = f", padded to {self.packed_width}" if self.packed_width != sum(self.expert_sizes) else ""
        return (f"experts={self.expert_sizes}{padding}, hidden={self.hidden_size}, {self.activation}, "
                f"{self.compute_path()} path")


class _ZeroGradientTie(torch.autograd.Function):
    """``out`` unchanged; in backward ``param`` receives a zero gradient (its ZeRO hooks fire, its value stays)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, param: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Its shape, not the tensor: ZeRO-3 may free the data (ds_shape: the full shape of a partitioned one).
        ctx.param_meta = (tuple(getattr(param, "ds_shape", param.shape)), param.dtype, param.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        shape, dtype, device = ctx.param_meta
        return grad_out, torch.zeros(shape, dtype=dtype, device=device)


def _pack_views(sizes: Sequence[int], w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None
                ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Each expert's ``(w1 [h, D], w2 [D, h], w3 [h, D] | None)`` as views of packs ``[1, H_pack, D]``
    (``w2``: ``[1, D, H_pack]``) whose first ``sum(sizes)`` hidden units are the experts' (the rest padding)."""
    total = sum(sizes)
    w1s = w1[0, :total].split(list(sizes), dim=0)
    w2s = w2[0, :, :total].split(list(sizes), dim=1)
    w3s = w3[0, :total].split(list(sizes), dim=0) if w3 is not None else [None] * len(w1s)
    return list(zip(w1s, w2s, w3s))


def _checked(per_expert: Sequence[ExpertWeights], expected: int) -> Sequence[ExpertWeights]:
    if len(per_expert) != expected:
        raise ValueError(f"got weights for {len(per_expert)} experts, this rank holds {expected}")
    return per_expert
