"""HMoE under DeepSpeed ZeRO-1/2 (+ CPU offload) and expert parallelism equals one plain process.

A tiny model (Linear -> HMoE -> Linear, MSE + aux loss) is trained for 10 steps
through ``deepspeed.initialize`` on 2 or 4 gloo ranks, each rank with its own
micro-batch, and compared with a single process without DeepSpeed that sees
all micro-batches and averages their losses. Per-step losses and the final
parameters (every expert, mapped back to its logical id through the
placement) must agree: losses to 1e-5 absolute, parameters to 1e-4
absolute (1% of one step's learning rate). The parameter tolerance is
wider because DeepSpeed sums gradients across ranks in a different order than
one process does, and Adam divides by sqrt(v): on a gradient that is almost
zero, a 1e-9 reduction-order difference becomes an O(lr) step difference for
that one element (seen: 1 of 1024 elements off by 4.6e-5 after 10 steps). A
bug in reduction or placement moves every element by O(lr) per step and fails
both checks; it is never a reason to loosen them.
"""

from __future__ import annotations

import pytest
import torch

from .distributed import run_distributed

D = 16
SIZES = [16, 24, 32, 40, 48, 56, 64, 72]
STEPS = 10
LR = 1e-2
PARAM_ATOL = LR / 100
EXPERT_PREFIX = "moe.deepspeed_moe.experts.deepspeed_experts."


class Toy(torch.nn.Module):
    def __init__(self, ep_size: int, routing: str, placement: str) -> None:
        super().__init__()
        from hmoe_ds import HMoE

        self.inp = torch.nn.Linear(D, D)
        self.moe = HMoE(D, SIZES, routing=routing, top_k=2, top_p=0.6, ep_size=ep_size, placement=placement,
                        p_penalty_coef=0.1, entropy_coef=0.03 if routing == "top_p" else 0.0)
        self.out = torch.nn.Linear(D, D)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, aux, _ = self.moe(self.inp(x))
        return torch.nn.functional.mse_loss(self.out(h), y) + aux


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(12, D, generator=g), torch.randn(12, D, generator=g)


def _initial_state(routing: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return Toy(1, routing, "contiguous").state_dict()


def _to_logical(state: dict[str, torch.Tensor], local_ids) -> dict[str, torch.Tensor]:
    """Rename local expert slots to logical expert ids."""
    out = {}
    for key, value in state.items():
        if key.startswith(EXPERT_PREFIX):
            slot, rest = key[len(EXPERT_PREFIX):].split(".", 1)
            key = f"{EXPERT_PREFIX}{local_ids[int(slot)]}.{rest}"
        out[key] = value
    return out


def _train_with_deepspeed(rank: int, world_size: int, ep_size: int, stage: int, offload: bool, routing: str,
                          placement: str) -> dict:
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    full = _initial_state(routing)
    model = Toy(ep_size, routing, placement)
    local_ids = model.moe.deepspeed_moe.local_expert_ids
    logical_to_slot = {logical: slot for slot, logical in enumerate(local_ids)}
    initial = {}
    for key, value in model.state_dict().items():
        if key.startswith(EXPERT_PREFIX):
            slot, rest = key[len(EXPERT_PREFIX):].split(".", 1)
            key_full = f"{EXPERT_PREFIX}{local_ids[int(slot)]}.{rest}"
            initial[key] = full[key_full]
        else:
            initial[key] = full[key]
    assert set(logical_to_slot) == set(local_ids)
    model.load_state_dict(initial, strict=True)

    zero = {"stage": stage}
    optimizer = {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}  # DeepSpeedCPUAdam (AdamW mode)
    else:
        optimizer["params"]["torch_adam"] = True
    config = {"train_micro_batch_size_per_gpu": 12, "gradient_accumulation_steps": 1, "optimizer": optimizer,
              "zero_optimization": zero, "steps_per_print": 10_000}
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "all"})
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    losses = []
    for step in range(STEPS):
        loss = engine(*_batch(rank, step))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    final = {k: v.detach().clone() for k, v in _to_logical(model.state_dict(), local_ids).items()}
    return {"losses": losses, "state": final, "local_experts": list(local_ids)}


def _train_reference(world_size: int, routing: str) -> tuple[list[list[float]], dict[str, torch.Tensor]]:
    model = Toy(1, routing, "contiguous")
    model.load_state_dict(_initial_state(routing))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    history = []
    for step in range(STEPS):
        opt.zero_grad()
        losses = [model(*_batch(r, step)) for r in range(world_size)]
        (sum(losses) / world_size).backward()
        opt.step()
        history.append([loss.item() for loss in losses])
    return history, model.state_dict()


CASES = {
    "2 ranks, EP=2, ZeRO-2 + CPU offload, Top-P, balanced": dict(world_size=2, ep_size=2, stage=2, offload=True,
                                                                 routing="top_p", placement="balanced"),
    "2 ranks, EP=2, ZeRO-1, Top-K, contiguous": dict(world_size=2, ep_size=2, stage=1, offload=False,
                                                     routing="top_k", placement="contiguous"),
    "2 ranks, EP=1, ZeRO-2, Top-P": dict(world_size=2, ep_size=1, stage=2, offload=False, routing="top_p",
                                         placement="contiguous"),
    "4 ranks, EP=2 x DP=2, ZeRO-2, Top-K, balanced": dict(world_size=4, ep_size=2, stage=2, offload=False,
                                                          routing="top_k", placement="balanced"),
}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_training_matches_single_process(case):
    spec = dict(CASES[case])
    world_size = spec.pop("world_size")
    results = run_distributed(_train_with_deepspeed, world_size=world_size, **spec)
    ref_losses, ref_state = _train_reference(world_size, spec["routing"])
    for rank, result in enumerate(results):
        for step in range(STEPS):
            assert result["losses"][step] == pytest.approx(ref_losses[step][rank], abs=1e-5), (rank, step)
        for key, value in result["state"].items():
            torch.testing.assert_close(value, ref_state[key], rtol=0, atol=PARAM_ATOL, msg=f"rank {rank}: {key}")
    held = sorted(e for r in results[: spec["ep_size"]] for e in r["local_experts"])
    assert held == list(range(len(SIZES)))
