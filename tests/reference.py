"""Slow, obviously-correct reference implementations the optimised paths are checked against.

Everything here loops over tokens (and experts) in plain Python.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch


def top_p_set(probs: Sequence[float], p: float) -> set[int]:
    """Sort descending, accumulate until the mass reaches p (the crossing expert included); p >= 1: all."""
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    if p >= 1.0:
        return set(order)
    chosen, mass = set(), 0.0
    for i in order:
        chosen.add(i)
        mass += probs[i]  # float64 running sum of the fp32 probabilities, as the router
        if mass >= p:
            break
    return chosen


def top_k_set(probs: Sequence[float], k: int) -> set[int]:
    return set(sorted(range(len(probs)), key=lambda i: (-probs[i], i))[:k])


def route_reference(logits: torch.Tensor, method: str, k: int, p: float, renormalize: bool):
    """Per token: (chosen set, {expert: gate weight})."""
    out = []
    for row in logits.float():
        probs = torch.softmax(row, dim=0)
        plist = probs.tolist()
        chosen = top_k_set(plist, k) if method == "top_k" else top_p_set(plist, p)
        total = sum(probs[i] for i in chosen)
        gates = {i: (probs[i] / total if renormalize else probs[i]) for i in chosen}
        out.append((chosen, gates))
    return out


def moe_reference(x_TD: torch.Tensor, logits_TE: torch.Tensor, experts, method: str, k: int, p: float,
                  renormalize: bool = True, capacity: int | None = None) -> torch.Tensor:
    """out_t = sum over chosen experts of gate * expert(x_t), one token at a time.

    With a capacity, expert e serves only the first ``capacity`` tokens (in token order) that chose it.
    """
    routes = route_reference(logits_TE, method, k, p, renormalize)
    served = [0] * logits_TE.shape[1]
    rows = []
    for t in range(x_TD.shape[0]):
        chosen, gates = routes[t]
        acc = torch.zeros_like(x_TD[t])
        for e in sorted(chosen):
            if capacity is not None:
                if served[e] >= capacity:
                    continue
                served[e] += 1
            acc = acc + gates[e] * experts[e](x_TD[t:t + 1])[0]
        rows.append(acc)
    return torch.stack(rows)


def load_balance_reference(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    T, E = probs.shape
    total = probs.new_zeros(())
    for i in range(E):
        share = sum(float(mask[t, i]) for t in range(T)) / T
        mean_p = sum(probs[t, i] for t in range(T)) / T
        total = total + share * mean_p
    return E * total


def p_penalty_reference(probs: torch.Tensor, mask: torch.Tensor, sizes: Sequence[float]) -> torch.Tensor:
    T, E = probs.shape
    mean_h = sum(sizes) / len(sizes)
    total = probs.new_zeros(())
    for i in range(E):
        m_i = sum(float(mask[t, i]) * sizes[i] / mean_h for t in range(T)) / T
        mean_p = sum(probs[t, i] for t in range(T)) / T
        total = total + m_i * mean_p
    return E * total


def entropy_reference(probs: torch.Tensor) -> torch.Tensor:
    T = probs.shape[0]
    total = probs.new_zeros(())
    for t in range(T):
        total = total - sum(pi * torch.log(pi) for pi in probs[t] if float(pi.detach()) > 0)
    return total / T


def z_loss_reference(logits: torch.Tensor) -> torch.Tensor:
    T = logits.shape[0]
    return sum(torch.log(sum(torch.exp(v) for v in logits[t])) ** 2 for t in range(T)) / T


def isclose(a: float, b: float, tol: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def experts_reference(x_RD: torch.Tensor, counts: Sequence[int], order: Sequence[int], weights, activation: str):
    """Expert ``order[j]`` applied to rows ``[sum(counts[:j]), sum(counts[:j+1]))``, one row at a time.

    ``weights[s]`` is ``(w1 [h, D], w2 [D, h], w3 [h, D] | None)`` of local slot s;
    the FFN is written out from its definition (gated: ``w2 (act(w1 x) * (w3 x))``).
    """
    act = {"swiglu": torch.nn.functional.silu, "geglu": torch.nn.functional.gelu,
           "gelu": torch.nn.functional.gelu, "relu": torch.relu}[str(activation)]
    rows, start = [], 0
    for slot, count in zip(order, counts):
        w1, w2, w3 = weights[slot]
        for r in range(start, start + int(count)):
            x = x_RD[r]
            hidden = act(w1 @ x)
            if w3 is not None:
                hidden = hidden * (w3 @ x)
            rows.append(w2 @ hidden)
        start += int(count)
    if not rows:
        return x_RD[:0] * 0
    return torch.stack(rows)


def train_data_parallel_in_one_process(model: torch.nn.Module, batch: Callable[[int, int], tuple],
                                       world_size: int, steps: int, lr: float) -> list[list[float]]:
    """What data-parallel training on ``world_size`` ranks computes, in one plain process.

    Each step every rank's loss on ``batch(rank, step)``; their mean is
    back-propagated once (the gradient all-reduce average), then one AdamW
    step (weight decay 0.01, as the tests' DeepSpeed configs). Returns every
    step's per-rank losses.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    history = []
    for step in range(steps):
        opt.zero_grad()
        losses = [model(*batch(rank, step)) for rank in range(world_size)]
        (sum(losses) / world_size).backward()
        opt.step()
        history.append([loss.item() for loss in losses])
    return history
