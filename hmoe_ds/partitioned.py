"""Reading and writing parameters that ZeRO-3 may have partitioned, without gathering them.

Under ZeRO stage 3 a parameter's ``data`` is empty and each rank of the
parameter's partition group (``param.ds_process_group``: the data-parallel
group for dense weights, the expert-data-parallel group for experts) holds one
flat slice of it in ``param.ds_tensor``: rank ``i`` of ``n`` holds elements
``[i * s, (i + 1) * s)`` of the flattened parameter, ``s = ceil(numel / n)``,
the last slice zero-padded (DeepSpeed's ``_partition_param``). Everything here
works on that slice directly, so initialising a model, loading weights into it
or saving it never needs more than one full parameter in memory and no
collective at all. Unpartitioned parameters (ZeRO 0-2, or no DeepSpeed) are
the special case ``n = 1``.

This module is the one place that knows DeepSpeed's partition layout (pinned
DeepSpeed version; ``tests/test_partitioned.py`` checks it against
``GatheredParameters``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LocalSlice", "is_partitioned", "full_numel", "full_shape", "local_slice", "write_full", "read_local"]


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 parameter (its full value lives in slices across ranks)."""
    return getattr(param, "ds_tensor", None) is not None


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's logical shape, partitioned or not."""
    return tuple(getattr(param, "ds_shape", None) or param.shape)


def full_numel(param: torch.Tensor) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


@dataclass(frozen=True)
class LocalSlice:
    """This rank's part of a parameter: flat elements ``[start, stop)`` of the full parameter.

    ``stop - start`` may be shorter than the partition (the last rank's
    padding) or 0 (a rank whose partition is all padding).
    """

    start: int
    stop: int
    partition_size: int
    partition_rank: int
    partition_world: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


def local_slice(param: torch.Tensor) -> LocalSlice:
    """Where this rank's part of ``param`` lies in its flattened full value."""
    numel = full_numel(param)
    if not is_partitioned(param):
        return LocalSlice(0, numel, numel, 0, 1)
    import torch.distributed as dist

    group = param.ds_process_group
    rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
    size = int(param.ds_tensor.ds_numel)
    if size * world < numel:  # layout changed under us: refuse rather than write the wrong elements
        raise RuntimeError(f"ZeRO-3 partition of {size} x {world} ranks cannot hold {numel} elements; "
                           "unsupported DeepSpeed partition layout")
    start = min(size * rank, numel)
    return LocalSlice(start, min(start + size, numel), size, rank, world)


@torch.no_grad()
def write_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set ``param`` to ``value`` (its full logical value): this rank writes only the part it holds.

    Every rank may pass the same full ``value`` (e.g. drawn from the same
    seeded generator): no communication happens. Padding of the last
    partition is zeroed.
    """
    shape = full_shape(param)
    if tuple(value.shape) != shape:
        raise ValueError(f"value of shape {tuple(value.shape)} for a parameter of shape {shape}")
    if not is_partitioned(param):
        param.data.copy_(value.to(dtype=param.dtype, device=param.device))
        return
    part = local_slice(param)
    target = param.ds_tensor
    flat = value.reshape(-1)[part.start:part.stop]
    target.zero_()
    target.narrow(0, 0, part.numel).copy_(flat.to(dtype=target.dtype, device=target.device))


def read_local(param: torch.Tensor) -> tuple[torch.Tensor, LocalSlice]:
    """This rank's part of ``param`` as a flat tensor (no padding) and where it lies in the full value."""
    part = local_slice(param)
    if not is_partitioned(param):
        return param.data.reshape(-1), part
    return param.ds_tensor.narrow(0, 0, part.numel), part
