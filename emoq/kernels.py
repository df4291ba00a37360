"""Running the update rules: compiled (the default, fast path) or eagerly (the reference path).

A family's rule (``emoq/optim/<family>.py``) is one out-of-place function. For each parameter
this module wraps it into one *step function*: load every state to fp32 (dequantize) → the rule →
store every state back (quantize) and write the parameter (with the compensation of bf16/fp16
weights). That function runs

- **compiled** (``torch.compile(fullgraph=True, dynamic=False)``, the default): the step's
  scalars are one small tensor (a new step size never recompiles), and the whole step of a
  parameter is one loop. Parameters with fewer than ``SMALL`` elements that share a shape (and
  dtypes and state layout) are stepped as one stack: their states live in one stacked buffer
  (each parameter's state is a view of it), their gradients and values are stacked for the call
  into buffers the stack keeps (``emoq.optim.base.Unit``) and the values copied back, so a LoRA
  set of hundreds of small tensors is a handful of calls and a handful of compiles (one per
  distinct shape), not hundreds. Rules take a parameter or a stack of them along leading dims
  (``emoq.arith.param_dims``). A large parameter of an element-wise rule with low-bit states is
  stepped in block-aligned pieces (``emoq.optim.base.CHUNK``), each in two calls through kept
  scratch (``SCRATCH_MIN``);
- **eagerly**, one parameter at a time, with Python-float scalars (``fused=False``,
  ``EMOQ_COMPILE=0``, or after a compile failure): the reference path.

Both evaluate the same function; the arithmetic helpers (``emoq.arith``) round the same
way in both, so the compiled step is bit-identical to the eager one where the maths is
element-wise (tests/test_kernels.py; see docs/precision.md for what is and is not).

Compilation failures (no C++ compiler, unsupported backend) warn once, loudly, and every later
step runs eagerly: the same function, the reference path, only slower. Memory that runs out in a
compiled call is not a compile failure: it is raised (:func:`out_of_memory`), and compiling stays on.
"""

from __future__ import annotations

import math
import os
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor

from emoq import compensate
from emoq.arith import Hyper
from emoq.states import (
    LOWBIT,
    dequantize_parts,
    dither,
    dither_seed,
    quantize_8bit,
    quantize_parts_,
    rounds_stochastically,
    scale_8bit,
)

SMALL = 1 << 16  # parameters with fewer elements are stacked with the same-shape ones
SCRATCH_MIN, SCRATCH_MAX = 1 << 21, 1 << 22
"""A compiled step whose largest low-bit state has between these many elements (2-4 M: the pieces
of a large parameter, emoq.optim.base.CHUNK) runs in two compiled calls: the rule writes the
states' new fp32 values into scratch buffers the runner keeps (allocated once, ``SCRATCH_MAX``
elements per state at most), then they are quantized from there. In one call inductor allocates
those values (8-16 MB each) afresh on every call; glibc returns blocks that large to the kernel,
so steps page-faulted them in again: EmoSens8bit on 4096², after torch's AdamW in the same
process, 199-210 ms one call vs 119 ms two. Smaller states stay one call: two calls measured 30 %
slower on 885 K-element weights, where the faults were rare (bench/README.md "Page faults")."""
# static shapes (dynamic-shape kernels measured up to 4x slower on CPU); no bounds check on the
# table lookups (their indices are uint8 codes and 16-bit buckets, in range by construction);
# casts to bf16/fp16 keep their rounding (inductor otherwise folds x.to(bf16).float() into x,
# which silently disables error feedback)
COMPILE_OPTIONS: dict[str, Any] = {"fullgraph": True, "dynamic": False,
                                   "options": {"assert_indirect_indexing": False, "emulate_precision_casts": True}}


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is memory running out (CUDA's ``torch.OutOfMemoryError``, Python's
    ``MemoryError``, or a ``RuntimeError`` of the CPU allocator — "can't allocate memory" — or of
    another backend — "MPS backend out of memory"), which a compiled call may raise at run time:
    not a compile failure, so it is raised, and compiling stays on."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def compile_enabled() -> bool:
    """False when the environment variable ``EMOQ_COMPILE`` is ``0``/``false``/``off``/``no``."""
    return os.environ.get("EMOQ_COMPILE", "1").strip().lower() not in ("0", "false", "off", "no")


def _no_shards(t: Tensor) -> Tensor:
    return t


class Extent(NamedTuple):
    """What a rule needs to know about the whole parameter when it holds only part of it.

    ``shape`` is the full parameter's shape; ``sum_shards`` turns a partial sum over the local
    rows (dim 0) into the sum over all rows (identity for a parameter held whole). Every
    cross-row reduction of a rule (EmoAiry's column mean and mean ``|g|``, EmoTion's column
    mean) goes through it.
    """

    shape: tuple[int, ...]
    sum_shards: Callable[[Tensor], Tensor] = _no_shards

    @property
    def sharded(self) -> bool:
        """Whether the rows are split over ranks (``sum_shards`` is a collective)."""
        return self.sum_shards is not _no_shards


class StateLayout(NamedTuple):
    """How one state is stored: precision, sign (unsigned states are kept as square roots) and
    shape; and where its elements sit in the whole state of their parameter, which numbers them
    for stochastic rounding: ``members`` parameters stacked along a new dim 0, each holding the
    elements from ``offset`` on (a row shard's first element; 0 for a state held whole)."""

    precision: str
    signed: bool
    shape: tuple[int, ...]
    offset: int = 0
    members: int = 1


def element_index(layout: StateLayout, device: torch.device) -> Tensor:
    """Each element's index (int64, flat) in the whole state of its own parameter: the same for
    a parameter stepped alone or in a stack, whole or as a row shard (emoq.distributed)."""
    n = 1
    for s in layout.shape:
        n *= s
    index = torch.arange(n, dtype=torch.int64, device=device)
    if layout.members > 1:
        index = index % (n // layout.members)
    return index + layout.offset if layout.offset else index


def load_state(layout: StateLayout, parts: Sequence[Tensor]) -> Tensor:
    """The fp32 value of a state from its plain parts (see ``StateStorage.kernel_args``)."""
    prec, signed, shape = layout.precision, layout.signed, layout.shape
    if prec in ("8bit", "4bit", "fp8"):
        n = 1
        for s in shape:
            n *= s
        return dequantize_parts(prec, signed, parts[0], parts[1], parts[2] if len(parts) > 2 else None, n).view(shape)
    return parts[0] if parts[0].dtype == torch.float32 else parts[0].float()


def store_state(layout: StateLayout, parts: Sequence[Tensor], x: Tensor, step: float | Tensor = 0,
                which: int = 0) -> None:
    """Write the fp32 value ``x`` into a state's plain parts (quantizing a low-bit state).

    A state that ``rounds_stochastically`` is rounded with the dither of (its elements'
    :func:`element_index`, the optimizer ``step``, ``which`` state of the parameter it is):
    deterministic, no random generator read (docs/precision.md)."""
    prec, signed = layout.precision, layout.signed
    if prec in ("8bit", "4bit", "fp8"):
        table = parts[3] if len(parts) == 4 else None
        u = None
        if rounds_stochastically(prec, signed):
            u = dither(element_index(layout, x.device), dither_seed(step, which))
        quantize_parts_(prec, signed, parts[0], parts[1], parts[2] if len(parts) > 2 else None, x, table, u)
    else:
        parts[0].copy_(x)


class _ByValue:
    """Dataclass mixin: compared by value, hashed once (the engine looks up hundreds per step)."""

    def _key(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(self._key()))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined]

    def __eq__(self, other: object) -> bool:
        return self is other or (type(other) is type(self) and self._key() == other._key())  # type: ignore[attr-defined]


@dataclass(frozen=True, eq=False)
class ParamSig(_ByValue):
    """Everything static about one parameter's step (with the shapes, the compile key)."""

    layouts: tuple[StateLayout, ...]
    extent: Extent
    p_dtype: torch.dtype
    g_dtype: torch.dtype
    compensation: str  # compensate mode ("none" for fp32 parameters)
    shape: tuple[int, ...]


def param_stats(stats: Callable[..., tuple[Tensor, ...]], extent: Extent, g: Tensor) -> tuple[Tensor, ...]:
    """The statistics of one gradient a rule needs (partial sums over the local rows)."""
    return stats(g if g.dtype == torch.float32 else g.float(), extent)


def _quantize_8bit(layout: StateLayout, st: Sequence[Tensor], value: Tensor) -> tuple[Tensor, Tensor]:
    """``(codes, block peaks)`` of the new value of the 8-bit state ``st`` (its parts: codes, scale,
    map, optional encode table): :func:`emoq.states.quantize_8bit` on the state's own blocks and map."""
    return quantize_8bit(layout.signed, value, st[1].numel(), st[2], st[3] if len(st) > 3 else None)


def param_step(rule: Callable[..., Any], opts: dict, sig: ParamSig, p: Tensor, g: Tensor,
               stats: tuple[Tensor, ...], parts: Sequence[Sequence[Tensor]], residual: Tensor | None, h: Hyper,
               before: Callable[[Tensor], None] | None = None, scratch: Sequence[Tensor] = ()) -> None:
    """One step of one parameter: load states → ``rule`` → store states and the parameter.

    ``before(x)`` (eager only) runs on the fp32 working value first (the optional shadow).
    With ``scratch`` (one fp32 tensor per low-bit state, in order): the new values of the low-bit
    states are written there instead of being quantized (:func:`store_lowbit` does that next).
    """
    x = compensate.working_value(p, residual, sig.compensation)
    if before is not None:
        before(x)
    if g.dtype != torch.float32:
        g = g.float()
    states = tuple(load_state(layout, st) for layout, st in zip(sig.layouts, parts))
    x_new, new_states = rule(x, g, states, stats, h, sig.extent, **opts)
    kept = iter(scratch)
    for which, (layout, st, value) in enumerate(zip(sig.layouts, parts, new_states)):
        if scratch and layout.precision in LOWBIT:
            next(kept).view(value.shape).copy_(value)
        else:
            store_state(layout, st, value, h.step, which)
    compensate.store_value(p, x_new, residual, sig.compensation)


def store_lowbit(sig: ParamSig, parts: Sequence[Sequence[Tensor]], scratch: Sequence[Tensor],
                 step: float | Tensor) -> list[Tensor]:
    """Quantize the low-bit states' new values from ``scratch`` (see :func:`param_step`). The block
    peaks of 8-bit states are returned, in order, for the caller to write their scales
    (:func:`write_scales`): a scale written here is a separate pass in compiled code, which keeps
    inductor from reading each block once for both its scale and its codes."""
    kept, peaks = iter(scratch), []
    for which, (layout, st) in enumerate(zip(sig.layouts, parts)):
        if layout.precision == "8bit":
            codes, peak = _quantize_8bit(layout, st, next(kept))
            st[0].view(codes.shape).copy_(codes)
            peaks.append(peak)
        elif layout.precision in LOWBIT:
            store_state(layout, st, next(kept), step, which)
    return peaks


def write_scales(sig: ParamSig, parts: Sequence[Sequence[Tensor]], peaks: Sequence[Tensor]) -> None:
    """Write the scales of the 8-bit states' block ``peaks`` (from :func:`store_lowbit`) into their
    parts."""
    new = iter(peaks)
    for layout, st in zip(sig.layouts, parts):
        if layout.precision == "8bit":
            peak = next(new)
            st[1].view(peak.shape).copy_(scale_8bit(layout.signed, peak))


def _own_code(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` with a code object of its own: dynamo keeps one cache entry per code object, so each
    compiled chunk checks one set of guards and no recompile limit is shared between chunks."""
    return types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name, None, fn.__closure__)


def _make_step_fn(rule: Callable[..., Any], opts: tuple, sig: ParamSig) -> Callable[..., None]:
    options = dict(opts)

    def emoq_step(p: Tensor, g: Tensor, stats: tuple, parts: list, residual: Tensor | None, c: Tensor) -> None:
        param_step(rule, options, sig, p, g, stats, parts, residual, Hyper.from_tensor(c))

    return _own_code(emoq_step, "emoq_step")


def _make_phase_fns(rule: Callable[..., Any], opts: tuple, sig: ParamSig) -> tuple[Callable[..., None], ...]:
    options = dict(opts)

    def emoq_step_to_scratch(p: Tensor, g: Tensor, stats: tuple, parts: list, residual: Tensor | None, c: Tensor,
                             scratch: list) -> None:
        param_step(rule, options, sig, p, g, stats, parts, residual, Hyper.from_tensor(c), scratch=scratch)

    def emoq_store_lowbit(parts: list, scratch: list, c: Tensor) -> list[Tensor]:
        return store_lowbit(sig, parts, scratch, Hyper.from_tensor(c).step)

    return _own_code(emoq_step_to_scratch, "emoq_step_to_scratch"), _own_code(emoq_store_lowbit, "emoq_store_lowbit")


def _make_stats_fn(stats: Callable[..., tuple[Tensor, ...]], extent: Extent) -> Callable[..., tuple[Tensor, ...]]:
    def emoq_stats(g: Tensor) -> tuple[Tensor, ...]:
        return param_stats(stats, extent, g)

    return _own_code(emoq_stats, "emoq_stats")


_COMPILED: dict[tuple, Callable[..., Any]] = {}  # shared by all optimizers of the process
_CASTS_ROUND: dict[tuple[torch.dtype, str], bool] = {}


def compiled_casts_round(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether compiled code (``COMPILE_OPTIONS``) on ``device``'s kind keeps the rounding of a
    cast to ``dtype`` (bf16 / fp16), which every compensation of low-precision weights needs.

    Checked once per process on a probe: ``x - x.to(dtype).float()`` with ``x`` between two
    ``dtype`` values must not be 0. Measured: true on torch 2.13 (CPU); on torch 2.11 (CPU part
    of a CUDA build) compiled stochastic rounding never rounded up and error feedback differed
    from eager, the fold that ``emulate_precision_casts`` should prevent.
    """
    key = (dtype, torch.device(device).type)
    if key not in _CASTS_ROUND:
        x = torch.full((8,), 1.0 + 2.0 ** -12, device=device)  # 1 + 2^-12 rounds to 1 in bf16 and fp16

        def residual(t: Tensor) -> Tensor:
            return t - t.to(dtype).float()

        try:
            got = torch.compile(residual, **COMPILE_OPTIONS)(x)
            _CASTS_ROUND[key] = bool(torch.equal(got, residual(x)))
        except Exception:  # noqa: BLE001 - no compiler: the step's own compile fails loudly later
            _CASTS_ROUND[key] = True
        if not _CASTS_ROUND[key]:
            warnings.warn(f"emoq: torch {torch.__version__}'s compiled code drops the rounding of casts to {dtype} "
                          f"on {key[1]} (x.to({dtype}).float() becomes x): {dtype} weights are stepped eagerly "
                          "(the reference path, exact, slower)", RuntimeWarning, stacklevel=4)
    return _CASTS_ROUND[key]


class Runner:
    """Runs a family's statistics and rule on one parameter or stack, compiled or eagerly (module
    doc). Compiled functions are shared process-wide (keyed by function, options, signature and
    shapes), so a second optimizer over the same shapes compiles nothing."""

    def __init__(self, compile: bool | None = None) -> None:
        self.compile = compile_enabled() if compile is None else bool(compile)
        self.failed = False
        self._scratch: dict[tuple[torch.device, int], Tensor] = {}  # (device, state number) -> fp32 buffer

    def __deepcopy__(self, memo: dict) -> Runner:
        return Runner(self.compile)

    def scratch(self, sig: ParamSig, device: torch.device) -> list[Tensor] | None:
        """Flat fp32 views, one per low-bit state of ``sig`` (None: no low-bit state, or the largest
        outside [:data:`SCRATCH_MIN`, :data:`SCRATCH_MAX`]). Buffers grow to the largest request and
        are kept."""
        sizes = [math.prod(layout.shape) for layout in sig.layouts if layout.precision in LOWBIT]
        if not sizes or not SCRATCH_MIN <= max(sizes) <= SCRATCH_MAX:
            return None
        views = []
        for i, n in enumerate(sizes):
            buf = self._scratch.get((device, i))
            if buf is None or buf.numel() < n:
                buf = self._scratch[(device, i)] = torch.empty(n, dtype=torch.float32, device=device)
            views.append(buf[:n])
        return views

    @property
    def compiling(self) -> bool:
        """Whether calls run compiled (compilation on, never failed here, not inside a caller's
        ``torch.compile``, where the eager form is traced inline)."""
        return self.compile and not self.failed and not torch.compiler.is_compiling()

    def stats(self, fn: Callable[..., tuple[Tensor, ...]], extent: Extent, g: Tensor) -> tuple[Tensor, ...]:
        """``fn``'s statistics of the gradient (or stack of gradients) ``g``."""
        if self.compiling:
            key = ("stats", fn, extent, g.dtype, tuple(g.shape))
            compiled = _COMPILED.get(key)
            if compiled is None:
                compiled = _COMPILED[key] = torch.compile(_make_stats_fn(fn, extent), **COMPILE_OPTIONS)
            try:
                return compiled(g)
            except Exception as exc:  # compile unavailable (no compiler, unsupported backend, ...)
                self._fail(fn, exc)
        return param_stats(fn, extent, g)

    def step(self, rule: Callable[..., Any], opts: dict, sig: ParamSig, p: Tensor, g: Tensor,
             stats: tuple[Tensor, ...], parts: list[list[Tensor]], residual: Tensor | None, h: Hyper,
             c: Tensor | None = None, before: Callable[[Tensor], None] | None = None) -> None:
        """One step of a parameter (or stack) ``p``; ``c`` is ``h`` as a tensor (compiled calls)."""
        if before is None and self.compiling and (p.dtype not in compensate.LOW_PRECISION
                                                  or compiled_casts_round(p.dtype, p.device)):
            okey = tuple(sorted(opts.items()))
            c = h.as_tensor(p.device) if c is None else c
            scratch = self.scratch(sig, p.device)
            if scratch is not None:
                return self._two_phase(rule, okey, sig, p, g, stats, parts, residual, h, c, scratch)
            key = ("step", rule, okey, sig)
            compiled = _COMPILED.get(key)
            if compiled is None:
                compiled = _COMPILED[key] = torch.compile(_make_step_fn(rule, okey, sig), **COMPILE_OPTIONS)
            try:
                compiled(p.detach(), g, stats, parts, residual, c)
                return
            except Exception as exc:  # raised while compiling, before anything was written
                self._fail(rule, exc)
        if torch.compiler.is_compiling():  # traced inline into a caller's graph: tensor scalars
            h = Hyper.from_tensor(h.as_tensor(p.device))
        param_step(rule, opts, sig, p, g, stats, parts, residual, h, before)

    def _two_phase(self, rule: Callable[..., Any], okey: tuple, sig: ParamSig, p: Tensor, g: Tensor,
                   stats: tuple[Tensor, ...], parts: list[list[Tensor]], residual: Tensor | None, h: Hyper,
                   c: Tensor, scratch: list[Tensor]) -> None:
        """The compiled step as rule → scratch, then scratch → low-bit states (see SCRATCH_MAX).
        Each call compiles before it writes anything: if the first fails, nothing was written and
        the whole step runs eagerly; if the second fails, the values in scratch are quantized
        eagerly (the same function), so a step is never left half done."""
        key = ("step2", rule, okey, sig)
        compiled = _COMPILED.get(key)
        if compiled is None:
            first, second = _make_phase_fns(rule, okey, sig)
            compiled = _COMPILED[key] = (torch.compile(first, **COMPILE_OPTIONS),
                                         torch.compile(second, **COMPILE_OPTIONS))
        try:
            compiled[0](p.detach(), g, stats, parts, residual, c, scratch)
        except Exception as exc:  # raised while compiling, before anything was written
            self._fail(rule, exc)
            param_step(rule, dict(okey), sig, p, g, stats, parts, residual, h)
            return
        # 8-bit codes and values by blocks, so that each block is read once for its peak and its codes
        lowbit = [(lay, st) for lay, st in zip(sig.layouts, parts) if lay.precision in LOWBIT]
        by_block = [x.view(st[1].numel(), -1) if lay.precision == "8bit" else x
                    for x, (lay, st) in zip(scratch, lowbit)]
        blocked = [[st[0].view(st[1].numel(), -1), *st[1:]] if lay.precision == "8bit" else st
                   for lay, st in zip(sig.layouts, parts)]
        try:
            peaks = compiled[1](blocked, by_block, c)
        except Exception as exc:  # the parameter is written: finish the states from scratch eagerly
            if not out_of_memory(exc):  # out of memory: finish this call eagerly, compiling stays on
                self._fail(rule, exc)
            peaks = store_lowbit(sig, parts, scratch, h.step)
        write_scales(sig, parts, peaks)

    def _fail(self, what: Callable[..., Any], exc: Exception) -> None:
        """Called in the ``except`` of a compiled call: memory that ran out is raised again (compiling
        stays on); any other failure turns compiling off for good, with one loud warning."""
        if out_of_memory(exc):
            raise exc
        self.failed = True
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        warnings.warn(f"emoq: torch.compile of {getattr(what, '__name__', 'the step')} failed ({type(exc).__name__}: "
                      f"{first}); running the same functions eagerly from now on (the reference path, slower). "
                      "Set EMOQ_COMPILE=0 to silence this.", RuntimeWarning, stacklevel=5)
