"""Storage policy for optimizer states: one place decides how a state tensor is kept.

The update rules (``emoq/optim/*.py``) only ever see plain fp32 working tensors. This module
turns a stored state into such a working tensor (``load``), writes the result back
(``store``), and converts states to and from plain tensors for checkpoints
(``export`` / ``import_``).

Precisions:

- ``"fp32"``: the state is the working tensor itself, updated in place.
- ``"bf16"``: kept in bfloat16, updated in fp32, rounded back to nearest.
- ``"8bit"``: torchao ``OptimState8bit`` (dynamic-tree map, blocks of 256, one fp32 scale per
  block: 1 + 4/256 = 1.0156 B/element).
- ``"4bit"``: torchao ``OptimState4bit`` (blocks of 128: 0.5 + 4/128 = 0.5313 B/element).
- ``"fp8"``: torchao ``OptimStateFp8`` (e4m3, blocks of 256: 1.0156 B/element).

Low-bit specifics (docs/precision.md):

- A state marked ``signed=False`` (a second moment, something that ends in a denominator) is
  stored as its square root, on a map without zero: the smallest code of the 8-bit unsigned
  map is the smallest positive value instead of 0, torchao's 4-bit unsigned map has no zero,
  and an fp8 zero dequantizes to the smallest positive subnormal of its block. A stored
  second moment therefore never dequantizes to 0.
- Tensors with fewer than ``min_lowbit_size`` elements, or whose size is not a multiple of the
  block size, keep fp32 states (the "small-tensor fallback").
- Signed 4-bit states are rounded stochastically by the step (``STOCHASTIC``,
  :func:`round_stochastic`), with a counter-based hash dither (:func:`dither`) instead of a
  random generator; every other store rounds to the nearest code.

Block scaling, maps and packing are torchao's (``torchao.optim.quant_utils`` and
``subclass_fp8``); this module chooses the maps, rounds and moves bytes. The functions on plain
parts (``dequantize_parts``, ``quantize_parts_``) are what the step functions in
:mod:`emoq.kernels` compile.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from emoq.arith import sqrt

PRECISIONS = ("fp32", "bf16", "8bit", "4bit", "fp8")
LOWBIT = ("8bit", "4bit", "fp8")
IMPLEMENTED = PRECISIONS
BLOCK_SIZE = {"8bit": 256, "4bit": 128, "fp8": 256}
DEFAULT_MIN_LOWBIT_SIZE = 4096
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
FP8_TINY = 2.0 ** -9  # smallest positive e4m3fn subnormal
FP32_MAX = float(torch.finfo(torch.float32).max)
BF16_MAX = float(torch.finfo(torch.bfloat16).max)

_QMAPS: dict[tuple[str, bool], tuple[float, ...]] = {}


def qmap(precision: str, signed: bool) -> tuple[float, ...]:
    """The code -> value map of a low-bit precision (``()`` for fp8, which has none).

    8-bit: torchao's dynamic-tree maps; the unsigned one has its 0 replaced by half its smallest
    positive value (zero-free). 4-bit: torchao's maps (the unsigned one is linear without zero).
    """
    key = (precision, signed)
    if key not in _QMAPS:
        if precision == "8bit":
            from torchao.optim.subclass_8bit import get_qmap_signed, get_qmap_unsigned

            values = list(get_qmap_signed() if signed else get_qmap_unsigned())
            if not signed:
                assert values[0] == 0.0
                values[0] = values[1] / 2  # zero-free: the smallest code stays positive
        elif precision == "4bit":
            from torchao.optim.subclass_4bit import get_qmap_signed, get_qmap_unsigned

            values = list(get_qmap_signed() if signed else get_qmap_unsigned())
            assert signed or min(values) > 0
        else:
            values = []
        _QMAPS[key] = tuple(values)
    return _QMAPS[key]


# ---------------------------------------------------------------------- fast encoding
def encode_table(values: tuple[float, ...], device: torch.device | str = "cpu") -> Tensor | None:
    """One lookup table that rounds to the nearest code of a map in one load instead of a binary search.

    The input (scaled to [-1, 1]) is bucketed by its top 16 bits (its bfloat16 pattern). Each
    bucket holds at most one rounding threshold of the map (checked here; ``None`` otherwise, and
    the caller uses torchao's search). The int32 entry of a bucket packs the code of its smallest
    value (bits 0-7), the low 16 bits of its threshold (bits 8-23; its top 16 bits are the
    bucket's) and whether it has one (bit 24). The code is that code plus one when ``x`` is at or
    above the threshold, decided on the low 16 bits (reversed for negative ``x``), which is
    exactly ``x >= threshold``. Thresholds are torchao's (``down + (up - down) * 0.5``), so the
    codes are those of ``quantize_8bit_with_qmap`` / ``quantize_4bit_with_qmap`` except within
    one fp32 rounding of a threshold (3 of 16.7 M measured).
    """
    q = torch.tensor(values, dtype=torch.float32)
    down, up = q[:-1], q[1:]
    mids = down + (up - down) * 0.5
    lo_bits = torch.arange(65536, dtype=torch.int32) << 16
    a, c = lo_bits.view(torch.float32), (lo_bits | 0xFFFF).view(torch.float32)
    vmin, vmax = torch.minimum(a, c), torch.maximum(a, c)
    first = torch.searchsorted(mids, vmin, right=True)
    inside = torch.searchsorted(mids, vmax, right=True) - first
    if not bool(((vmin.abs() > 1.0) | torch.isnan(vmin) | (inside <= 1)).all()):
        return None
    has = inside >= 1
    threshold = mids[first.clamp(max=len(mids) - 1)].view(torch.int32)
    table = first.to(torch.int32) | ((threshold & 0xFFFF) << 8) | (has.to(torch.int32) << 24)
    return table.to(device)


def encode(x: Tensor, table: Tensor) -> Tensor:
    """Nearest codes (uint8) of ``x`` (fp32, scaled to [-1, 1]) with :func:`encode_table`."""
    bits = x.view(torch.int32)
    entry = table[(bits >> 16) & 0xFFFF]
    low, threshold = bits & 0xFFFF, (entry >> 8) & 0xFFFF
    up = torch.where(bits < 0, low <= threshold, low >= threshold) & (entry >= (1 << 24))
    return ((entry & 0xFF) + up.to(torch.int32)).to(torch.uint8)


# ---------------------------------------------------------------------- stochastic rounding
STOCHASTIC: frozenset[tuple[str, bool]] = frozenset({("4bit", True)})
"""``(precision, signed)`` of the states the step rounds stochastically (docs/precision.md)."""

_MASK32 = 0xFFFFFFFF


def rounds_stochastically(precision: str, signed: bool) -> bool:
    """Whether the step stores a state of this precision and sign with :func:`round_stochastic`
    (signed 4-bit states: a nearest 4-bit code flips the sign of small momentum blends)."""
    return (precision, bool(signed)) in STOCHASTIC


def _mul32(h: Tensor, c: int) -> Tensor:
    """``h * c mod 2**32`` for int64 ``h`` in [0, 2**32) without int64 overflow: a constant
    ``c >= 2**31`` is used as ``c - 2**32`` (same residue, ``|c| < 2**31``)."""
    return (h * (c - (1 << 32) if c >= 1 << 31 else c)) & _MASK32


def mix32(h: Tensor) -> Tensor:
    """murmur3's 32-bit finalizer (a bijection of [0, 2**32)) on an int64 tensor of 32-bit values.

    Integer ops only (exact, the same eager and compiled)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def dither_seed(step: float | Tensor, which: int) -> Tensor:
    """The int64 0-dim seed of state number ``which`` at optimizer step ``step`` (a Python number,
    or the fp32 step scalar of a compiled call; below ``emoq.arith.STEP_PERIOD``, so exact either way)."""
    s = step.to(torch.int64) if isinstance(step, Tensor) else torch.tensor(int(step), dtype=torch.int64)
    return mix32((s * 16 + (which & 15) + 1) & _MASK32)


def dither(index: Tensor, seed: Tensor) -> Tensor:
    """Uniform fp32 values in [0, 1) (multiples of 2**-24), one per element ``index`` (int64): a
    counter-based hash of (index, seed), so no random generator is read or advanced."""
    h = mix32((index & _MASK32) ^ seed)
    if index.numel() > _MASK32:  # indices beyond 32 bits: mix the high word in too
        h = mix32(h ^ (index >> 32))
    return (h >> 8).to(torch.float32) * 2.0 ** -24


def floor_codes(x: Tensor, qmap_t: Tensor) -> Tensor:
    """The code of the largest map value ``<= x`` (int64; code 0 below the map), by a branchless
    binary search over the sorted map (16 entries at 4 bits: four lookups)."""
    half = 1 << (qmap_t.numel().bit_length() - 2)
    codes = torch.where(x >= qmap_t[half], half, 0)
    half //= 2
    while half:
        codes = codes + torch.where(x >= qmap_t[codes + half], half, 0)
        half //= 2
    return codes


def round_stochastic(x: Tensor, qmap_t: Tensor, u: Tensor) -> Tensor:
    """Codes (uint8) of ``x`` (scaled to the map's range) rounded stochastically: the neighbouring
    code below ``x`` or the one above, up with probability ``(x - down) / (up - down)`` decided by
    ``u < that`` (``u`` uniform in [0, 1), e.g. :func:`dither`), so ``E[value] = x`` within the
    map's range. Outside it the end code (as nearest rounding)."""
    down = floor_codes(x, qmap_t)
    up = (down + 1).clamp(max=qmap_t.numel() - 1)
    lo, hi = qmap_t[down], qmap_t[up]
    # 0/0 = NaN at the top code and a negative ratio below the map: never rounded up
    return torch.where(u < (x - lo) / (hi - lo), up, down).to(torch.uint8)


# ---------------------------------------------------------------------- plain-part kernels
def scale_8bit(signed: bool, peak: Tensor) -> Tensor:
    """The block scales of an 8-bit state from the per-block peaks :func:`quantize_8bit` returns: torchao's
    ``scale_tensor`` scale, the largest ``|x|`` of the block at least 1e-12 (NaN if the block holds one).
    Unsigned states store ``sqrt(v)``; their peak is the largest ``v``, and ``sqrt(max v) = max sqrt(v)``
    exactly (a correctly rounded square root is monotone), one square root per block instead of one
    per element."""
    return (peak if signed else sqrt(peak)).clamp_min(1e-12)


def dequantize_parts(precision: str, signed: bool, codes: Tensor, scale: Tensor, qmap_t: Tensor | None,
                     numel: int) -> Tensor:
    """fp32 values (flat, ``numel`` long) of a low-bit state given as plain tensors.

    Unsigned states are stored as a square root: the square is returned.
    """
    from torchao.optim.quant_utils import dequant_with_qmap

    if precision == "8bit":
        x = dequant_with_qmap(codes.view(-1), qmap_t, scale).view(-1)
    elif precision == "4bit":
        unpacked = torch.stack([codes >> 4, codes & 0b1111], dim=-1).view(-1)
        x = dequant_with_qmap(unpacked, qmap_t, scale).view(-1)
    else:
        blocks = codes.view(scale.numel(), -1).float()
        if not signed:  # zero-free: an fp8 zero reads as the smallest positive subnormal
            blocks = blocks.clamp_min(FP8_TINY)
        x = (blocks * scale.view(-1, 1)).view(-1)
    return x.square() if not signed else x


def quantize_8bit(signed: bool, x: Tensor, blocks: int, qmap_t: Tensor, table: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    """``(codes, peak)`` of the fp32 values ``x`` as an 8-bit state of ``blocks`` blocks: codes ``(blocks,
    block)`` uint8 (unsigned: of ``sqrt(x)``) and the per-block peaks ``(blocks, 1)`` that
    :func:`scale_8bit` turns into the scales. The 8-bit part of :func:`quantize_parts_`, with the
    scales left to the caller: a compiled step returns the peaks (each block's reduction writes
    its peak directly) and its blocks are then read once for both the peak and the codes."""
    from torchao.optim.quant_utils import quantize_8bit_with_qmap

    x = x.reshape(blocks, -1)
    if signed:
        x = x.clamp(-FP32_MAX, FP32_MAX)
        peak = x.abs().amax(-1, keepdim=True)
    else:
        x = x.clamp(0.0, FP32_MAX)
        peak = x.amax(-1, keepdim=True)
        x = sqrt(x)
    scaled = x / scale_8bit(signed, peak)
    return (quantize_8bit_with_qmap(scaled, qmap_t) if table is None else encode(scaled, table)), peak


def quantize_parts_(precision: str, signed: bool, codes: Tensor, scale: Tensor, qmap_t: Tensor | None,
                    x: Tensor, table: Tensor | None = None, u: Tensor | None = None) -> None:
    """Quantize the fp32 values ``x`` into ``codes``/``scale`` in place (unsigned: stores sqrt).

    ``table`` (from :func:`encode_table`) replaces torchao's binary search by one lookup.
    ``u`` (4-bit only: one uniform value in [0, 1) per element, e.g. :func:`dither`) rounds
    stochastically (:func:`round_stochastic`) instead of to the nearest code.
    Saturating: an inf is stored as the largest fp32 value, so a block scale is always finite
    and every code dequantizes to a finite value (squared, for unsigned states).
    """
    from torchao.optim.quant_utils import quantize_4bit_with_qmap, scale_tensor

    if precision == "8bit":
        q, peak = quantize_8bit(signed, x, scale.numel(), qmap_t, table)
        codes.view(q.shape).copy_(q)
        scale.view(peak.shape).copy_(scale_8bit(signed, peak))
        return
    x = x.reshape(-1)
    x = sqrt(x.clamp(0.0, FP32_MAX)) if not signed else x.clamp(-FP32_MAX, FP32_MAX)
    block = x.numel() // scale.numel()
    if precision == "4bit":
        scaled, s = scale_tensor(x, block)
        if u is not None:
            q = round_stochastic(scaled, qmap_t, u.reshape(-1))
        else:
            q = quantize_4bit_with_qmap(scaled, qmap_t) if table is None else encode(scaled, table)
        codes.copy_((q[::2] << 4) | q[1::2])
    else:
        from torchao.optim.subclass_fp8 import quantize_fp8

        q, s = quantize_fp8(x, block)
        codes.view(-1).copy_(q.view(-1))
    scale.copy_(s)


def parts(state: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(codes, scale, qmap)`` of a torchao low-bit state (qmap ``None`` for fp8)."""
    return state.codes, state.scale, getattr(state, "qmap", None)


def precision_of(state: Any) -> str:
    """The precision a stored state is kept in."""
    name = type(state).__name__
    if name == "OptimState8bit":
        return "8bit"
    if name == "OptimState4bit":
        return "4bit"
    if name == "OptimStateFp8":
        return "fp8"
    return "bf16" if state.dtype == torch.bfloat16 else "fp32"


def is_lowbit(state: Any) -> bool:
    return precision_of(state) in LOWBIT


def state_bytes(state: Any) -> int:
    """Bytes a stored state occupies (codes + scales; the shared qmap counted once per state)."""
    if is_lowbit(state):
        c, s, q = parts(state)
        return c.numel() * c.element_size() + s.numel() * s.element_size() + (
            0 if q is None else q.numel() * q.element_size())
    return state.numel() * state.element_size()


def slice_kernel_args(precision: str, args: list[Tensor], lo: int, hi: int) -> list[Tensor]:
    """Views of elements ``[lo, hi)`` of a state's :meth:`StateStorage.kernel_args` (``lo``, ``hi``
    whole quantization blocks apart for a low-bit state; written through in place)."""
    if precision not in LOWBIT:
        return [args[0].view(-1)[lo:hi]]
    block = BLOCK_SIZE[precision]
    per_byte = 2 if precision == "4bit" else 1  # 4-bit codes are packed two to a byte
    return [args[0][lo // per_byte:hi // per_byte], args[1][lo // block:hi // block], *args[2:]]


class StateStorage:
    """How optimizer states are kept for one optimizer.

    Args:
        precision: ``"fp32"``, ``"bf16"``, ``"8bit"``, ``"4bit"`` or ``"fp8"`` (module doc).
        min_lowbit_size: states of tensors with fewer elements than this keep fp32 (low-bit
            precisions only; default 4096, like bitsandbytes' ``min_8bit_size``). A tensor
            whose size is not a multiple of the block size (256; 128 for 4-bit) keeps fp32 too.
    """

    def __init__(self, precision: str = "fp32", min_lowbit_size: int = DEFAULT_MIN_LOWBIT_SIZE) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"state_precision must be one of {PRECISIONS}, got {precision!r}")
        if isinstance(min_lowbit_size, bool) or not isinstance(min_lowbit_size, int) or min_lowbit_size < 0:
            raise ValueError(f"min_lowbit_size must be an int >= 0, got {min_lowbit_size!r}")
        self.precision = precision
        self.min_lowbit_size = min_lowbit_size
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self._qmap_tensors: dict[tuple[bool, torch.device], Tensor] = {}
        self._tables: dict[tuple[bool, torch.device], Tensor | None] = {}

    # -------------------------------------------------------------- allocation
    def uses_lowbit(self, numel: int) -> bool:
        """Whether a state of ``numel`` elements is quantized (else it is fp32 / bf16)."""
        if self.precision not in LOWBIT:
            return False
        block = BLOCK_SIZE[self.precision]
        return numel >= max(self.min_lowbit_size, 1) and numel % block == 0

    def _qmap_tensor(self, signed: bool, device: torch.device) -> Tensor:
        key = (signed, torch.device(device))
        if key not in self._qmap_tensors:  # one map per optimizer, shared by all its states
            self._qmap_tensors[key] = torch.tensor(qmap(self.precision, signed), dtype=torch.float32,
                                                   device=device)
        return self._qmap_tensors[key]

    def table(self, signed: bool, device: torch.device) -> Tensor | None:
        """Fast-encoding table of this precision's map (shared by all states; 256 KB)."""
        key = (signed, torch.device(device))
        if key not in self._tables:
            self._tables[key] = (encode_table(qmap(self.precision, signed), device)
                                 if self.precision in ("8bit", "4bit") else None)
        return self._tables[key]

    def kernel_args(self, state: Tensor) -> list[Tensor]:
        """The plain tensors a step function needs for ``state`` (see :mod:`emoq.kernels`)."""
        if not is_lowbit(state):
            return [state]
        codes, scale, q = parts(state)
        if q is None:
            return [codes.view(-1), scale]
        table = self.table(state.signed, codes.device)
        return [codes.view(-1), scale, q] + ([] if table is None else [table])

    def stack(self, states: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """One buffer holding the values of ``states`` (same shape and precision) stacked along a
        new leading dim: returns its kernel parts and, per input, a state that is a view of it
        (same type and values), to be stored in place of the input."""
        first = states[0]
        if not is_lowbit(first):
            stacked = torch.stack(states)
            return [stacked], list(stacked.unbind(0))
        prec = precision_of(first)
        codes = torch.stack([parts(st)[0] for st in states])
        scale = torch.stack([parts(st)[1] for st in states])
        views: list[Tensor] = []
        for k, st in enumerate(states):
            if prec == "8bit":
                from torchao.optim.subclass_8bit import OptimState8bit

                views.append(OptimState8bit(codes[k], scale[k], st.qmap, st.signed))
            elif prec == "4bit":
                from torchao.optim.subclass_4bit import OptimState4bit

                views.append(OptimState4bit(codes[k], scale[k], st.qmap, st.signed, tuple(st.shape)))
            else:
                from torchao.optim.subclass_fp8 import OptimStateFp8

                view = OptimStateFp8(codes[k], scale[k])
                view.signed = st.signed
                views.append(view)
        q = getattr(first, "qmap", None)
        kparts = [codes.view(-1), scale.view(-1)]
        if q is not None:
            table = self.table(first.signed, codes.device)
            kparts += [q] + ([] if table is None else [table])
        return kparts, views

    @property
    def block(self) -> int | None:
        """Elements per quantization block (``None`` for fp32 / bf16)."""
        return BLOCK_SIZE.get(self.precision)

    def zeros(self, shape: torch.Size | tuple[int, ...], *, signed: bool, device: torch.device,
              quantize: bool | None = None) -> Tensor:
        """A new zero state. ``signed=False`` marks a state that is never negative.

        ``quantize`` overrides the size rule (:meth:`uses_lowbit`) where the caller decided it,
        e.g. for a shard from the shape of the whole tensor (emoq.distributed); it has no effect
        at fp32 / bf16.
        """
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        lowbit = self.uses_lowbit(numel) if quantize is None else (bool(quantize) and self.precision in LOWBIT)
        if not lowbit:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
            return torch.zeros(shape, dtype=dtype, device=device)
        block = BLOCK_SIZE[self.precision]
        if self.precision == "8bit":
            from torchao.optim.subclass_8bit import OptimState8bit

            codes = torch.zeros(shape, dtype=torch.uint8, device=device)
            state = OptimState8bit(codes, torch.zeros(numel // block, device=device),
                                   self._qmap_tensor(signed, device), signed)
        elif self.precision == "4bit":
            from torchao.optim.subclass_4bit import OptimState4bit

            codes = torch.zeros(numel // 2, dtype=torch.uint8, device=device)
            state = OptimState4bit(codes, torch.zeros(numel // block, device=device),
                                   self._qmap_tensor(signed, device), signed, shape)
        else:
            from torchao.optim.subclass_fp8 import OptimStateFp8

            state = OptimStateFp8(torch.zeros(shape, dtype=FP8, device=device),
                                  torch.zeros(numel // block, device=device))
            state.signed = signed  # fp8 has no map; remember how to read it
        if not signed and numel:  # sqrt storage of 0: every block holds the codes and scale of one block of zeros
            codes, scale, qmap_t = parts(state)
            one = codes.view(-1)[: codes.numel() // scale.numel()].clone()
            one_scale = scale[:1].clone()
            quantize_parts_(self.precision, signed, one, one_scale, qmap_t, torch.zeros(block, device=device))
            codes.view(scale.numel(), -1).copy_(one.view(1, -1))
            scale.fill_(one_scale.item())
        return state

    # -------------------------------------------------------------- working copies
    def load(self, state: Tensor) -> Tensor:
        """The fp32 working tensor for ``state`` (the state itself when it is fp32)."""
        if is_lowbit(state):
            return dequantize_parts(precision_of(state), state.signed, *parts(state),
                                    state.numel()).view(state.shape)
        return state if state.dtype == torch.float32 else state.float()

    def store(self, state: Tensor, work: Tensor) -> None:
        """Write the updated working tensor back into ``state``."""
        if is_lowbit(state):
            quantize_parts_(precision_of(state), state.signed, *parts(state), work,
                            self.table(state.signed, work.device))
        elif work is not state:
            state.copy_(work)

    # -------------------------------------------------------------- checkpoints
    def export(self, state: Tensor) -> Tensor | dict[str, Tensor]:
        """A plain value for ``state_dict()`` (loadable with ``torch.load(weights_only=True)``).

        fp32/bf16 states are returned as they are. A low-bit state is exported as its own
        bytes, tensors only (same size as in memory): ``codes`` (uint8; fp8 codes as their
        bytes), ``scale`` (fp32), ``precision`` (0-dim int8: the index in ``LOWBIT``, i.e.
        0 8bit, 1 4bit, 2 fp8), ``signed`` (0-dim bool) and ``shape`` (int64). The map follows
        from precision and sign. Tensors only, and no float8: ``torch.distributed.checkpoint``
        loads tensors in place but writes other values nested under an optimizer's integer
        state keys back under string keys, its flattened optimizer format takes tensors only,
        and gloo cannot gather float8 (torch 2.13).
        """
        if not is_lowbit(state):
            return state
        codes, scale, _ = parts(state)
        return {"codes": codes.detach().view(torch.uint8).clone(), "scale": scale.detach().clone(),
                "precision": torch.tensor(LOWBIT.index(precision_of(state)), dtype=torch.int8),
                "signed": torch.tensor(bool(state.signed)), "shape": torch.tensor(list(state.shape), dtype=torch.int64)}

    @staticmethod
    def saved_layout(value: dict[str, Any]) -> tuple[str, bool, tuple[int, ...]]:
        """``(precision, signed, shape)`` of an exported low-bit state (this format, or emoq 0.1's:
        precision, sign and shape as Python values, fp8 codes as float8). ``ValueError`` if malformed."""
        prec, signed, shape = value["precision"], value["signed"], value["shape"]
        if isinstance(prec, Tensor) and prec.numel() == 1 and not prec.is_floating_point() and prec.dtype != torch.bool:
            index = int(prec.item())
            prec = LOWBIT[index] if 0 <= index < len(LOWBIT) else f"index {index}"
        if isinstance(signed, Tensor) and signed.numel() == 1 and signed.dtype == torch.bool:
            signed = bool(signed.item())
        if isinstance(shape, Tensor) and shape.dim() == 1 and shape.dtype == torch.int64:
            shape = shape.tolist()
        if not (isinstance(prec, str) and prec in LOWBIT):
            raise ValueError(f"unknown precision {prec!r} (known: {', '.join(LOWBIT)})")
        if not isinstance(signed, bool):
            raise ValueError(f"a malformed sign {signed!r}")
        if not (isinstance(shape, (list, tuple)) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise ValueError(f"a malformed shape {shape!r}")
        return prec, signed, tuple(shape)

    def import_(self, value: Tensor | dict[str, Any], *, signed: bool, device: torch.device,
                quantize: bool | None = None) -> Tensor:
        """A stored state built from a checkpoint value saved at any supported precision.

        Same precision and sign: the codes are copied (bit-exact resume; codes and scales may
        come in any shape with the right number of elements, e.g. the row-aligned layout of a
        sharded checkpoint). Otherwise the saved value is dequantized to fp32 and re-stored at
        this storage's precision. ``quantize`` as in :meth:`zeros`.
        """
        if isinstance(value, dict):
            prec, vsigned, shape = self.saved_layout(value)
            numel = math.prod(shape)
            lowbit = self.uses_lowbit(numel) if quantize is None else bool(quantize)
            if prec == self.precision and vsigned == signed and lowbit:
                state = self.zeros(shape, signed=signed, device=device, quantize=True)
                c, s, _ = parts(state)
                if c.numel() == value["codes"].numel() and s.numel() == value["scale"].numel():
                    c.view(torch.uint8).copy_(value["codes"].to(device).view(torch.uint8).reshape(c.shape))
                    s.copy_(value["scale"].to(device).reshape(s.shape))
                    return state
            q = torch.tensor(qmap(prec, vsigned), dtype=torch.float32, device=device) if prec != "fp8" else None
            codes = value["codes"].to(device).reshape(-1)
            codes = codes.view(FP8) if prec == "fp8" else codes
            full = dequantize_parts(prec, vsigned, codes, value["scale"].to(device).reshape(-1), q, numel)
            value = full.view(shape)
        value = value.detach().to(device=device)
        state = self.zeros(value.shape, signed=signed, device=device, quantize=quantize)
        if is_lowbit(state):
            self.store(state, value.float())
        else:  # saturate: an fp32 value above bf16's largest would round to inf
            state.copy_(value.clamp(-BF16_MAX, BF16_MAX) if state.dtype == torch.bfloat16 else value)
        return state


def check_saved_state(value: Any, shape: tuple[int, ...], signed: bool, plain_only: bool = False) -> str | None:
    """Why a saved state value (as :meth:`StateStorage.export` writes it) cannot be a state of
    ``shape``, as words to follow "state 'v' of parameter 3"; ``None`` if it can.

    Checks the shape, the dtype, the layout of a low-bit value (codes and scales of the right
    size, the sign the state is stored with) and that every value is finite. Low-bit values of
    emoq 0.1 (precision, sign and shape as Python values, fp8 codes as float8) pass too.
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(value, Tensor):
        if tuple(value.shape) != shape:
            return f"has shape {tuple(value.shape)}, expected {shape}"
        if not value.is_floating_point():
            return f"has dtype {value.dtype}, expected a floating-point tensor"
        if value.numel() and not bool(torch.isfinite(value).all()):
            return "holds NaN or inf"
        return None
    keys = {"precision", "signed", "shape", "codes", "scale"}
    if plain_only or not isinstance(value, dict) or set(value) != keys:
        return "is neither a tensor nor a saved low-bit state " + ("" if plain_only else f"(a dict of {sorted(keys)})")
    try:
        prec, saved_signed, saved_shape = StateStorage.saved_layout(value)
    except ValueError as err:
        return f"has {err}"
    codes, scale = value["codes"], value["scale"]
    if saved_shape != shape:
        return f"has shape {saved_shape}, expected {shape}"
    if saved_signed != signed:
        return f"is stored with signed={saved_signed!r}, expected {signed} (a state of another family?)"
    if not (isinstance(codes, Tensor) and isinstance(scale, Tensor)):
        return "has codes or scale that are not tensors"
    numel, block = math.prod(shape), BLOCK_SIZE[prec]
    want_codes = numel // 2 if prec == "4bit" else numel
    want_dtypes = (torch.uint8, FP8) if prec == "fp8" else (torch.uint8,)
    if numel % block or codes.numel() != want_codes or codes.dtype not in want_dtypes:
        return f"has {codes.numel()} {codes.dtype} codes, expected {want_codes} uint8 for {prec}"
    if scale.numel() != numel // block or scale.dtype != torch.float32:
        return f"has {scale.numel()} {scale.dtype} scales, expected {numel // block} float32"
    if scale.numel() and not bool((torch.isfinite(scale) & (scale >= 0)).all()):
        return "has a NaN, inf or negative block scale"
    if prec == "fp8" and codes.numel() and not bool(torch.isfinite(codes.view(FP8).float()).all()):
        return "holds NaN fp8 codes"
    return None


def clone_lowbit(state: Tensor, memo: dict[int, Any] | None = None) -> Tensor:
    """A copy of a torchao low-bit state (they implement no ``aten.clone``), for ``copy.deepcopy``."""
    import copy

    memo = {} if memo is None else memo
    codes, scale, q = parts(state)
    codes, scale = codes.detach().clone(), scale.detach().clone()
    prec = precision_of(state)
    if prec == "8bit":
        from torchao.optim.subclass_8bit import OptimState8bit

        return OptimState8bit(codes, scale, copy.deepcopy(q, memo), state.signed)
    if prec == "4bit":
        from torchao.optim.subclass_4bit import OptimState4bit

        return OptimState4bit(codes, scale, copy.deepcopy(q, memo), state.signed, tuple(state.shape))
    from torchao.optim.subclass_fp8 import OptimStateFp8

    new = OptimStateFp8(codes, scale)
    new.signed = state.signed
    return new
