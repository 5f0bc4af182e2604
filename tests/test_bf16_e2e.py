"""bf16 end to end through the real entry point: ``deepspeed ... run/train.py`` with the shipped bf16 JSONs.

Two ranks, EP=2 (``placement: balanced``), ZeRO-2 (``ds_configs/zero2_bf16.json``) and ZeRO-3
(``ds_configs/zero3_bf16.json``, the packed AutoEP front-end), each against the same run with
``bf16.enabled=false``. The ZeRO-3 pair uses a wider model whose packed expert tensors have more
than 1e5 elements, above ZeRO-3's parameter-persistence threshold, so they are really partitioned.

What must hold: the bf16 runs train (the loss falls), their checkpoints hold bf16 weights, and the
loss curve follows fp32 to within ``LOSS_RTOL`` (1%) at every logged step. Why 1%: bf16 keeps 8
mantissa bits (relative rounding 2^-9 = 0.2%); the LM loss is a mean over 1,024 tokens of an fp32
cross-entropy (the router softmax, Top-P cumulative sums and auxiliary losses are fp32 too, and
DeepSpeed keeps fp32 master weights), so rounding errors average out and measured differences are
~0.01-0.1%. A real defect moves the curve by much more: the loss falls ~1 nat (15-20%) over the
run, so a bf16 run that trained one step behind, at another learning rate, or not at all, is off
by several percent within the first few logged steps.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from .launcher import EXPERIMENT, REPO, output, read_metrics, train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 16
LOSS_RTOL = 0.01


def _experiment(wide: bool) -> dict[str, Any]:
    exp = copy.deepcopy(EXPERIMENT)
    exp["model"]["moe"].update(ep_size=2, placement="balanced")
    if wide:  # packed w1 on each EP rank: [1, 896, 128] = 114,688 elements > 1e5
        exp["model"].update(hidden_size=128, dense_intermediate_size=256)
        exp["model"]["moe"]["expert_sizes"] = [256, 384, 512, 640]
    exp["run"].update(train_steps=STEPS, log_every=2, eval_every=0, eval_batches=2, eval_at_start=False,
                      save_every=STEPS)
    return exp


def _ds(name: str, bf16: bool) -> dict[str, Any]:
    """The shipped JSON, with a short warm-up so a 16-step run trains visibly, and bf16 on or off."""
    ds = json.loads((REPO / "ds_configs" / name).read_text())
    ds.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
    ds["optimizer"]["params"]["lr"] = 3e-3
    ds["scheduler"]["params"].update(warmup_max_lr=3e-3, warmup_num_steps=2)
    ds["bf16"] = {"enabled": bf16}
    ds["tensorboard"] = {"enabled": False}
    return ds


CASES = {"zero2": ("zero2_bf16.json", False), "zero3": ("zero3_bf16.json", True)}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory: pytest.TempPathFactory, data_cache) -> dict[str, Any]:
    name, wide = CASES[request.param]
    runs = {}
    for bf16 in (False, True):
        tmp = tmp_path_factory.mktemp(f"{request.param}_{'bf16' if bf16 else 'fp32'}")
        proc = train(tmp, experiment=_experiment(wide), ds=_ds(name, bf16), cache=data_cache, timeout=600)
        assert proc.returncode == 0, output(proc)
        runs["bf16" if bf16 else "fp32"] = tmp / "out"
    return {"case": request.param, **runs}


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["train/lm_loss"] for r in read_metrics(out) if "train/lm_loss" in r}


def test_bf16_loss_follows_fp32(pair: dict[str, Any]) -> None:
    fp32, bf16 = _losses(pair["fp32"]), _losses(pair["bf16"])
    assert sorted(bf16) == sorted(fp32) == list(range(2, STEPS + 1, 2))
    for step, value in fp32.items():
        assert bf16[step] == pytest.approx(value, rel=LOSS_RTOL), (pair["case"], step, bf16, fp32)
    assert bf16[STEPS] < bf16[2] - 0.3, bf16  # it trains


def test_bf16_run_holds_bf16_weights(pair: dict[str, Any]) -> None:
    saved = json.loads((pair["bf16"] / "ds_config.json").read_text())
    assert saved["bf16"]["enabled"] is True
    tag = pair["bf16"] / "checkpoints" / f"step_{STEPS}"
    # ZeRO-2: mp_rank_00_model_states.pt; ZeRO-3: zero_pp_rank_<r>_mp_rank_00_model_states.pt.
    files = sorted(p for p in tag.glob("*mp_rank_00_model_states.pt") if "expert" not in p.name)
    assert files, sorted(p.name for p in tag.iterdir())
    states = torch.load(files[0], map_location="cpu", weights_only=False)
    dtypes = {v.dtype for v in states["module"].values() if torch.is_tensor(v) and v.is_floating_point()}
    assert dtypes == {torch.bfloat16}, dtypes
    assert list(tag.glob("bf16_zero_pp_rank_*_optim_states.pt")), "no bf16 ZeRO optimizer states"
