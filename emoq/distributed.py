"""What emoq synchronises across ranks, and how it maps sharded (FSDP2 / DTensor) parameters.

Two things only (docs/distributed.md):

* :func:`reduce_loss` — the mean loss over ranks and the global skip decision, one all-reduce
  of two float64 scalars per step. Every rank then takes the same emoPulse step size.
* :class:`Layout` — the seam between the step engine, which works on plain local tensors, and
  parameters that are ``DTensor`` shards (``torch.distributed.fsdp.fully_shard``). It gives the
  engine the local shard of a parameter and of its gradient, the local shape of each state, a
  storage decision that is the same on every rank, the one collective the rules' statistics need
  (:class:`ShardSum`, the engine's ``Extent.sum_shards``: partial sums over the rows held here,
  all-reduced over the shard group), and the ``DTensor`` form of each state for ``state_dict`` /
  ``torch.distributed.checkpoint``.

A plain tensor (single process, DDP) gets a :class:`Layout` without shards: everything is the
identity and no collective runs, so the single-process path is untouched.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def reduce_loss(loss: float, finite_grads: bool, device: torch.device | None) -> tuple[float, bool]:
    """Mean ``loss`` over ranks and whether every rank's loss and gradients are finite.

    Without an initialised process group (or with one rank) this is local and free. Otherwise
    one ``all_reduce`` of two float64 scalars, so every rank takes the same step size and the
    same skip decision.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return loss, finite_grads and math.isfinite(loss)
    if dist.get_backend() == "nccl":
        if device is None or device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    elif device is None:
        device = torch.device("cpu")
    bad = 0.0 if finite_grads and math.isfinite(loss) else 1.0
    buf = torch.tensor([loss if bad == 0.0 else 0.0, bad], dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    total, bad_ranks = buf.tolist()
    return total / dist.get_world_size(), bad_ranks == 0.0


# ---------------------------------------------------------------------- sharded parameters
def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter or its gradient).

    Without importing that module (2 s of import time): no DTensor exists before it is imported.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def dtensors_exist() -> bool:
    """Whether any ``DTensor`` can exist in this process (its module is imported)."""
    return "torch.distributed.tensor" in sys.modules


def local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (shares its storage: in-place updates reach the parameter)."""
    return t.to_local() if is_dtensor(t) else t


def locals_of(tensors: Iterable[Tensor]) -> list[Tensor]:
    """:func:`local` of each tensor; without a check per tensor when no DTensor can exist (the
    optimizer step calls this for hundreds of parameters)."""
    return [local(t) for t in tensors] if dtensors_exist() else list(tensors)


class ShardSum:
    """``Extent.sum_shards`` of a parameter whose rows are split over a process group: turns
    partial sums over the rows held here into sums over all rows, with one ``all_reduce`` (every
    rank joins; an empty shard adds zeros). Compared and hashed by its group, so every parameter
    sharded over the same group shares the engine's compiled functions."""

    __slots__ = ("group", "_key")

    def __init__(self, group: Any) -> None:
        self.group = group
        self._key = getattr(group, "group_name", None) or id(group)  # unique per process group

    def __eq__(self, other: object) -> bool:
        return type(other) is ShardSum and other._key == self._key

    def __hash__(self) -> int:
        return hash((ShardSum, self._key))

    def __repr__(self) -> str:
        return f"ShardSum(group of {dist.get_world_size(self.group)})"

    def __call__(self, total: Tensor) -> Tensor:
        if total.device.type == "cpu" and dist.get_backend(self.group) == "nccl":  # FSDP2 CPU offload
            on_gpu = total.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, group=self.group)
            return on_gpu.to(total.device)
        dist.all_reduce(total, group=self.group)  # in place: the engine passes a buffer of its own
        return total


def shard_rows(rows: int, world: int) -> tuple[int, ...]:
    """Rows per rank when ``rows`` are split like ``Shard(0)`` / ``torch.chunk``: ceil-sized
    chunks, the last ones short or empty."""
    size = -(-rows // world)
    return tuple(max(0, min(size, rows - i * size)) for i in range(world))


def export_unit(row: int, block: int) -> int | None:
    """Rows per export unit of a low-bit state split by rows (``row`` elements per row): 1 when a
    row is whole blocks, ``block // row`` when a block is whole rows, else ``None`` (fp32)."""
    if row % block == 0:
        return 1
    if block % row == 0:
        return block // row
    return None


@dataclass(frozen=True)
class StatePlacement:
    """Where one state of a parameter lives: its global and local shapes, split by rows or not."""

    shape: tuple[int, ...]  # global
    local_shape: tuple[int, ...]
    per_row: bool  # dim 0 indexes the parameter's rows (split with them); else replicated


class Layout:
    """How one parameter is laid out over ranks (see the module docstring).

    Supported: plain tensors, and ``DTensor`` parameters whose placements are ``Shard(0)`` on
    at most one mesh dimension and ``Replicate()`` elsewhere (``fully_shard``, HSDP). Anything
    else (tensor parallel ``Shard(1)``, strided shards) raises ``NotImplementedError``.
    """

    def __init__(self, p: Tensor) -> None:
        self.param_shape = tuple(p.shape)
        self.mesh = None
        self.placements: tuple = ()
        self.sum_shards: ShardSum | None = None
        self.chunks: tuple[int, ...] = (self.param_shape[0],) if p.dim() else ()
        self.start = 0
        self.local_rows = self.chunks[0] if self.chunks else 0
        if not is_dtensor(p):
            return
        from torch.distributed.tensor import Replicate, Shard

        self.mesh, self.placements = p.device_mesh, tuple(p.placements)
        shard_dims = [i for i, pl in enumerate(self.placements) if type(pl) is Shard and pl.dim == 0]
        other = [pl for pl in self.placements if not isinstance(pl, Replicate) and type(pl) is not Shard]
        if other or len(shard_dims) > 1 or any(type(pl) is Shard and pl.dim != 0 for pl in self.placements):
            raise NotImplementedError(
                f"emoq supports DTensor parameters sharded on dim 0 over one mesh dimension (FSDP2 fully_shard, "
                f"HSDP); got placements {self.placements}")
        if not shard_dims or p.dim() == 0:
            return
        k = shard_dims[0]
        world, index = self.mesh.size(k), self.mesh.get_local_rank(k)
        rows = self.param_shape[0]
        self.chunks = shard_rows(rows, world)
        self.start = sum(self.chunks[:index])
        self.local_rows = self.chunks[index]
        self.sum_shards = ShardSum(self.mesh.get_group(k))
        if p.to_local().shape[0] != self.local_rows:
            raise NotImplementedError(f"unexpected shard of a parameter of shape {self.param_shape}: local "
                                      f"{tuple(p.to_local().shape)}, expected {self.local_rows} rows")

    @property
    def sharded(self) -> bool:
        return self.sum_shards is not None

    # -------------------------------------------------------------- states
    def state(self, shape: tuple[int, ...], per_row: bool) -> StatePlacement:
        """The layout of a state of global ``shape`` (``per_row``: its dim 0 follows the rows)."""
        shape = tuple(shape)
        if self.sharded and per_row:
            if not shape or shape[0] != self.param_shape[0]:
                raise ValueError(f"a per-row state of shape {shape} does not follow rows of {self.param_shape}")
            return StatePlacement(shape, (self.local_rows,) + shape[1:], True)
        return StatePlacement(shape, shape, False)

    def first_element(self, shape: tuple[int, ...], per_row: bool) -> int:
        """Flat index, in the whole state of global ``shape``, of the first element held here
        (0 unless the state is split by rows)."""
        return self.start * math.prod(shape[1:]) if self.sharded and per_row else 0

    def quantizable(self, st: StatePlacement, block: int, min_size: int) -> bool:
        """Whether a state may be stored low-bit, decided from global shapes only (so every rank agrees).

        Unsharded: ``numel >= min_size`` and a whole number of blocks (emoq.states). Split by
        rows additionally: every rank's shard is non-empty and a whole number of blocks, with
        rows a multiple of the block or blocks a multiple of rows — then the blocks of the
        shards are exactly the blocks of the unsharded state (same quantization) and the codes
        and scales can be exported as row-aligned DTensors.
        """
        numel = math.prod(st.shape)
        if numel < max(min_size, 1) or numel % block:
            return False
        if not (self.sharded and st.per_row):
            return True
        unit = export_unit(math.prod(st.shape[1:]), block)
        return unit is not None and all(c > 0 and c % unit == 0 for c in self.chunks)

    # -------------------------------------------------------------- state_dict
    def export(self, value: Any, st: StatePlacement) -> Any:
        """The ``state_dict`` form of a state: a ``DTensor`` (low-bit: codes and scales as ``DTensor``)."""
        if self.mesh is None or not isinstance(value, (Tensor, dict)):
            return value
        from torch.distributed.tensor import DTensor, Replicate

        placements = self.placements if st.per_row else tuple(Replicate() for _ in self.placements)

        def wrap(t: Tensor, shape: tuple[int, ...]) -> Tensor:
            stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
            return DTensor.from_local(t, self.mesh, placements, run_check=False, shape=torch.Size(shape),
                                      stride=stride)

        if isinstance(value, Tensor):
            return wrap(value, st.shape)
        out = dict(value, shape=torch.tensor(st.shape, dtype=torch.int64))
        codes, scale = value["codes"], value["scale"]
        if not (self.sharded and st.per_row):
            out["codes"], out["scale"] = wrap(codes, tuple(codes.shape)), wrap(scale, tuple(scale.shape))
            return out
        # row-aligned units (see quantizable): codes (units, codes per unit), scales (units, scales per unit)
        block = math.prod(st.local_shape) // scale.numel()
        unit = export_unit(math.prod(st.shape[1:]), block)
        units, local_units = st.shape[0] // unit, st.local_shape[0] // unit
        per_codes = codes.numel() // local_units
        per_scale = scale.numel() // local_units
        out["codes"] = wrap(codes.reshape(local_units, per_codes), (units, per_codes))
        out["scale"] = wrap(scale.reshape(local_units, per_scale), (units, per_scale))
        return out

    def _rows_of_lowbit(self, value: dict[str, Any], st: StatePlacement) -> Any:
        """This rank's rows of a whole low-bit state: its codes and scales where the rows start and
        end on block boundaries (bit-exact), else the dequantized rows (fp32)."""
        from emoq.states import StateStorage

        codes, scale = value["codes"].reshape(-1), value["scale"].reshape(-1)
        numel, row = math.prod(st.shape), math.prod(st.shape[1:])
        first, count = self.start * row, self.local_rows * row
        block, codes_per_element = numel // scale.numel(), codes.numel() / numel
        if first % block == 0 and count % block == 0 and count > 0:
            return dict(value, shape=list(st.local_shape),
                        codes=codes[int(first * codes_per_element):int((first + count) * codes_per_element)],
                        scale=scale[first // block:(first + count) // block])
        full = StateStorage("fp32").import_(value, signed=True, device=codes.device)
        return full[self.start:self.start + self.local_rows]

    def import_(self, value: Any, st: StatePlacement) -> Any:
        """A saved state as this rank's local value: ``DTensor`` -> local shard, a full (unsharded)
        value -> this rank's rows (a low-bit one dequantized first), anything else as it is."""
        if isinstance(value, dict):
            from emoq.states import StateStorage

            codes, scale = value["codes"], value["scale"]
            if is_dtensor(codes) or is_dtensor(scale):
                return dict(value, codes=local(codes), scale=local(scale), shape=list(st.local_shape))
            if self.sharded and st.per_row and StateStorage.saved_layout(value)[2] == st.shape != st.local_shape:
                return self._rows_of_lowbit(value, st)
            return value
        if is_dtensor(value):
            return value.to_local()
        if (isinstance(value, Tensor) and self.sharded and st.per_row and tuple(value.shape) == st.shape
                and st.shape != st.local_shape):
            return value[self.start:self.start + self.local_rows]
        return value
