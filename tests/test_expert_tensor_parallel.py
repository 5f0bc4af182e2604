"""DeepSpeed's ``enable_expert_tensor_parallelism`` and TP > 1 without it, on gloo ranks with a Megatron-style mpu.

Every case compares a tensor-parallel layer with the same layer computed whole
on one rank (or with DeepSpeed's ``MoE`` under the same mpu): outputs,
``l_aux``, ``exp_counts``, input gradients and every parameter gradient.
Built-in experts under expert TP hold hidden slices, whose gradients must be
the matching slices of the whole experts' gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from hmoe_ds import HMoE, collect_routing_stats

from .distributed import run_distributed

D, T = 16, 24
SIZES = [8, 16, 24, 40]  # unequal, each a multiple of the TP size 2


class SimpleMPU:
    """A Megatron-style mpu as DeepSpeed's ``TestMOETensorParallel`` writes it: TP groups of consecutive ranks."""

    def __init__(self, tp: int) -> None:
        self.rank, self.world, self.tp = dist.get_rank(), dist.get_world_size(), tp
        for start in range(0, self.world, tp):
            group = dist.new_group(list(range(start, start + tp)))
            if start <= self.rank < start + tp:
                self.tp_group = group
        for lane in range(tp):
            group = dist.new_group(list(range(lane, self.world, tp)))
            if self.rank % tp == lane:
                self.dp_group = group

    def get_model_parallel_rank(self) -> int:
        return self.rank % self.tp

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_group(self):
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.rank // self.tp

    def get_data_parallel_world_size(self) -> int:
        return self.world // self.tp

    def get_data_parallel_group(self):
        return self.dp_group


def _user_expert(hidden: int = 20) -> nn.Module:
    return nn.Sequential(nn.Linear(D, hidden), nn.GELU(), nn.Linear(hidden, D))


def _run(layer, x, seed=3):
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    with collect_routing_stats() as stats:
        out, l_aux, counts = layer(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    ((out * upstream).sum() + l_aux).backward()
    return dict(out=out.detach(), aux=l_aux.detach(), counts=counts.detach(), x_grad=x.grad,
                params=stats[0].activated_expert_params_per_token if stats else None)  # DeepSpeed's: none


def _same(a: dict, b: dict) -> None:
    torch.testing.assert_close(a["out"], b["out"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["aux"], b["aux"].to(a["aux"].dtype), rtol=1e-5, atol=1e-7)
    assert a["counts"].tolist() == b["counts"].tolist()
    torch.testing.assert_close(a["x_grad"], b["x_grad"], rtol=1e-4, atol=1e-6)
    assert a["params"] == pytest.approx(b["params"])


def _hmoe_pair(mpu, ep_size: int, expert_tp: bool, compute: str):
    """A whole, single-rank reference layer and the same layer under ``mpu`` (same router, same logical experts)."""
    options = dict(routing="top_k", top_k=2, p_penalty_coef=0.1, entropy_coef=0.01, expert_compute=compute)
    from deepspeed.utils import groups

    registered, groups.mpu = groups.mpu, None  # the reference sees no tensor parallelism
    ref = HMoE(D, expert_sizes=SIZES, **options)
    groups.mpu = registered
    layer = HMoE(D, expert_sizes=SIZES, ep_size=ep_size, enable_expert_tensor_parallelism=expert_tp, mpu=mpu,
                 **options)
    layer.set_deepspeed_parallelism()  # as deepspeed.initialize does
    for each in (ref, layer):
        each.deepspeed_moe.init_expert_weights(0.3, seed=7)  # whole experts by logical id; TP ranks keep slices
        with torch.no_grad():
            each.deepspeed_moe.gate.wg.weight.copy_(torch.randn(len(SIZES), D, generator=torch.Generator().manual_seed(5)))
    return ref, layer


def _expert_grads(layer, sum_over=None) -> dict[int, dict[str, torch.Tensor]]:
    """Each local expert's weight gradients, summed over the group ``sum_over`` if given."""
    core = layer.deepspeed_moe
    out = {}
    for logical, expert in zip(core.local_expert_ids, core.experts.deepspeed_experts):
        out[logical] = {name: getattr(expert, name).weight.grad.clone() for name in ("w1", "w2", "w3")}
        if sum_over is not None:
            for grad in out[logical].values():
                dist.all_reduce(grad, group=sum_over)
    return out


def _whole_grads(ref, layer) -> dict[int, dict[str, torch.Tensor]]:
    """The whole experts' gradients for the tokens that reach ``layer``'s experts: the reference's, summed over
    the expert-parallel group (each of its ranks sends its own tokens)."""
    return _expert_grads(ref, layer.deepspeed_moe.ep_group if layer.deepspeed_moe.placement.ep_size > 1 else None)


def _tensor_parallel_cases(rank: int, world_size: int, tp: int, ep_size: int) -> dict:
    from deepspeed.utils import groups

    mpu = SimpleMPU(tp)
    tp_rank = rank % tp
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(100 + rank // tp))  # same tokens in a TP group
    checked = []
    for compute in ("loop", "grouped"):
        # enable_expert_tensor_parallelism: each rank holds hidden slice tp_rank of its experts.
        ref, layer = _hmoe_pair(mpu, ep_size, expert_tp=True, compute=compute)
        assert groups._get_expert_model_parallel_world_size() == tp
        assert groups._get_expert_parallel_world_size(layer.expert_group_name) == ep_size
        for logical, weights in layer.deepspeed_moe.local_expert_weights().items():  # all-gathered: whole experts
            whole = ref.deepspeed_moe.experts.deepspeed_experts[logical]
            for name, value in weights.items():
                torch.testing.assert_close(value, getattr(whole, name).weight.detach())
        _same(_run(layer, x), _run(ref, x))
        torch.testing.assert_close(layer.deepspeed_moe.gate.wg.weight.grad, ref.deepspeed_moe.gate.wg.weight.grad,
                                   rtol=1e-4, atol=1e-6)
        whole_grads = _whole_grads(ref, layer)
        for logical, grads in _expert_grads(layer).items():
            h = SIZES[logical] // tp
            rows = slice(tp_rank * h, (tp_rank + 1) * h)
            assert grads["w1"].shape == (h, D)
            torch.testing.assert_close(grads["w1"], whole_grads[logical]["w1"][rows], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(grads["w3"], whole_grads[logical]["w3"][rows], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(grads["w2"], whole_grads[logical]["w2"][:, rows], rtol=1e-4, atol=1e-6)
        checked.append(f"expert-tp/{compute}")

    # TP > 1 without expert TP: whole experts, each duplicated assignment computed once per TP group.
    ref, layer = _hmoe_pair(mpu, ep_size, expert_tp=False, compute="loop")
    _same(_run(layer, x), _run(ref, x))
    torch.testing.assert_close(layer.deepspeed_moe.gate.wg.weight.grad, ref.deepspeed_moe.gate.wg.weight.grad,
                               rtol=1e-4, atol=1e-6)
    whole_grads = _whole_grads(ref, layer)
    # The TP ranks computed disjoint shares of the duplicated tokens: together, the whole gradient.
    for logical, grads in _expert_grads(layer, sum_over=mpu.tp_group).items():
        for name, grad in grads.items():
            torch.testing.assert_close(grad, whole_grads[logical][name], rtol=1e-4, atol=1e-6)
    checked.append("duplicate-tokens")
    return {"checked": checked}


@pytest.mark.parametrize("world_size, tp, ep_size", [(2, 2, 1), (4, 2, 2)], ids=["tp2", "tp2xep2"])
def test_expert_tensor_parallel_equals_whole_experts(world_size, tp, ep_size):
    """Unequal built-in experts split over TP (and EP x TP): same numbers as the whole layer on one rank."""
    for result in run_distributed(_tensor_parallel_cases, world_size=world_size, tp=tp, ep_size=ep_size):
        assert result["checked"] == ["expert-tp/loop", "expert-tp/grouped", "duplicate-tokens"]


def _deepspeed_under_tp(rank: int, world_size: int) -> dict:
    """HMoE with a user's experts under a TP-2 mpu, against DeepSpeed's MoE on the same tokens without TP.

    DeepSpeed's own TP path cannot be the reference here: its ``gather_tokens``
    hands gloo an ``all_gather_into_tensor`` of mismatched shapes. What it
    computes is known, though: with expert TP every TP rank runs the (here
    TP-unaware) module on every token, i.e. the layer without TP; without it
    each duplicated token is computed once per TP group.
    """
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    mpu = SimpleMPU(2)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(100))  # one TP group: the same tokens
    for expert_tp in (True, False):
        torch.manual_seed(0)
        groups.mpu = mpu
        hm = HMoE(D, _user_expert(), 4, k=2, capacity_factor=2.0, enable_expert_tensor_parallelism=expert_tp)
        hm.set_deepspeed_parallelism()
        if expert_tp:  # DeepSpeed's TestMOETensorParallel assertion (the groups persist for the second pass)
            assert groups._get_expert_model_parallel_world_size() == 2
        groups.mpu = None  # DeepSpeed's layer reads the registered mpu in every forward
        ds = MoE(D, _user_expert(), 4, k=2, capacity_factor=2.0)
        ds.set_deepspeed_parallelism()
        with torch.no_grad():
            for param in ds.parameters():
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(param.numel()))
        hm.load_state_dict(ds.state_dict(), strict=True)
        theirs = _run(ds, x)
        groups.mpu = mpu
        ours = _run(hm, x)
        for key in ("out", "aux", "x_grad"):
            torch.testing.assert_close(ours[key], theirs[key].to(ours[key].dtype), rtol=1e-4, atol=1e-6)
        assert ours["counts"].tolist() == theirs["counts"].tolist()
        ds_grads = dict(ds.named_parameters())
        for name, param in hm.named_parameters():
            grad = param.grad.clone()
            if ".deepspeed_experts." in name and not expert_tp:
                dist.all_reduce(grad, group=mpu.tp_group)  # disjoint shares of the duplicated tokens
            torch.testing.assert_close(grad, ds_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    return {"ok": True}


def test_user_experts_under_tensor_parallel_match_deepspeed_moe():
    """User modules: under expert TP every TP rank computes every token (the module does its own TP), as DeepSpeed;
    without it, each duplicated token once per TP group."""
    assert all(r["ok"] for r in run_distributed(_deepspeed_under_tp, world_size=2))


def _errors(rank: int, world_size: int) -> dict:
    mpu = SimpleMPU(2)
    with pytest.raises(ValueError, match=r"expert size\(s\) \[9\] are not multiples of 2"):
        HMoE(D, expert_sizes=[8, 9], enable_expert_tensor_parallelism=True, mpu=mpu)
    layer = HMoE(D, expert_sizes=[8, 16], enable_expert_tensor_parallelism=True, mpu=mpu)
    assert [e.w1.weight.shape[0] for e in layer.deepspeed_moe.experts.deepspeed_experts] == [4, 8]
    assert layer.deepspeed_moe.expert_params == (3 * D * 8, 3 * D * 16)  # statistics count whole experts
    # hmoe-ds's sharded checkpoints have no TP dimension: expert slices are refused, not stored as replicas.
    from hmoe_ds.shards import stored_tensors

    with pytest.raises(ValueError, match=r"split over a tensor-parallel group .*TP size 2.*engine.save_checkpoint"):
        list(stored_tensors(nn.Sequential(layer)))
    return {"ok": True}


def test_expert_tensor_parallel_errors_name_the_size_and_the_degree():
    assert all(r["ok"] for r in run_distributed(_errors, world_size=2))
