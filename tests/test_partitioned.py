"""``hmoe_ds.partitioned`` against DeepSpeed's own view of ZeRO-3 partitions (``GatheredParameters``).

Writing a parameter's full value partition by partition (no collective) must
give, once DeepSpeed gathers it, exactly that value: on a parameter whose size
does not divide the number of ranks (the last partition is padded) and on one
that does. 2 ranks (gloo). Partitions over a subgroup (experts over their
expert-data-parallel group) are covered end to end by the EP 2 x DP 2 runs of
``tests/test_zero3_scale.py``.
"""

from __future__ import annotations

import pytest
import torch

from .distributed import run_distributed


def _write_then_gather(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    import deepspeed

    from hmoe_ds.partitioned import full_shape, is_partitioned, read_local, write_full


    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.odd = torch.nn.Linear(7, 5, bias=False)  # 35 elements over 2 ranks: padded last partition
            self.sub = torch.nn.Linear(4, 3, bias=False)  # 12 over 2: no padding

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = Model()
    values = {"odd": torch.arange(35, dtype=torch.float32).reshape(5, 7), "sub": -torch.arange(12.0).reshape(3, 4)}
    out = {}
    for name, value in values.items():
        param = getattr(model, name).weight
        assert is_partitioned(param) and full_shape(param) == tuple(value.shape)
        write_full(param, value)
        local, part = read_local(param)
        assert torch.equal(local, value.reshape(-1)[part.start:part.stop])
        with deepspeed.zero.GatheredParameters([param]):
            out[name] = param.detach().clone()
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_write_full_matches_deepspeeds_gathered_value() -> None:
    results = run_distributed(_write_then_gather, world_size=2, timeout=300)
    for gathered in results:
        assert torch.equal(gathered["odd"], torch.arange(35, dtype=torch.float32).reshape(5, 7))
        assert torch.equal(gathered["sub"], -torch.arange(12.0).reshape(3, 4))


def test_unpartitioned_parameters_are_written_whole() -> None:
    from hmoe_ds.partitioned import local_slice, write_full

    param = torch.nn.Parameter(torch.zeros(2, 3))
    write_full(param, torch.ones(2, 3))
    assert torch.equal(param.data, torch.ones(2, 3))
    assert (local_slice(param).start, local_slice(param).stop) == (0, 6)
    with pytest.raises(ValueError, match=r"shape \(3, 2\)"):
        write_full(param, torch.ones(3, 2))
