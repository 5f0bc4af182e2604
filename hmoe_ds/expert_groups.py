"""DeepSpeed's expert-parallel process groups, as the layer front-ends need them at construction.

A distributed concern kept apart from the layer math: :mod:`hmoe_ds.moe_core`
never creates or queries process groups; the front-ends ask here once, when
they are built, and hand the group to the core's token exchange.
"""

from __future__ import annotations

from typing import Any

from deepspeed.utils import groups

from . import collectives


def expert_parallel_rank(ep_size: int, group_name: str, tensor_parallel_mpu: Any = None) -> int:
    """This process's rank in its expert-parallel group, creating DeepSpeed's groups if needed.

    Needed at construction time because each rank builds only the experts the
    placement gives it, and those differ in size. With ``tensor_parallel_mpu``
    (expert tensor parallelism) the groups are DeepSpeed's
    ``_create_expert_data_and_model_parallel`` ones, as ``MoE`` makes them
    with ``enable_expert_tensor_parallelism``: expert-parallel groups pair
    ranks of equal TP rank, and ``groups._get_expert_model_parallel_world_size()``
    is the TP size. Otherwise ``_create_expert_and_data_parallel`` (no TP).
    """
    if not collectives.is_distributed():
        raise ValueError(
            f"ep_size={ep_size} needs the distributed backend before the layer is built, because each "
            "rank builds only its own (unequal) experts: call deepspeed.init_distributed() first, or use ep_size=1"
        )
    world = collectives.world_size()
    if world % ep_size != 0:
        raise ValueError(f"ep_size={ep_size} must divide the world size ({world}); choose a divisor of {world}")
    if group_name not in groups._get_expert_parallel_group_dict():
        if tensor_parallel_mpu is not None:
            groups._create_expert_data_and_model_parallel(ep_size, mpu=tensor_parallel_mpu)
        else:
            groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_rank(group_name)


def expert_parallel_group(group_name: str):
    """The process group over which ``group_name``'s experts exchange tokens."""
    return groups._get_expert_parallel_group(group_name)


def expert_data_parallel_group(group_name: str):
    """The process group over which replicas of ``group_name``'s experts reduce gradients (ZeRO-3 partitions)."""
    return groups._get_expert_data_parallel_group(group_name)
