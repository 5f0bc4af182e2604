"""The grouped expert path (``grouped_mm`` per width bucket) against the per-row reference and the loop.

Every case checks the output and the gradient of the input and of every
expert weight, for both storages (module list, ZeRO 0-2; packed, ZeRO-3), with
empty experts, one token, all tokens on one expert, no token at all, padded
buckets (``max_buckets`` below the number of distinct widths) and every
activation. Tolerances are fp32 round-off: the paths sum the same products in
a different order.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hmoe_ds import HMoE, HMoELayerConfig
from hmoe_ds.config import ExpertCompute
from hmoe_ds.experts import (HeteroExperts, PackedHeteroExperts, expert_compute_order,
                             plan_width_buckets, resolve_expert_compute)

from .distributed import run_distributed
from .reference import experts_reference

D = 24
SIZES = [32, 48, 48, 20, 96, 128, 64, 48]  # unsorted, repeats, one width (20) not a multiple of 8

COUNT_PATTERNS = {
    "random": [5, 0, 7, 3, 11, 2, 0, 9],
    "one token": [0, 0, 0, 0, 0, 1, 0, 0],
    "all on one expert": [0, 0, 0, 37, 0, 0, 0, 0],
    "no token": [0] * 8,
    "all on the widest, rest empty": [0, 0, 0, 0, 0, 23, 0, 0],
}


def _make(storage: str, activation: str, compute: str, max_buckets: int = 8, sizes=SIZES, dtype=torch.float32):
    torch.manual_seed(7)
    if storage == "module":
        experts = HeteroExperts(D, sizes, activation, "ep_size_1", compute, max_buckets)
    else:
        experts = PackedHeteroExperts(D, sizes, activation, compute, max_buckets)
    return experts.to(dtype)


def _copy_weights(src, dst) -> None:
    with torch.no_grad():
        for a, b in zip(src.per_expert_weights(), dst.per_expert_weights()):
            for wa, wb in zip(a, b):
                if wa is not None:
                    wb.copy_(wa)


def _run(experts, x_RD, counts, upstream):
    x = x_RD.detach().clone().requires_grad_(True)
    out = experts(x, counts)
    (out * upstream).sum().backward()
    grads = [w.grad for w in experts.parameters()]
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("storage", ["module", "packed"])
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu"])
@pytest.mark.parametrize("max_buckets", [8, 2, 1])
@pytest.mark.parametrize("pattern", list(COUNT_PATTERNS))
@pytest.mark.parametrize("compute", ["grouped", "auto"])
def test_grouped_equals_reference_and_loop_in_output_and_every_gradient(storage, activation, max_buckets, pattern,
                                                                        compute):
    """``grouped`` forced runs ``grouped_mm`` here; ``auto`` on CPU runs the loop kernel in the grouped row order."""
    grouped = _make(storage, activation, compute, max_buckets)
    loop = _make(storage, activation, "loop")
    _copy_weights(grouped, loop)
    assert grouped.expert_compute is ExpertCompute.GROUPED and loop.expert_compute is ExpertCompute.LOOP
    assert grouped.runs_grouped("cpu") is (compute == "grouped")
    assert len(grouped.width_buckets) <= max_buckets
    slot_counts = COUNT_PATTERNS[pattern]
    order = grouped.compute_order
    counts = [slot_counts[s] for s in order]  # rows arrive in compute order
    rows = sum(counts)
    x = torch.randn(rows, D)
    upstream = torch.randn(rows, D)
    out_g, dx_g, dw_g = _run(grouped, x, counts, upstream)

    # The slow reference, with autograd through its per-row math.
    weights = [tuple(None if w is None else w.detach().clone().requires_grad_(True) for w in triple)
               for triple in grouped.per_expert_weights()]
    x_ref = x.clone().requires_grad_(True)
    ref = experts_reference(x_ref, counts, order, weights, activation)
    torch.testing.assert_close(out_g, ref.detach(), rtol=1e-5, atol=1e-5)
    flat = [w for triple in weights for w in triple if w is not None]
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [x_ref] + flat, allow_unused=True)
    ref_dx = ref_grads[0] if ref_grads[0] is not None else torch.zeros_like(x)
    torch.testing.assert_close(dx_g, ref_dx, rtol=1e-5, atol=1e-5)
    # Per-expert weight gradients, through per_expert_weights() views of the parameter gradients.
    ref_by_weight = iter(ref_grads[1:])
    for slot, (mine, triple) in enumerate(zip(_per_expert_grads(grouped), weights)):
        for g, w in zip(mine, [w for w in triple if w is not None]):
            r = next(ref_by_weight)
            torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, rtol=1e-5, atol=1e-5,
                                       msg=f"slot {slot}")
            if slot_counts[slot] == 0:
                assert g.abs().sum() == 0  # idle experts: a zero gradient, never None (DeepSpeed issue 4808)

    # And against the loop path, row for row (the loop receives rows in its own, identity, order).
    perm = _rows_in_slot_order(order, counts)
    out_l, dx_l, dw_l = _run(loop, x[perm], [slot_counts[s] for s in range(len(SIZES))], upstream[perm])
    torch.testing.assert_close(out_g[perm], out_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_g[perm], dx_l, rtol=1e-5, atol=1e-5)
    for g, l in zip(dw_g, dw_l):
        torch.testing.assert_close(g, l, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("storage", ["module", "packed"])
@pytest.mark.parametrize("compute", ["loop", "grouped", "auto"])
@pytest.mark.parametrize("pattern", ["random", "one token", "no token", "all on the widest, rest empty"])
def test_input_gradient_written_into_a_scratch_output_gradient(storage, compute, pattern):
    """``output_grad_is_scratch``: the input gradient overwrites the output gradient's buffer, with the same values.

    Without the flag (a caller whose output has other readers) the output
    gradient is left as it was.
    """
    experts = _make(storage, "swiglu", compute, max_buckets=2)
    slot_counts = COUNT_PATTERNS[pattern]
    counts = [slot_counts[s] for s in experts.compute_order]
    x = torch.randn(sum(counts), D)
    upstream = torch.randn(sum(counts), D)
    results = {}
    for scratch in (False, True):
        experts.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_(True)
        grad_out = upstream.clone()
        experts(x_in, counts, output_grad_is_scratch=scratch).backward(grad_out)
        results[scratch] = (x_in.grad, [w.grad.clone() for w in experts.parameters()], grad_out)
    dx_private, dw_private, grad_out_private = results[False]
    dx_scratch, dw_scratch, grad_out_scratch = results[True]
    torch.testing.assert_close(grad_out_private, upstream, rtol=0, atol=0)
    torch.testing.assert_close(dx_scratch, dx_private, rtol=1e-6, atol=1e-6)
    for a, b in zip(dw_scratch, dw_private):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The scratch buffer now holds the input gradient: no second [rows, D] buffer was needed.
    # (x_in.grad itself is AccumulateGrad's copy, since this test still holds grad_out.)
    torch.testing.assert_close(grad_out_scratch, dx_private, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("storage", ["module", "packed"])
def test_loop_path_does_not_hold_the_whole_input_until_backward(storage):
    """The loop keeps per-expert copies of its rows, freed one by one in backward, not the grouped input buffer.

    Holding the buffer would keep one ``[rows, D]`` tensor alive to the end of
    backward, when every weight gradient is: the layer's peak at small batches.
    """
    import gc
    import weakref

    experts = _make(storage, "swiglu", "loop")
    counts = COUNT_PATTERNS["random"]
    base = torch.randn(sum(counts), D, requires_grad=True)
    x_RD = base * 1.0  # a non-leaf, as the layer's gathered rows are; MulBackward saves no tensor of it
    out = experts(x_RD, counts)
    alive = weakref.ref(x_RD)
    del x_RD
    gc.collect()
    assert alive() is None
    out.backward(torch.ones_like(out))
    assert base.grad is not None and torch.isfinite(base.grad).all()


def _per_expert_grads(experts):
    if isinstance(experts, HeteroExperts):
        return [tuple(w.grad for w in (e.w1.weight, e.w2.weight) + ((e.w3.weight,) if e.w3 is not None else ()))
                for e in experts.deepspeed_experts]
    out = []
    w1g = experts.w1.grad[0].split(experts.expert_sizes, dim=0)
    w2g = experts.w2.grad[0].split(experts.expert_sizes, dim=1)
    w3g = experts.w3.grad[0].split(experts.expert_sizes, dim=0) if not experts.w3_is_placeholder else None
    for i in range(len(experts.expert_sizes)):
        out.append((w1g[i], w2g[i]) + ((w3g[i],) if w3g is not None else ()))
    return out


def _rows_in_slot_order(order, counts) -> torch.Tensor:
    """Index that reorders rows grouped in ``order`` into rows grouped by slot 0, 1, ..."""
    starts, pos = {}, 0
    for slot, count in zip(order, counts):
        starts[slot] = (pos, count)
        pos += count
    return torch.cat([torch.arange(starts[s][0], starts[s][0] + starts[s][1]) for s in sorted(starts)]
                     + [torch.zeros(0, dtype=torch.long)])


def test_width_buckets_share_equal_widths_and_respect_the_bound():
    buckets = plan_width_buckets([64, 128, 64, 192, 128, 64])
    assert [b.width for b in buckets] == [64, 128, 192]
    assert [b.slots for b in buckets] == [(0, 2, 5), (1, 4), (3,)]
    assert all(b.padding == 0 for b in buckets)
    # Widths round up to a multiple of 8 (grouped_mm's 16-byte strides in bf16).
    assert plan_width_buckets([20])[0].width == 24
    # 17 distinct widths, at most 8 buckets; every slot exactly once, widths cover their sizes.
    sizes = [512 + 64 * (i // 2) for i in range(34)]
    buckets = plan_width_buckets(sizes, max_buckets=8)
    assert len(buckets) == 8
    assert sorted(s for b in buckets for s in b.slots) == list(range(len(sizes)))
    assert all(b.width >= h for b in buckets for h in b.sizes)


def test_width_bucket_partition_is_the_least_padding_one():
    """Dynamic programming against brute force over every way to cut the sorted widths."""
    sizes = [16, 24, 24, 40, 48, 88, 96, 96, 200]
    widths = sorted(set(sizes))
    for max_buckets in range(1, len(widths) + 1):
        best = min(
            sum(max(run) * sum(sizes.count(w) for w in run) - sum(h for h in sizes if h in run) for run in runs)
            for cuts in itertools.combinations(range(1, len(widths)), max_buckets - 1)
            for runs in [[widths[i:j] for i, j in zip((0,) + cuts, cuts + (len(widths),))]]
        )
        got = plan_width_buckets(sizes, max_buckets)
        assert sum(b.width * len(b.sizes) - sum(b.sizes) for b in got) == best, max_buckets


def test_auto_rule_and_forcing():
    assert resolve_expert_compute("auto", 24, SIZES) is ExpertCompute.GROUPED
    assert resolve_expert_compute("auto", 12, SIZES) is ExpertCompute.LOOP  # 12 * 2 bytes: not 16-byte aligned
    assert resolve_expert_compute("loop", 24, SIZES) is ExpertCompute.LOOP
    with pytest.raises(ValueError, match=r"expert_compute='grouped' cannot run here: hidden_size=12 .*'loop'"):
        resolve_expert_compute("grouped", 12, SIZES)
    with pytest.raises(ValueError, match=r"expert_compute='fast' is not supported; allowed values: 'auto', 'grouped', "
                                         r"'loop'"):
        HMoELayerConfig(expert_sizes=SIZES, expert_compute="fast")
    with pytest.raises(ValueError, match="expert_compute='grouped' cannot run here"):
        HMoE(12, SIZES, expert_compute="grouped")
    assert HMoE(12, SIZES).deepspeed_moe.experts.expert_compute is ExpertCompute.LOOP
    assert HMoE(D, SIZES).deepspeed_moe.experts.expert_compute is ExpertCompute.GROUPED
    assert HMoE(D, SIZES, expert_compute="loop").deepspeed_moe.experts.expert_compute is ExpertCompute.LOOP
    assert expert_compute_order("loop", D, SIZES) == list(range(len(SIZES)))
    assert sorted(expert_compute_order("grouped", D, SIZES)) == list(range(len(SIZES)))


@pytest.mark.parametrize("routing", [dict(routing="top_k", top_k=2), dict(routing="top_p", top_p=0.7),
                                     dict(routing="top_k", top_k=2, capacity_factor=0.5, min_capacity=1)])
@pytest.mark.parametrize("placement", ["contiguous", "balanced"])
def test_layer_grouped_equals_layer_loop(routing, placement):
    """Whole layers: same output, aux loss, counts and gradients whichever path computes the experts."""
    layers = {}
    for compute in ("grouped", "loop"):
        torch.manual_seed(3)
        layers[compute] = HMoE(D, SIZES, expert_compute=compute, placement=placement, **routing)
    layers["loop"].load_state_dict(layers["grouped"].state_dict())
    x = torch.randn(4, 9, D)
    results = {}
    for compute, layer in layers.items():
        xi = x.clone().requires_grad_(True)
        out, aux, counts = layer(xi)
        ((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + aux).backward()
        results[compute] = (out.detach(), aux.detach(), counts, xi.grad,
                            {n: p.grad for n, p in layer.named_parameters()})
    g, l = results["grouped"], results["loop"]
    torch.testing.assert_close(g[0], l[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[1], l[1])
    assert g[2].tolist() == l[2].tolist()
    torch.testing.assert_close(g[3], l[3], rtol=1e-5, atol=1e-6)
    for name, grad in g[4].items():
        torch.testing.assert_close(grad, l[4][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("storage", ["module", "packed"])
def test_bf16_grouped_matches_fp32_reference_within_bf16_rounding(storage):
    """bf16 weights and rows: grouped and loop agree with the fp32 computation to bf16 precision."""
    fp32 = _make(storage, "swiglu", "grouped", max_buckets=3)
    counts_by_slot = COUNT_PATTERNS["random"]
    order = fp32.compute_order
    counts = [counts_by_slot[s] for s in order]
    x = torch.randn(sum(counts), D)
    ref = fp32(x, counts).detach()
    for compute in ("grouped", "loop"):
        experts = _make(storage, "swiglu", compute, max_buckets=3, dtype=torch.bfloat16)
        _copy_weights(fp32, experts)
        if compute == "loop":
            perm = _rows_in_slot_order(order, counts)
            out = experts(x[perm].bfloat16(), list(counts_by_slot))
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(len(perm))
            out = out[inverse]
        else:
            out = experts(x.bfloat16(), counts)
        assert out.dtype is torch.bfloat16
        # bf16 has an 8-bit mantissa: relative error ~2^-8 per rounding, a few roundings deep.
        torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


def _ep_case(rank: int, world_size: int, compute: str, placement: str, skew: bool) -> dict:
    from hmoe_ds import HMoE

    sizes = [16, 24, 32, 40, 48, 56, 64, 72, 24, 16, 32, 40]
    torch.manual_seed(0)
    full = HMoE(16, sizes, routing="top_k", top_k=2, expert_compute="loop")
    ep = HMoE(16, sizes, routing="top_k", top_k=2, ep_size=world_size, placement=placement, expert_compute=compute)
    block = ep.deepspeed_moe
    block.gate.load_state_dict(full.deepspeed_moe.gate.state_dict())
    if skew:  # every token to experts 0 and 1 (one EP rank idle under contiguous placement)
        with torch.no_grad():
            for layer in (full, ep):
                layer.deepspeed_moe.gate.wg.weight.zero_()
                layer.deepspeed_moe.gate.wg.weight[0].fill_(5.0)
                layer.deepspeed_moe.gate.wg.weight[1].fill_(4.0)
    for slot, logical in enumerate(block.local_expert_ids):
        block.experts.deepspeed_experts[slot].load_state_dict(
            full.deepspeed_moe.experts.deepspeed_experts[logical].state_dict())

    def inputs(r):
        x = torch.randn(1 if r == 1 else 17, 16, generator=torch.Generator().manual_seed(100 + r))  # rank 1: one token
        return x.abs() if skew else x

    x = inputs(rank).requires_grad_(True)
    out, _, counts = ep(x)
    (out * 1.5).sum().backward()
    ref_out = ref_grad = None
    for r in range(world_size):
        xr = inputs(r).requires_grad_(True)
        o, _, c = full(xr)
        (o * 1.5).sum().backward()
        if r == rank:
            ref_out, ref_grad = o.detach(), xr.grad
    torch.testing.assert_close(out.detach(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-5, atol=1e-6)
    for slot, logical in enumerate(block.local_expert_ids):
        mine = dict(block.experts.deepspeed_experts[slot].named_parameters())
        for name, p in full.deepspeed_moe.experts.deepspeed_experts[logical].named_parameters():
            torch.testing.assert_close(mine[name].grad, p.grad, rtol=1e-5, atol=1e-6)
    return {"compute": str(block.experts.expert_compute), "buckets": len(block.experts.width_buckets)}


def _ep_cases(rank: int, world_size: int) -> dict:
    return {f"{compute} {placement} skew={skew}": _ep_case(rank, world_size, compute, placement, skew)
            for compute in ("grouped", "loop") for placement in ("contiguous", "balanced") for skew in (False, True)}


@pytest.mark.slow
@pytest.mark.distributed
def test_expert_parallel_grouped_path_matches_single_process():
    """EP=2: grouped and loop paths, both placements, one rank with one token, and one EP rank idle."""
    results = run_distributed(_ep_cases, world_size=2)
    for name, value in results[0].items():
        assert value["compute"] == name.split()[0], name


@pytest.mark.parametrize("compute, expect_grouped_mm", [("grouped", True), ("auto", False), ("loop", False)])
def test_the_path_that_runs_on_cpu(compute, expect_grouped_mm):
    """The kernels a CPU call really runs: ``auto`` takes the loop here, ``grouped`` forced takes ``grouped_mm``."""
    from torch.profiler import ProfilerActivity, profile

    experts = _make("module", "swiglu", compute)
    counts = [COUNT_PATTERNS["random"][s] for s in experts.compute_order]
    x = torch.randn(sum(counts), D, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        experts(x, counts).sum().backward()
    names = {event.name for event in prof.events()}
    assert ("aten::_grouped_mm" in names) is expect_grouped_mm
    if not expect_grouped_mm:
        assert "aten::cat" not in names  # the loop writes each expert's rows in place (a padded bucket may cat)
    expected_path = {"grouped": "grouped (", "auto": "on accelerators, loop on CPU", "loop": "loop path"}[compute]
    assert expected_path in repr(experts)
    assert experts.runs_grouped("cuda") is (compute != "loop")
    assert experts.runs_grouped("cuda", torch.float64) is False  # grouped_mm has no float64 kernel


@pytest.mark.parametrize("storage", ["module", "packed"])
@pytest.mark.parametrize("compute", ["grouped", "auto", "loop"])
def test_token_counts_that_do_not_match_are_named(storage, compute):
    experts = _make(storage, "swiglu", compute)
    with pytest.raises(ValueError, match=r"got 3 token counts for 8 local experts"):
        experts(torch.randn(6, D), [2, 2, 2])
    with pytest.raises(ValueError, match=r"token counts \[1, 1, 1, 1, 1, 1, 1, 1\] do not add up to the 9 rows"):
        experts(torch.randn(9, D), [1] * 8)


def test_buckets_adjacent_in_memory_are_views_not_copies():
    """Packed storage with neighbouring equal widths, and one-expert buckets, cost no weight copy."""
    packed = PackedHeteroExperts(D, [32, 32, 48, 48], "swiglu", "grouped")
    modules = HeteroExperts(D, [32, 48, 64], "swiglu", "ep_size_1", "grouped")
    for experts, params in ((packed, [packed.w1, packed.w2, packed.w3]), (modules, None)):
        weights = experts.per_expert_weights()
        plan = experts._plan
        for bucket, index in zip(plan.buckets, plan.indices):
            for which in range(3):
                stacked = plan.stack(weights, bucket, index, which)
                source = params[which] if params is not None else weights[bucket.slots[0]][which]
                assert stacked.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
                expected = torch.stack([weights[s][which] for s in bucket.slots])
                torch.testing.assert_close(stacked, expected, rtol=0, atol=0)


def test_module_list_buckets_stay_views_after_dtype_conversion_with_the_same_parameter_objects():
    """``.to(bf16)`` re-shares the bucket blocks; parameter objects (optimizer groups, DeepSpeed tags) are kept."""
    experts = HeteroExperts(D, [32, 32, 48, 48], "swiglu", "ep_size_1", "grouped")
    before = [id(p) for p in experts.parameters()]
    experts = experts.to(torch.bfloat16)
    assert [id(p) for p in experts.parameters()] == before
    assert all(p.dtype is torch.bfloat16 and p.allreduce is False and p.group_name == "ep_size_1"
               for p in experts.parameters())
    weights = experts.per_expert_weights()
    for bucket in experts.width_buckets:
        for which in range(3):
            pieces = [weights[s][which] for s in bucket.slots]
            assert len({p.untyped_storage().data_ptr() for p in pieces}) == 1


def _gathered_into_one_buffer(params) -> None:
    """What DeepSpeed's coalesced all-gather does: several parameters become views of one flat buffer."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for param in params:
        param.data = flat[offset:offset + param.numel()].view(param.shape)
        offset += param.numel()


def _released_and_gathered_again(params) -> None:
    """What ZeRO-3 does between a module's forward and its backward, done by hand.

    It releases a gathered parameter by swapping its ``.data`` for an empty
    tensor, and gathers it again into a *new* buffer before the module's
    backward. The forward-time buffers are then overwritten with NaN: a
    backward that still reads them (saved views, which would also have kept
    them alive: every layer's experts gathered at once, whatever the rank
    count) gives NaN instead of the reference gradients.
    """
    forward_buffers = [param.data for param in params]
    for param in params:
        param.data = torch.empty(0)
    for param, buffer in zip(params, forward_buffers):
        param.data = buffer.clone()
        buffer.fill_(float("nan"))


@pytest.mark.parametrize("coalesced", [False, True], ids=["own buffers", "one gathered buffer"])
@pytest.mark.parametrize("compute", ["loop", "grouped", "auto"])
def test_packed_backward_reads_the_regathered_parameters_not_the_forward_buffers(compute, coalesced):
    """Built-in packs: after ZeRO-3's release and re-gather, backward still gives the reference gradients
    (:func:`_released_and_gathered_again`), also when the packs were gathered as views of one buffer."""
    sizes = [32, 48, 48, 20]
    counts_by_slot = [5, 0, 7, 3]
    experts = _make("packed", "swiglu", compute, sizes=sizes)
    reference = _make("packed", "swiglu", compute, sizes=sizes)
    _copy_weights(experts, reference)
    counts = [counts_by_slot[s] for s in experts.compute_order]
    x = torch.randn(sum(counts), D)
    upstream = torch.randn(sum(counts), D)
    out_ref, dx_ref, dw_ref = _run(reference, x, counts, upstream)

    if coalesced:
        _gathered_into_one_buffer(list(experts.parameters()))
    x_in = x.clone().requires_grad_(True)
    out = experts(x_in, counts)
    _released_and_gathered_again(list(experts.parameters()))
    (out * upstream).sum().backward()
    torch.testing.assert_close(out.detach(), out_ref)
    torch.testing.assert_close(x_in.grad, dx_ref)
    for grad, expected in zip([p.grad for p in experts.parameters()], dw_ref):
        torch.testing.assert_close(grad, expected)


# --------------------------------------------------------------------------- the user's modules, packed (ZeRO-3)


def _user_ffn(d: int, h: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.GELU(), torch.nn.Linear(h, d))


def test_user_expert_packs_hold_each_parameter_whole_and_pad_equal_on_every_rank():
    from hmoe_ds.experts import packed_rows, plan_user_expert_packs

    shapes = [[(n, tuple(p.shape)) for n, p in _user_ffn(12, h).named_parameters()] for h in (8, 16, 24)]
    members, fill = plan_user_expert_packs(shapes)
    assert [(m.slot, m.name) for m in members] == [(j, n) for j, named in enumerate(shapes) for n, _ in named]
    for pack in range(3):  # no overlap, no gap, inside the pack
        spans = sorted((m.offset, m.offset + m.numel) for m in members if m.pack == pack)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] == fill[pack]
    assert max(fill) - min(fill) <= max(m.numel for m in members)
    other_rank = shapes[:1]
    assert packed_rows([shapes, other_rank], 12) == -(-max(fill) // 12)  # the fuller rank sets the rows


def test_packed_user_experts_compute_the_users_modules_with_their_gradients():
    from hmoe_ds.experts import PackedModuleExperts, packed_rows

    d = 12
    modules = [_user_ffn(d, h) for h in (8, 16, 24)]
    shapes = [[(n, tuple(p.shape)) for n, p in m.named_parameters()] for m in modules]
    packed = PackedModuleExperts(d, modules, packed_rows([shapes], d) + 2)  # with padding rows
    assert "loop path" in repr(packed) and packed.compute_order == [0, 1, 2]
    assert [n for n, _ in packed.named_parameters()] == ["w1", "w2", "w3"]
    x = torch.randn(10, d)
    counts = [3, 0, 7]
    xp = x.clone().requires_grad_(True)
    out = packed(xp, counts)
    upstream = torch.randn(out.shape)
    (out * upstream).sum().backward()
    xr = x.clone().requires_grad_(True)
    ref = torch.cat([m(c) for m, c in zip(modules, torch.split(xr, counts))])
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(xp.grad, xr.grad)
    grads = packed.expert_parameters([p.grad for p in packed.packs()])
    for j, module in enumerate(modules):
        for name, param in module.named_parameters():
            torch.testing.assert_close(grads[j][name], param.grad, msg=f"{j} {name}")
    for pack, used in zip(packed.packs(), packed.used):  # padding: zero, and a zero gradient
        assert pack.detach().reshape(-1)[used:].abs().sum() == 0 and pack.grad.reshape(-1)[used:].abs().sum() == 0
    # Values in and out by the user's names; train/eval reach the skeletons (dropout).
    values = [{n: torch.randn(p.shape) for n, p in m.named_parameters()} for m in modules]
    for pack, full in packed.full_values(values):
        pack.data.copy_(full)
    for j, named in enumerate(packed.expert_parameters()):
        for name, value in named.items():
            torch.testing.assert_close(value, values[j][name])
    packed.eval()
    assert not any(s.training for s in packed.skeletons)
    with pytest.raises(ValueError, match="shape"):
        packed.full_values([{**values[0], "0.weight": torch.zeros(1)}, values[1], values[2]])


@pytest.mark.parametrize("coalesced", [False, True], ids=["own buffers", "one gathered buffer"])
def test_packed_user_experts_backward_reads_the_regathered_packs_not_the_forward_buffers(coalesced):
    """As for the built-in packs (:func:`_released_and_gathered_again`): the user's modules' saved weights
    must come from the re-gathered packs, also when the packs were gathered as views of one buffer."""
    from hmoe_ds.experts import PackedModuleExperts, packed_rows

    d = 12
    modules = [_user_ffn(d, h) for h in (8, 16, 24)]
    shapes = [[(n, tuple(p.shape)) for n, p in m.named_parameters()] for m in modules]
    packed = PackedModuleExperts(d, modules, packed_rows([shapes], d))
    x, counts = torch.randn(10, d), [3, 0, 7]
    upstream = torch.randn(10, d)
    xr = x.clone().requires_grad_(True)
    ref = torch.cat([m(c) for m, c in zip(modules, torch.split(xr, counts))])
    (ref * upstream).sum().backward()

    if coalesced:
        _gathered_into_one_buffer(packed.packs())
    xp = x.clone().requires_grad_(True)
    out = packed(xp, counts)
    _released_and_gathered_again(packed.packs())
    (out * upstream).sum().backward()
    torch.testing.assert_close(xp.grad, xr.grad)
    grads = packed.expert_parameters([p.grad for p in packed.packs()])
    for j, module in enumerate(modules):
        for name, param in module.named_parameters():
            torch.testing.assert_close(grads[j][name], param.grad, msg=f"{j} {name}")


def test_packed_user_experts_refuse_buffers():
    from hmoe_ds.experts import PackedModuleExperts

    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    with pytest.raises(ValueError, match="has buffers"):
        PackedModuleExperts(8, [module], 4)


# --------------------------------------------------------------------------- ep_size 1: the experts route the tokens


def _routed_inputs(experts, pattern: str, tokens: int = 40, dtype=torch.float32):
    """Tokens, and assignments grouped by expert in compute order (as the dispatch plan makes them)."""
    counts = [COUNT_PATTERNS[pattern][s] for s in experts.compute_order]
    generator = torch.Generator().manual_seed(5)
    # Each expert's tokens are distinct and ascending (a token meets an expert at most once), as in the plan.
    token_idx = torch.cat([torch.randperm(tokens, generator=generator)[:c].sort().values for c in counts])
    x = torch.randn(tokens, D, generator=generator).to(dtype)
    gate = torch.rand(token_idx.shape[0], generator=generator)
    upstream = torch.randn(tokens, D, generator=generator)
    return x, token_idx, gate, counts, upstream


@pytest.mark.parametrize("storage", ["module", "packed"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("pattern", list(COUNT_PATTERNS))
def test_routed_loop_equals_gather_experts_scatter_and_the_reference(storage, activation, pattern):
    """``route=``: the same output and gradients (input, gates, every weight) as gather -> loop -> scatter-add,
    and as the per-row reference weighted and summed by hand."""
    from hmoe_ds.dispatch import _GatedScatterAdd
    from hmoe_ds.experts import TokenRoute

    routed, plain = _make(storage, activation, "auto"), _make(storage, activation, "auto")
    _copy_weights(routed, plain)
    x, token_idx, gate, counts, upstream = _routed_inputs(routed, pattern)
    results = []
    for experts, use_route in ((routed, True), (plain, False)):
        xi, gi = x.clone().requires_grad_(True), gate.clone().requires_grad_(True)
        if use_route:
            out = experts(xi, counts, route=TokenRoute(token_idx_A=token_idx, gate_A=gi))
        else:
            out = _GatedScatterAdd.apply(experts(xi.index_select(0, token_idx), counts), gi, token_idx, x.shape[0])
        (out * upstream).sum().backward()
        results.append((out.detach(), xi.grad, gi.grad, [p.grad for p in experts.parameters()]))
    (out_r, dx_r, dg_r, dw_r), (out_p, dx_p, dg_p, dw_p) = results
    torch.testing.assert_close(out_r, out_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_r, dx_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dg_r, dg_p, rtol=1e-5, atol=1e-6)
    for grad, expected in zip(dw_r, dw_p):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
        assert grad is not None  # an expert without tokens still gets its (zero) gradient
    weights = [routed.per_expert_weights()[s] for s in routed.compute_order]
    y_ref = experts_reference(x.index_select(0, token_idx), counts, list(range(len(counts))), weights, activation)
    expected = torch.zeros(x.shape).index_add_(0, token_idx, y_ref.detach() * gate[:, None])
    torch.testing.assert_close(out_r, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", [dict(routing="top_k", top_k=2), dict(routing="top_p", top_p=0.7),
                                     dict(routing="top_k", top_k=2, capacity_factor=0.5, min_capacity=1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_with_experts_routing_the_tokens_equals_the_separate_gather_and_scatter(routing, dtype, monkeypatch):
    """Whole ep_size-1 layers on CPU (the loop): the fused path runs, and gives the unfused path's output, aux
    loss and every gradient (router included, through the gates); bf16 within its rounding."""
    import hmoe_ds.experts as experts_module

    calls = []
    original = experts_module._RoutedLoopFFN.apply
    monkeypatch.setattr(experts_module._RoutedLoopFFN, "apply", lambda *a: calls.append(1) or original(*a))
    layers = {}
    for fused in (True, False):
        torch.manual_seed(3)
        layers[fused] = HMoE(D, SIZES, placement="balanced", **routing).to(dtype)
        layers[fused].moe_core.experts_route_tokens = fused
    layers[False].load_state_dict(layers[True].state_dict())
    x = torch.randn(4, 9, D).to(dtype)
    results = {}
    for fused, layer in layers.items():
        xi = x.clone().requires_grad_(True)
        out, aux, counts = layer(xi)
        ((out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + aux).backward()
        results[fused] = (out.detach(), aux.detach(), counts, xi.grad,
                          {n: p.grad for n, p in layer.named_parameters()})
    assert len(calls) == 1  # the fused layer only
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    f, u = results[True], results[False]
    torch.testing.assert_close(f[0], u[0], **tol)
    torch.testing.assert_close(f[1], u[1])
    assert f[2].tolist() == u[2].tolist()
    torch.testing.assert_close(f[3], u[3], **tol)
    for name, grad in f[4].items():
        torch.testing.assert_close(grad, u[4][name], **tol, msg=name)
