"""Per-rank logical shards: the part of a checkpoint that does not depend on how the run was parallelised.

DeepSpeed's own checkpoint files restore a run exactly, but only at the same
world size, ZeRO stage and expert-parallel layout, and nothing outside
DeepSpeed can read its MoE/ZeRO-3 files (``zero_to_fp32`` refuses them). So
every rank also writes ``hmoe_shard_<rank>.safetensors``: for each parameter
slice *this rank owns* (its ZeRO partition, or its fragment of the ZeRO-1/2
optimizer partition) the fp32 master values and every optimizer-state tensor
(Adam's ``exp_avg``, ``exp_avg_sq``), flat, with an index saying which
elements of which *stored tensor* they are. No rank gathers anything: the
shards together hold the model and optimizer exactly once.

Stored tensors use logical names (:mod:`hmoe_ds.naming`): a dense parameter
under its logical name, a module-list expert's parameter under its logical
expert key (``<layer>.deepspeed_moe.experts.deepspeed_experts.<logical id>.<name>``,
``<name>`` being ``w1.weight`` ... for the built-in FFN and the user's own
parameter name for the user's expert modules), and a packed (ZeRO-3) expert
pack as ``<layer>.packed.<w>@ep<r>`` with what it holds: the built-in
experts' offsets along the packed width, or each user-expert parameter's
logical key, flat offset and shape. :class:`ShardReader` streams any
logical tensor (or its optimizer state) back, one tensor (an expert: one
pack) at a time, for export, evaluation, re-sharding and elastic resume
(:func:`load_sharded_state`: the same checkpoint into a run of another world
size, EP size or ZeRO stage, optimizer moments included).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from . import collectives
from .naming import logical_dense_key, logical_expert_key, logical_expert_param_key, moe_layers
from .partitioned import LocalSlice, full_shape, is_partitioned, local_slice, write_full

__all__ = ["SHARD_GLOB", "ShardReader", "load_sharded_state", "shard_file", "write_rank_shard"]

SHARD_GLOB = "hmoe_shard_*.safetensors"
STATE_SEP = "::"


def shard_file(rank: int) -> str:
    return f"hmoe_shard_{rank:05d}.safetensors"


# --------------------------------------------------------------------------- layout of the training model


@dataclass(frozen=True)
class StoredTensor:
    """How one training parameter is stored: its key, and for a pack, the logical experts inside it."""

    key: str
    param: torch.nn.Parameter
    pack: tuple[tuple[int, int, int], ...] | None = None  # (logical expert, offset, width) along pack_dim
    pack_dim: int = 0
    layer_prefix: str = ""
    weight: str = ""
    #: A pack of user-expert parameters: (logical key, flat offset, shape) of each parameter in it.
    members: tuple[tuple[str, int, tuple[int, ...]], ...] | None = None


def stored_tensors(model: torch.nn.Module) -> Iterator[StoredTensor]:
    """Every parameter of an ``HMoEForCausalLM`` with its stored-tensor key (tied weights once)."""
    layers = moe_layers(model)
    prefixes = [name for _, name, _ in layers]
    experts: dict[int, StoredTensor] = {}
    for _, prefix, layer in layers:
        host = layer.moe_core
        if getattr(host, "sliced_experts", None) is not None:
            # Each TP rank holds a hidden slice of every expert under the expert's one logical name; the
            # index has no TP dimension, so the slices would be taken for replicas of each other.
            raise ValueError(
                f"{prefix}: its experts are split over a tensor-parallel group (enable_expert_tensor_parallelism, "
                f"TP size {host.sliced_experts.size}); hmoe-ds's sharded checkpoints do not hold expert slices. "
                "Use DeepSpeed's own engine.save_checkpoint / load_checkpoint, which write one file per TP rank")
        container = host.experts
        if hasattr(container, "deepspeed_experts"):  # module list: the built-in FFN or the user's modules
            for slot, expert in enumerate(container.deepspeed_experts):
                logical = host.local_expert_ids[slot]
                for name, param in expert.named_parameters():
                    experts[id(param)] = StoredTensor(logical_expert_param_key(prefix, logical, name), param)
        elif hasattr(container, "members"):  # the user's modules packed flat (ZeRO-3): [1, rows, D] each
            for index, weight in enumerate(("w1", "w2", "w3")):
                members = tuple((logical_expert_param_key(prefix, host.local_expert_ids[m.slot], m.name), m.offset,
                                 m.shape) for m in container.members if m.pack == index)
                param = getattr(container, weight)
                experts[id(param)] = StoredTensor(f"{prefix}.packed.{weight}@ep{host.moe_ep_rank}", param,
                                                  layer_prefix=prefix, weight=weight, members=members)
        else:  # packed: [1, H_pack, D] (w1, w3) or [1, D, H_pack] (w2)
            offsets, offset = [], 0
            for logical, width in zip(host.local_expert_ids, container.expert_sizes):
                offsets.append((int(logical), offset, int(width)))
                offset += width
            for weight in ("w1", "w2", "w3"):
                param = getattr(container, weight)
                if param is not None:
                    # A non-gated layer's w3 placeholder (always zero) is a pack holding no expert.
                    held = () if weight == "w3" and getattr(container, "w3_is_placeholder", False) else tuple(offsets)
                    experts[id(param)] = StoredTensor(f"{prefix}.packed.{weight}@ep{host.moe_ep_rank}", param,
                                                      held, 2 if weight == "w2" else 1, prefix, weight)
    for name, param in model.named_parameters():
        yield experts.get(id(param)) or StoredTensor(logical_dense_key(name, prefixes), param)


# --------------------------------------------------------------------------- this rank's part (no collectives)


def _inner_optimizer(engine: Any) -> Any:
    optimizer = getattr(engine, "optimizer", None)
    return getattr(optimizer, "optimizer", optimizer)


def _owned(engine: Any, param: torch.nn.Parameter) -> tuple[LocalSlice, torch.Tensor, dict[str, torch.Tensor]] | None:
    """``(where, fp32 master values, optimizer states)`` of the part of ``param`` this rank owns, or None."""
    if is_partitioned(param) and getattr(param, "_z3_optimizer", None) is not None:  # ZeRO-3
        z3 = param._z3_optimizer
        part = local_slice(param)
        master = z3.get_local_fp32_param(param).narrow(0, 0, part.numel)
        group_idx = z3.grad_position[z3.get_param_id(param)][0]
        flat = z3.fp32_partitioned_groups_flat[group_idx]
        keys = [k for k, v in z3.optimizer.state.get(flat, {}).items() if torch.is_tensor(v) and v.shape == flat.shape]
        states = {k: z3.get_local_fp32_param(param, k).narrow(0, 0, part.numel) for k in keys}
        return part, master, states
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:  # ZeRO-1/2 (and DeepSpeed's bf16 optimizer): this rank's fragment
        address = mapping.lp_fragment_address
        part = LocalSlice(address.start, address.start + address.numel, address.numel, 0, 1)
        return part, mapping.get_hp_fragment(), _fragment_states(engine, mapping)
    if hasattr(param, "_hp_mapping"):
        return None  # ZeRO-1/2: another rank owns this parameter's optimizer partition
    # No ZeRO partitioning: one replica writes (rank 0 of the parameter's data-parallel replicas).
    if _replica_rank(param) != 0:
        return None
    state = (_inner_optimizer(engine).state.get(param, {}) if engine is not None else {})
    states = {k: v.reshape(-1) for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape}
    return LocalSlice(0, param.numel(), param.numel(), 0, 1), param.data.reshape(-1), states


def _fragment_states(engine: Any, mapping: Any) -> dict[str, torch.Tensor]:
    """Views of the optimizer states of a ZeRO-1/2 fragment, read from the optimizer's own state.

    DeepSpeed links fragments to their states lazily (``optim_fragment``), and not
    for every parameter group by the time a checkpoint is written, so the
    states are located here from the fragment's flat partition and address.
    """
    flat = _flat_partitions(engine)[mapping.param_group_index]
    address = mapping.hp_fragment_address
    state = _inner_optimizer(engine).state.get(flat, {})
    return {k: v.narrow(0, address.start, address.numel) for k, v in state.items()
            if torch.is_tensor(v) and v.shape == flat.shape}


def _flat_partitions(engine: Any) -> list[torch.Tensor]:
    """The fp32 flat partitions the inner optimizer steps on (ZeRO-3 sub-groups, or ZeRO-1/2 groups)."""
    optimizer = engine.optimizer
    return list(getattr(optimizer, "fp32_partitioned_groups_flat", None)
                or getattr(optimizer, "single_partition_of_fp32_groups", None)
                or getattr(optimizer, "fp32_groups_flat_partition", None) or [])


def _replica_rank(param: torch.nn.Parameter) -> int:
    if not collectives.is_distributed():
        return 0
    if getattr(param, "allreduce", True) is False:  # an expert: replicas are its expert-data-parallel group
        from deepspeed.utils import groups

        return groups._get_expert_data_parallel_rank(param.group_name)
    return collectives.rank()


def optimizer_step(engine: Any) -> int | None:
    """The optimizer's step count (Adam's bias-correction t), if it keeps one."""
    optimizer = _inner_optimizer(engine)
    for state in getattr(optimizer, "state", {}).values():
        if "step" in state:
            return int(state["step"])
    return None


def write_rank_shard(engine: Any, tag_dir: Path, rank: int) -> Path:
    """Write this rank's logical shard of ``engine`` into ``tag_dir`` (atomically); no collective."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, Any] = {}
    for stored in stored_tensors(engine.module):
        owned = _owned(engine, stored.param)
        if owned is None or owned[0].numel == 0:
            continue
        part, master, states = owned
        tensors[stored.key] = master.detach().float().cpu().contiguous()
        for name, value in states.items():
            tensors[f"{stored.key}{STATE_SEP}{name}"] = value.detach().float().cpu().contiguous()
        entry: dict[str, Any] = {"shape": list(full_shape(stored.param)), "start": part.start, "stop": part.stop,
                                 "states": sorted(states)}
        if stored.pack is not None:
            entry.update(pack=[list(p) for p in stored.pack], pack_dim=stored.pack_dim,
                         layer=stored.layer_prefix, weight=stored.weight)
        if stored.members is not None:
            entry.update(members=[[key, offset, list(shape)] for key, offset, shape in stored.members],
                         layer=stored.layer_prefix, weight=stored.weight)
        index[stored.key] = entry
    meta = {"format": "pt", "hmoe_index": json.dumps(index), "optimizer_step": json.dumps(optimizer_step(engine))}
    path = Path(tag_dir) / shard_file(rank)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- reading (streaming)


@dataclass(frozen=True)
class _Piece:
    file: Path
    start: int
    stop: int


class ShardReader:
    """Logical tensors (and their optimizer states) assembled from every rank's shard, one at a time.

    Only the indexes are read up front; :meth:`get` reads the pieces of one
    stored tensor (for an expert: the pack holding it, cached until another
    pack is needed), so peak memory is about one layer's largest tensor.
    """

    def __init__(self, tag_dir: Path) -> None:
        from safetensors import safe_open

        self.tag_dir = Path(tag_dir)
        files = sorted(self.tag_dir.glob(SHARD_GLOB))
        if not files:
            raise FileNotFoundError(f"{tag_dir}: no {SHARD_GLOB} files")
        self._pieces: dict[str, list[_Piece]] = {}
        self._entries: dict[str, dict[str, Any]] = {}
        self.optimizer_step: int | None = None
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                meta = handle.metadata() or {}
            step = json.loads(meta.get("optimizer_step", "null"))
            self.optimizer_step = step if step is not None else self.optimizer_step
            for key, entry in json.loads(meta["hmoe_index"]).items():
                self._entries.setdefault(key, entry)
                self._pieces.setdefault(key, []).append(_Piece(file, int(entry["start"]), int(entry["stop"])))
        # logical expert key -> (pack key, offset, width)
        self._in_pack: dict[str, tuple[str, int, int]] = {}
        # logical key of a user-expert parameter -> (pack key, flat offset, shape)
        self._in_flat_pack: dict[str, tuple[str, int, tuple[int, ...]]] = {}
        for key, entry in self._entries.items():
            for logical, offset, width in entry.get("pack", []):
                expert_key = logical_expert_key(entry["layer"], int(logical), entry["weight"])
                self._in_pack[expert_key] = (key, int(offset), int(width))
            for member_key, offset, shape in entry.get("members", []):
                self._in_flat_pack[member_key] = (key, int(offset), tuple(int(n) for n in shape))
        self._cache: tuple[str, str | None, torch.Tensor] | None = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{logical name: shape}`` of every logical tensor the shards hold."""
        out = {key: tuple(entry["shape"]) for key, entry in self._entries.items()
               if "pack" not in entry and "members" not in entry}
        out.update({key: shape for key, (_, _, shape) in self._in_flat_pack.items()})
        for logical_key, (pack_key, _, width) in self._in_pack.items():
            shape = self._entries[pack_key]["shape"]  # [1, H_pack, D] or [1, D, H_pack]
            out[logical_key] = (width, shape[2]) if self._entries[pack_key]["weight"] != "w2" else (shape[1], width)
        return out

    def states(self) -> list[str]:
        """Optimizer-state names saved with the weights (empty for a weights-only shard set)."""
        return sorted({s for entry in self._entries.values() for s in entry["states"]})

    def _stored(self, key: str, state: str | None) -> torch.Tensor:
        from safetensors import safe_open

        if self._cache is not None and self._cache[:2] == (key, state):
            return self._cache[2]
        entry = self._entries[key]
        numel = 1
        for n in entry["shape"]:
            numel *= int(n)
        flat = torch.zeros(numel, dtype=torch.float32)
        covered = 0
        tensor_key = key if state is None else f"{key}{STATE_SEP}{state}"
        for piece in self._pieces[key]:
            with safe_open(str(piece.file), framework="pt") as handle:
                flat[piece.start:piece.stop] = handle.get_tensor(tensor_key)
            covered += piece.stop - piece.start
        if covered != numel:
            raise ValueError(f"{self.tag_dir}: the shards hold {covered} of the {numel} elements of {key}; "
                             "a shard file is missing")
        value = flat.reshape(entry["shape"])
        self._cache = (key, state, value)
        return value

    def get(self, name: str, state: str | None = None) -> torch.Tensor:
        """The full fp32 logical tensor ``name`` (or its optimizer state ``state``)."""
        if name in self._in_pack:
            pack_key, offset, width = self._in_pack[name]
            pack = self._stored(pack_key, state)[0]
            dim = 1 if self._entries[pack_key]["weight"] == "w2" else 0
            return pack.narrow(dim, offset, width).clone()
        if name in self._in_flat_pack:
            pack_key, offset, shape = self._in_flat_pack[name]
            numel = 1
            for n in shape:
                numel *= n
            return self._stored(pack_key, state).reshape(-1).narrow(0, offset, numel).view(shape).clone()
        if name not in self._entries:
            raise KeyError(f"{self.tag_dir}: the shards hold no tensor {name!r}")
        return self._stored(name, state)


# --------------------------------------------------------------------------- loading into another layout


def _full_value(stored: StoredTensor, reader: ShardReader, state: str | None) -> torch.Tensor:
    """The full value ``stored`` must take in *this* model's layout, from logical tensors."""
    if stored.members is not None:
        flat = torch.zeros(full_shape(stored.param), dtype=torch.float32).reshape(-1)  # padding stays zero
        for key, offset, shape in stored.members:
            value = reader.get(key, state)
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"{key}: the shards hold shape {tuple(value.shape)}, this model's expert has "
                                 f"{tuple(shape)}")
            flat.narrow(0, offset, value.numel()).copy_(value.reshape(-1))
        return flat.reshape(full_shape(stored.param))
    if stored.pack is None:
        return reader.get(stored.key, state)
    shape = full_shape(stored.param)
    dim = stored.pack_dim - 1
    value = torch.zeros(shape[1:], dtype=torch.float32)
    for logical, offset, width in stored.pack:
        value.narrow(dim, offset, width).copy_(
            reader.get(logical_expert_key(stored.layer_prefix, logical, stored.weight), state))
    return value.unsqueeze(0)


def _create_optimizer_states(engine: Any, names: list[str]) -> None:
    """Zero optimizer states for every flat fp32 partition, as the first step would create them."""
    inner = _inner_optimizer(engine)
    for flat in _flat_partitions(engine):
        state = inner.state.setdefault(flat, {})
        for name in names:
            state.setdefault(name, torch.zeros_like(flat))


def _set_step(engine: Any, step: int) -> None:
    inner = _inner_optimizer(engine)
    as_tensor = type(inner).__module__.startswith("torch.optim")
    for state in inner.state.values():
        state["step"] = torch.tensor(float(step)) if as_tensor else step


@torch.no_grad()
def load_sharded_state(engine: Any, reader: ShardReader, *, optimizer: bool = True) -> None:
    """Load logical shards into a freshly built engine of any world size, EP size, placement or ZeRO stage.

    Every rank writes only its own part (module weights, fp32 master values,
    and with ``optimizer`` the optimizer states and step count); no collective
    is needed, except ZeRO-1/2's broadcast of the updated low-precision
    weights, which the module copy here makes unnecessary.
    """
    names = reader.states() if optimizer else []
    if names:
        _create_optimizer_states(engine, names)
    for stored in stored_tensors(engine.module):
        param = stored.param
        value = _full_value(stored, reader, None)
        write_full(param, value)  # the module's (possibly partitioned, low-precision) copy
        z3 = getattr(param, "_z3_optimizer", None) if is_partitioned(param) else None
        mapping = getattr(param, "_hp_mapping", None)
        if z3 is None and mapping is None and hasattr(param, "_hp_mapping"):
            continue  # ZeRO-1/2: another rank owns this parameter's optimizer partition
        for state in [None, *names]:
            target = value if state is None else _full_value(stored, reader, state)
            if z3 is not None:
                # Not DeepSpeed's set_full_hp_param: it cannot set the last rank's padded partition.
                partition, _ = z3._get_fp32_opt_state_partition(param, False, state)
                part = local_slice(param)
                partition.zero_()
                partition.narrow(0, 0, part.numel).copy_(target.reshape(-1)[part.start:part.stop])
            elif mapping is not None:
                address = mapping.lp_fragment_address
                fragment = mapping.get_hp_fragment() if state is None else _fragment_states(engine, mapping)[state]
                fragment.copy_(target.reshape(-1).narrow(0, address.start, address.numel))
            elif state is not None:  # no ZeRO partitioning: the optimizer steps the module parameter itself
                inner_state = _inner_optimizer(engine).state.setdefault(param, {})
                inner_state[state] = target.reshape(param.shape).to(param.device).clone()
    if optimizer and reader.optimizer_step is not None:
        _set_step(engine, reader.optimizer_step)
