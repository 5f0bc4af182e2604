"""Cluster cost of HMoE expert parallelism, by simulation from measured routing (a model, not a benchmark).

For a cluster shape (nodes x GPUs per node), an EP size and a placement of the
experts over the EP ranks, this computes what one training step costs per
rank, from the routing statistics of a real run (per MoE layer, each expert's
share of the (token, expert) assignments and the mean experts per token, read
from the run's ``metrics.jsonl``) or from sizes and shares given on the
command line::

    python -m benchmarks.simulate_cluster --run outputs/quickstart --cluster 64x8 --ep 2 4 8
    python -m benchmarks.simulate_cluster --model paper-3b --shares-from outputs/quickstart --cluster 64x4

Inputs and assumptions (every figure below follows from them):

* Tokens: every rank holds ``--tokens-per-rank`` tokens per step (the same on
  every rank) and routes them as the measured shares say, independently of
  which rank holds them. The assignments of a source rank to expert i are
  ``T * k * s_i`` (T tokens, k experts per token, s_i the share).
* Groups: DeepSpeed's expert-parallel groups are consecutive ranks
  (``[g*EP, (g+1)*EP)``), ranks are numbered node by node, so an EP group
  spans ``EP / GPUs-per-node`` nodes when EP exceeds a node, and stays inside
  one node otherwise; every group has the same placement, so one is simulated.
* Compute: the forward FLOPs of expert i are ``2 * P_i * n_i``, P_i = 3 d h_i
  weights (gated FFN), n_i the assignments it receives from its group (the
  backward is twice that on the same rank, so the ratios hold for the step).
  A step waits for the slowest rank at every MoE layer, so the reported
  imbalance is ``sum_l max_r F_lr / sum_l mean_r F_lr``.
* Communication: each assignment is one row of d elements (``--bytes``, 2 for
  bf16). Per MoE layer the forward dispatch sends a rank's rows to the ranks
  holding their experts and the combine sends them back; the backward repeats
  both in reverse. A rank's traffic per step is therefore
  ``2 * (rows sent + rows received)`` rows per layer, counted as leaving the
  rank (rows for its own experts stay local) and split by whether the peer
  is on the same node. Counts and metadata (E integers) are ignored.
* Redundant experts (DeepSeek-V3's load balancer, EPLB): extra copies of the
  hottest experts (largest work per copy) on other ranks, each copy taking an
  equal part of its expert's tokens; memory per rank is counted at 16 bytes per
  expert weight (bf16 weight and gradient, fp32 master and two Adam moments),
  with no ZeRO partitioning of the copies. Keeping copies in sync costs an
  extra gradient all-reduce per replicated expert, not simulated here.

The per-rank send counts the model predicts are checked against the ones the
real dispatch computes (:class:`hmoe_ds.dispatch.AllToAllExchange`) on 2 and 4
CPU ranks in ``tests/test_simulate_cluster.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from hmoe_ds.placement import balanced_placement, contiguous_placement, measured_placement, work_imbalance

#: Expert weights per rank are charged this many bytes each in training (bf16 w + g, fp32 master, Adam m and v).
TRAIN_BYTES_PER_PARAM = 16
#: The paper's 3B HMoE: 8 experts 256 x {9, 11, ..., 23} (``solve_expert_sizes(num_experts=8,
#: homogeneous_hidden=4096)``). The paper's d and depth are not in this repository: d = 2048 (the homogeneous
#: expert 4096 = 2 d, as run/experiments' arms) and 24 MoE layers are assumptions; ratios do not depend on them.
PAPER_3B = {"expert_sizes": [2304, 2816, 3328, 3840, 4352, 4864, 5376, 5888], "hidden_size": 2048, "moe_layers": 24}

Layout = tuple[tuple[int, ...], ...]  # experts held by each EP rank (a replicated expert on several ranks)


@dataclass(frozen=True)
class LayerRouting:
    """One MoE layer's measured routing: share of assignments per expert, mean experts per token."""

    shares: tuple[float, ...]
    experts_per_token: float


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def check(self, ep_size: int) -> None:
        if self.world % ep_size:
            raise ValueError(f"EP size {ep_size} does not divide the world size {self.world}")
        if ep_size > self.gpus_per_node and ep_size % self.gpus_per_node:
            raise ValueError(f"EP size {ep_size} spans nodes of {self.gpus_per_node} GPUs unevenly")


# --------------------------------------------------------------------------- the model


def send_rows(counts_by_source: Sequence[Sequence[float]], layout: Layout) -> list[list[float]]:
    """``rows[src][dst]``: assignments EP rank src sends to EP rank dst (dst == src stays local).

    ``counts_by_source[src][i]`` are rank src's assignments to expert i; an
    expert held by several ranks (redundant copies) splits them evenly. With one
    copy per expert this is exactly the per-destination split of the real
    dispatch (``AllToAllExchange``'s ``send_splits``).
    """
    holders: dict[int, list[int]] = {}
    for rank, experts in enumerate(layout):
        for e in experts:
            holders.setdefault(e, []).append(rank)
    rows = []
    for counts in counts_by_source:
        out = [0.0] * len(layout)
        for e, count in enumerate(counts):
            for rank in holders[e]:
                out[rank] += float(count) / len(holders[e])
        rows.append(out)
    return rows


@dataclass(frozen=True)
class LayerCost:
    """One MoE layer's forward cost on each rank of one EP group (rows are assignments, not bytes)."""

    flops: tuple[float, ...]
    params: tuple[float, ...]
    sent_intra: tuple[float, ...]
    sent_inter: tuple[float, ...]
    recv_intra: tuple[float, ...]
    recv_inter: tuple[float, ...]
    leave_node: float  # share of all assignments whose expert is on another node


def layer_cost(counts_by_source: Sequence[Sequence[float]], layout: Layout, expert_sizes: Sequence[int],
               hidden_size: int, gpus_per_node: int, gated: bool = True) -> LayerCost:
    """Cost of one layer for one EP group whose rank p is on node ``p // gpus_per_node``."""
    rows = send_rows(counts_by_source, layout)
    ep = len(layout)
    node = [p // gpus_per_node for p in range(ep)]
    weights = [(3 if gated else 2) * hidden_size * h for h in expert_sizes]
    holders = [sum(e in experts for experts in layout) for e in range(len(expert_sizes))]
    flops, params = [], []
    for rank, experts in enumerate(layout):
        received = [sum(counts[e] for counts in counts_by_source) / holders[e] for e in experts]
        flops.append(sum(2.0 * weights[e] * n for e, n in zip(experts, received)))
        params.append(float(sum(weights[e] for e in experts)))

    def off(src: int, dst: int, same_node: bool) -> float:
        return rows[src][dst] if src != dst and (node[src] == node[dst]) == same_node else 0.0

    total = sum(map(sum, rows))
    inter = sum(off(s, d, False) for s in range(ep) for d in range(ep))
    return LayerCost(
        flops=tuple(flops), params=tuple(params),
        sent_intra=tuple(sum(off(s, d, True) for d in range(ep)) for s in range(ep)),
        sent_inter=tuple(sum(off(s, d, False) for d in range(ep)) for s in range(ep)),
        recv_intra=tuple(sum(off(s, d, True) for s in range(ep)) for d in range(ep)),
        recv_inter=tuple(sum(off(s, d, False) for s in range(ep)) for d in range(ep)),
        leave_node=inter / total if total else 0.0,
    )


@dataclass(frozen=True)
class StepCost:
    """One training step, per rank, over every MoE layer."""

    flops_imbalance: float  # sum_l max_r F / sum_l mean_r F
    intra_bytes_max: float  # bytes a rank sends to peers on its node, per step (max over ranks)
    inter_bytes_max: float  # bytes a rank sends to other nodes, per step (max over ranks)
    inter_bytes_mean: float
    leave_node: float  # mean over layers of the share of a token's assignments leaving its node
    params_max: float  # expert weights on the fullest rank, summed over layers
    params_mean: float


def step_cost(layers: Sequence[LayerRouting], layouts: Sequence[Layout], expert_sizes: Sequence[int],
              hidden_size: int, cluster: Cluster, tokens_per_rank: float, bytes_per_element: float = 2.0,
              moe_layers: int | None = None) -> StepCost:
    """Per-step cost over ``moe_layers`` layers (default: one per routing entry, cycling through them)."""
    ep = len(layouts[0])
    cluster.check(ep)
    count = moe_layers or len(layers)
    costs = []
    for i in range(count):
        routing, layout = layers[i % len(layers)], layouts[i % len(layers)]
        per_source = [tokens_per_rank * routing.experts_per_token * s for s in routing.shares]
        costs.append(layer_cost([per_source] * ep, layout, expert_sizes, hidden_size, cluster.gpus_per_node))
    row_bytes = hidden_size * bytes_per_element

    def per_rank(pick: Callable[[LayerCost], Sequence[float]], other: Callable[[LayerCost], Sequence[float]]) -> list:
        # Out of a rank per step: forward dispatch (sent) + combine (received rows go back), twice with backward.
        return [2 * row_bytes * sum(pick(c)[r] + other(c)[r] for c in costs) for r in range(ep)]

    intra = per_rank(lambda c: c.sent_intra, lambda c: c.recv_intra)
    inter = per_rank(lambda c: c.sent_inter, lambda c: c.recv_inter)
    params = [sum(c.params[r] for c in costs) for r in range(ep)]
    return StepCost(
        flops_imbalance=sum(max(c.flops) for c in costs) / sum(sum(c.flops) / ep for c in costs),
        intra_bytes_max=max(intra), inter_bytes_max=max(inter), inter_bytes_mean=sum(inter) / ep,
        leave_node=sum(c.leave_node for c in costs) / len(costs),
        params_max=max(params), params_mean=sum(params) / ep,
    )


# --------------------------------------------------------------------------- placements


def node_aware_layout(expert_sizes: Sequence[int], ep_size: int, gpus_per_node: int,
                      shares: Sequence[float]) -> Layout:
    """Two levels: the nodes of an EP group get equal token shares, then each node's ranks equal work.

    Inter-node traffic into a node is proportional to the token share its
    experts hold, so balancing shares over nodes evens the cross-node bytes
    each node receives; hot experts are the small ones, so a node ends up with
    a complementary mix of sizes. Inside a node, experts are balanced on
    work ``h * s`` as :func:`hmoe_ds.placement.measured_placement` does.
    Within one node (EP <= GPUs per node) this is the measured placement.
    """
    if ep_size <= gpus_per_node:
        return measured_placement(expert_sizes, ep_size, shares).rank_experts
    nodes = ep_size // gpus_per_node
    by_node = balanced_placement([1] * len(expert_sizes), nodes, shares).rank_experts  # work = share per node
    layout: list[tuple[int, ...]] = []
    for experts in by_node:
        inner = measured_placement([expert_sizes[e] for e in experts], gpus_per_node, [shares[e] for e in experts])
        layout += [tuple(experts[j] for j in rank) for rank in inner.rank_experts]
    return tuple(layout)


def redundant_layout(expert_sizes: Sequence[int], ep_size: int, shares: Sequence[float],
                     copies: int) -> Layout:
    """EP == number of experts plus ``copies`` extra copies of the hottest experts (DeepSeek-V3's EPLB, greedy).

    Each extra copy goes to the expert with the most work per copy
    (``h_i * s_i / copies_i``); then copies, largest work first, go to the
    least-loaded rank that does not hold that expert yet, with at most
    ``ceil((E + copies) / EP)`` experts per rank.
    """
    n = len(expert_sizes)
    work = [float(h) * s for h, s in zip(expert_sizes, shares)]
    count = [1] * n
    for _ in range(copies):
        hottest = max(range(n), key=lambda e: (work[e] / count[e], -e))
        count[hottest] += 1
    if max(count) > ep_size:
        raise ValueError(f"{copies} copies would put an expert on more than {ep_size} ranks")
    slots = math.ceil((n + copies) / ep_size)
    replicas = sorted(((work[e] / count[e], e) for e in range(n) for _ in range(count[e])), key=lambda t: (-t[0], t[1]))
    ranks: list[list[int]] = [[] for _ in range(ep_size)]
    load = [0.0] * ep_size
    for w, e in replicas:
        open_ranks = [r for r in range(ep_size) if len(ranks[r]) < slots and e not in ranks[r]]
        target = min(open_ranks, key=lambda r: (load[r], r))
        ranks[target].append(e)
        load[target] += w
    return tuple(tuple(sorted(r)) for r in ranks)


PLACEMENTS = ("contiguous", "balanced", "measured", "node-aware")


def layouts_for(name: str, expert_sizes: Sequence[int], ep_size: int, gpus_per_node: int,
                layers: Sequence[LayerRouting]) -> list[Layout]:
    """One layout per layer: ``contiguous``, ``balanced`` (sizes), ``measured`` (size x share), ``node-aware``."""
    if name == "contiguous":
        return [contiguous_placement(len(expert_sizes), ep_size).rank_experts] * len(layers)
    if name == "balanced":
        return [balanced_placement(expert_sizes, ep_size).rank_experts] * len(layers)
    if name == "measured":
        return [measured_placement(expert_sizes, ep_size, layer.shares).rank_experts for layer in layers]
    if name == "node-aware":
        return [node_aware_layout(expert_sizes, ep_size, gpus_per_node, layer.shares) for layer in layers]
    raise ValueError(f"unknown placement {name!r}; allowed: {', '.join(PLACEMENTS)}")


# --------------------------------------------------------------------------- inputs

_FRACTION = re.compile(r"^moe/layer_(\d+)/expert_(\d+)_token_fraction$")
_PER_TOKEN = re.compile(r"^moe/layer_(\d+)/experts_per_token$")


def routing_from_run(run_dir: Path, last: int = 5) -> tuple[list[LayerRouting], dict]:
    """Mean routing of the last ``last`` logged training points of a run (its ``metrics.jsonl``), and its config."""
    from hmoe_ds.training.replacement import logged_token_shares
    from hmoe_ds.training.metrics import read_jsonl

    metrics = Path(run_dir) / "metrics.jsonl"
    shares = logged_token_shares(metrics, window=last)
    if shares is None:
        raise SystemExit(f"error: {metrics} holds no routing (moe/layer_<l>/expert_<i>_token_fraction)")
    records = [r for r in read_jsonl(metrics) if any(_PER_TOKEN.match(k) for k in r)][-last:]
    per_token = [sum(r[f"moe/layer_{i}/experts_per_token"] for r in records) / len(records) for i in range(len(shares))]
    config = json.loads((Path(run_dir) / "model_config.json").read_text())
    return [LayerRouting(tuple(s), k) for s, k in zip(shares, per_token)], config


# --------------------------------------------------------------------------- tables


def _mib(value: float) -> float:
    return value / 2**20


def placement_rows(label: str, expert_sizes: Sequence[int], hidden_size: int, layers: Sequence[LayerRouting],
                   cluster: Cluster, ep_sizes: Sequence[int], tokens_per_rank: float, bytes_per_element: float,
                   moe_layers: int | None) -> list[list]:
    rows = []
    for ep in ep_sizes:
        for name in PLACEMENTS:
            if name == "node-aware" and ep <= cluster.gpus_per_node:
                continue  # identical to measured inside one node
            layouts = layouts_for(name, expert_sizes, ep, cluster.gpus_per_node, layers)
            cost = step_cost(layers, layouts, expert_sizes, hidden_size, cluster, tokens_per_rank, bytes_per_element,
                             moe_layers)
            rows.append([label, f"{cluster.nodes}x{cluster.gpus_per_node}", ep, name, round(cost.flops_imbalance, 3),
                         round(_mib(cost.intra_bytes_max), 1), round(_mib(cost.inter_bytes_max), 1),
                         round(_mib(cost.inter_bytes_mean), 1), round(cost.leave_node, 3)])
    return rows


def redundancy_rows(label: str, expert_sizes: Sequence[int], hidden_size: int, layers: Sequence[LayerRouting],
                    cluster: Cluster, tokens_per_rank: float, bytes_per_element: float, moe_layers: int | None,
                    copies: Sequence[int]) -> list[list]:
    ep = len(expert_sizes)
    rows = []
    for extra in copies:
        layouts = [redundant_layout(expert_sizes, ep, layer.shares, extra) for layer in layers]
        cost = step_cost(layers, layouts, expert_sizes, hidden_size, cluster, tokens_per_rank, bytes_per_element,
                         moe_layers)
        rows.append([label, f"{cluster.nodes}x{cluster.gpus_per_node}", ep, extra, round(cost.flops_imbalance, 3),
                     round(_mib(cost.params_max * TRAIN_BYTES_PER_PARAM), 1),
                     round(_mib(cost.params_mean * TRAIN_BYTES_PER_PARAM), 1),
                     round(_mib(cost.inter_bytes_max), 1)])
    return rows


def imbalance_rows(label: str, expert_sizes: Sequence[int], layers: Sequence[LayerRouting],
                   ep_sizes: Sequence[int]) -> list[list]:
    """Per MoE layer: work imbalance (max/mean over EP ranks of h x tokens) of each placement."""
    rows = []
    for ep in ep_sizes:
        for i, layer in enumerate(layers):
            rows.append([label, ep, i] + [
                round(work_imbalance(p, expert_sizes, layer.shares), 3) for p in (
                    contiguous_placement(len(expert_sizes), ep), balanced_placement(expert_sizes, ep),
                    measured_placement(expert_sizes, ep, layer.shares))])
    return rows


IMBALANCE_HEADERS = ["model", "EP", "MoE layer", "contiguous", "balanced (sizes)", "measured"]
PLACEMENT_HEADERS = ["model", "cluster", "EP", "placement", "FLOPs max/mean", "intra MiB/rank",
                     "inter MiB/rank max", "inter MiB/rank mean", "top-k leaving node"]
REDUNDANCY_HEADERS = ["model", "cluster", "EP", "extra copies", "FLOPs max/mean", "expert MiB/rank max",
                      "expert MiB/rank mean", "inter MiB/rank max"]


def _cluster(text: str) -> Cluster:
    nodes, gpus = (int(v) for v in text.lower().split("x"))
    if not (1 <= nodes <= 64 and 1 <= gpus <= 8):
        raise argparse.ArgumentTypeError(f"cluster {text}: nodes 1..64 x GPUs per node 1..8")
    return Cluster(nodes, gpus)


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.common import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="run directory: routing from its metrics.jsonl, sizes from it")
    parser.add_argument("--model", choices=["run", "paper-3b"], default="run",
                        help="expert sizes/width: the run's, or the paper's 3B (routing from --run or --shares)")
    parser.add_argument("--sizes", type=int, nargs="+", help="expert hidden sizes (instead of a run or model)")
    parser.add_argument("--hidden-size", type=int, help="model width d (with --sizes)")
    parser.add_argument("--shares", type=float, nargs="+", help="one layer's token shares per expert (with --sizes)")
    parser.add_argument("--experts-per-token", type=float, default=2.0, help="with --shares")
    parser.add_argument("--cluster", type=_cluster, nargs="+", default=[Cluster(64, 8)], help="NODESxGPUS, e.g. 64x8")
    parser.add_argument("--ep", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--tokens-per-rank", type=float, default=8192, help="tokens per rank per step")
    parser.add_argument("--bytes", type=float, default=2.0, help="bytes per element on the wire (2 = bf16)")
    parser.add_argument("--moe-layers", type=int, help="MoE layers per model (default: the run's; 3B: 24)")
    parser.add_argument("--copies", type=int, nargs="+", default=[0, 8, 16],
                        help="extra expert copies to simulate at EP == number of experts (multiples of EP: "
                             "every rank the same number of experts, as DeepSeek-V3 deploys them)")
    parser.add_argument("--json", type=Path, help="also write the tables here")
    args = parser.parse_args(argv)

    if args.run is not None:
        layers, config = routing_from_run(args.run)
        sizes, hidden, label = config["moe"]["expert_sizes"], config["hidden_size"], args.run.name
    elif args.sizes and args.shares and args.hidden_size:
        layers = [LayerRouting(tuple(args.shares), args.experts_per_token)]
        sizes, hidden, label = args.sizes, args.hidden_size, "given"
    else:
        parser.error("give --run, or --sizes, --hidden-size and --shares")
    moe_layers = args.moe_layers
    if args.model == "paper-3b":
        if len(layers[0].shares) != len(PAPER_3B["expert_sizes"]):
            parser.error("the 3B model has 8 experts: routing with 8 shares per layer is needed")
        sizes, hidden, label = PAPER_3B["expert_sizes"], PAPER_3B["hidden_size"], f"3B ({label} routing)"
        moe_layers = moe_layers or PAPER_3B["moe_layers"]
    if len(sizes) != len(layers[0].shares):
        parser.error(f"{len(sizes)} expert sizes but {len(layers[0].shares)} shares")

    placement, redundancy = [], []
    for cluster in args.cluster:
        eps = [ep for ep in args.ep if len(sizes) % ep == 0 and cluster.world % ep == 0
               and (ep <= cluster.gpus_per_node or ep % cluster.gpus_per_node == 0)]
        placement += placement_rows(label, sizes, hidden, layers, cluster, eps, args.tokens_per_rank, args.bytes,
                                    moe_layers)
        if len(sizes) in eps:
            redundancy += redundancy_rows(label, sizes, hidden, layers, cluster, args.tokens_per_rank, args.bytes,
                                          moe_layers, args.copies)
    notes = [f"sizes {list(sizes)}, d={hidden}, {len(layers)} measured layer routing(s) over "
             f"{moe_layers or len(layers)} MoE layers, {args.tokens_per_rank:g} tokens/rank/step, "
             f"{args.bytes:g} bytes/element; traffic = fwd+bwd dispatch and combine, leaving each rank"]
    divisors = [ep for ep in args.ep if len(sizes) % ep == 0]
    tables = [Table("Work imbalance per MoE layer (max/mean over EP ranks of hidden size x tokens)",
                    IMBALANCE_HEADERS, imbalance_rows(label, sizes, layers, divisors), notes[:1]),
              Table("Expert placement at cluster scale (simulated, per step)", PLACEMENT_HEADERS, placement, notes)]
    if redundancy:
        tables.append(Table("Redundant copies of the hottest experts at EP = experts (simulated)", REDUNDANCY_HEADERS,
                            redundancy, notes + [f"memory at {TRAIN_BYTES_PER_PARAM} bytes per expert weight"]))
    for table in tables:
        print(table.render() + "\n")
    if args.json:
        args.json.write_text(json.dumps({"tables": [t.as_dict() for t in tables]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
