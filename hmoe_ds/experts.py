"""Expert FFNs of unequal width and their grouped computation.

Shape legend: R rows (tokens routed to this rank's experts, grouped by expert),
D model width, H an expert's hidden width.

An HMoE expert is a LLaMA-style FFN whose hidden width h_i differs per expert
(HMoE paper, Sec. 3.1). Experts are computed one after the other on
contiguous slices of the grouped token buffer ("option 1" of
``DEEPSPEED_NOTES.md``): exact FLOPs, no padding to the widest expert and no
capacity buffer. Every expert runs even on an empty slice so that each expert
parameter receives a (zero) gradient every step: ZeRO's gradient hooks then
fire on every rank and no reduction waits for an expert that got no tokens
(DeepSpeed issue 4808).
"""

from __future__ import annotations

import contextlib

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ExpertActivation

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


class HeteroExperts(nn.Module):
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
    """

    def __init__(
        self,
        hidden_size: int,
        expert_sizes: Sequence[int],
        activation: ExpertActivation | str,
        expert_group_name: str,
    ) -> None:
        super().__init__()
        with _rng_untouched():
            self.deepspeed_experts = nn.ModuleList(FFNExpert(hidden_size, h, activation) for h in expert_sizes)
        self.num_local_experts = len(self.deepspeed_experts)
        self.expert_group_name = expert_group_name
        self.tag_expert_parameters()

    def tag_expert_parameters(self) -> None:
        """Mark every expert parameter as DeepSpeed's ``Experts`` does.

        Call again after anything that replaces the parameter objects (e.g. HF
        ``from_pretrained``), since the tags are attributes of the objects.
        """
        for param in self.deepspeed_experts.parameters():
            param.allreduce = False
            param.group_name = self.expert_group_name

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

    def forward(self, x_RD: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Apply local expert j to rows ``[sum(counts[:j]), sum(counts[:j+1]))``."""
        if len(counts) != self.num_local_experts:
            raise ValueError(f"got {len(counts)} token counts for {self.num_local_experts} local experts")
        chunks = torch.split(x_RD, list(counts), dim=0)
        outputs = [expert(chunk) for expert, chunk in zip(self.deepspeed_experts, chunks)]
        return torch.cat(outputs, dim=0)


class PackedHeteroExperts(nn.Module):
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
    partition these parameters over the expert-data-parallel group (see
    ``DEEPSPEED_NOTES.md``); the leading 1 keeps DeepSpeed's per-expert
    checkpoint and universal-checkpoint code on its 3-D path.

    Each slice is initialised as the matching ``nn.Linear`` would be, so a
    packed layer and a :class:`HeteroExperts` layer are statistically alike.
    """

    def __init__(
        self,
        hidden_size: int,
        expert_sizes: Sequence[int],
        activation: ExpertActivation | str,
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
        self.w3 = nn.Parameter(torch.empty(1, width, hidden_size)) if self.activation.gated else None
        with _rng_untouched():
            self.reset_parameters()
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
        total = sum(self.expert_sizes)  # rows past it are padding
        w1s = self.w1[0, :total].split(self.expert_sizes, dim=0)
        w2s = self.w2[0, :, :total].split(self.expert_sizes, dim=1)
        w3s = self.w3[0, :total].split(self.expert_sizes, dim=0) if self.w3 is not None else [None] * len(w1s)
        return list(zip(w1s, w2s, w3s))

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
        if self.w3 is not None:
            out.append((self.w3, pack(2, 0)))
        return out

    def forward(self, x_RD: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        if len(counts) != len(self.expert_sizes):
            raise ValueError(f"got {len(counts)} token counts for {len(self.expert_sizes)} local experts")
        chunks = torch.split(x_RD, list(counts), dim=0)
        outputs = [
            ffn_forward(chunk, w1, w2, w3, self.activation)
            for chunk, (w1, w2, w3) in zip(chunks, self.per_expert_weights())
        ]
        return torch.cat(outputs, dim=0)

    def extra_repr(self) -> str:
        padding = f", padded to {self.packed_width}" if self.packed_width != sum(self.expert_sizes) else ""
        return f"experts={self.expert_sizes}{padding}, hidden={self.hidden_size}, {self.activation}"


def _checked(per_expert: Sequence[ExpertWeights], expected: int) -> Sequence[ExpertWeights]:
    if len(per_expert) != expected:
        raise ValueError(f"got weights for {len(per_expert)} experts, this rank holds {expected}")
    return per_expert
