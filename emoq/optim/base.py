"""EmoOptimizer: the bookkeeping shared by the four Emo families.

It owns loss intake, emoPulse, the NaN/inf guard, the distributed loss mean, the parameter
loop, state allocation through the storage policy (``emoq.states``) and ``state_dict``.
A family adds only which states it keeps (``_state_specs``) and its rule (``rule``: one
out-of-place function, run compiled or eagerly by ``emoq.kernels``).
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from emoq import compensate
from emoq.arith import Hyper
from emoq.distributed import Layout, StatePlacement, is_dtensor, local, locals_of, reduce_loss
from emoq.kernels import SMALL, Extent, ParamSig, Runner, StateLayout, param_stats, param_step
from emoq.probe import STATE_NAME as PROBE_STATE
from emoq.probe import check_probe_state
from emoq.pulse import EmoPulse, make_pulse
from emoq.states import (
    BLOCK_SIZE,
    DEFAULT_MIN_LOWBIT_SIZE,
    LOWBIT,
    StateStorage,
    check_saved_state,
    clone_lowbit,
    is_lowbit,
    precision_of,
    rounds_stochastically,
    slice_kernel_args,
)

NO_LOSS_MESSAGE = (
    "{name}.step() got no loss: emoPulse computes the step size from the loss, and emoq never "
    "substitutes one. Give it in one of three ways: opt.step(closure) with a closure that "
    "returns the loss, opt.step(loss=loss), or opt.record_loss(loss) once per micro-batch "
    "before opt.step(). In the Hugging Face Trainer add emoq.integrations.transformers.EmoCallback()."
)


@dataclass(frozen=True)
class StateSpec:
    """One optimizer state of a parameter: its shape, whether it can be negative, and whether its
    dim 0 indexes the parameter's rows (``per_row``: split with them when the parameter is
    sharded; otherwise the state is whole on every rank, like EmoAiry's column statistic)."""

    shape: tuple[int, ...]
    signed: bool
    per_row: bool = True

    def __init__(self, shape: Iterable[int], signed: bool, per_row: bool = True) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "signed", bool(signed))
        object.__setattr__(self, "per_row", bool(per_row))


FAMILIES = ("EmoSens", "EmoAiry", "EmoCats", "EmoTion")
FP32_MAX = float(torch.finfo(torch.float32).max)
# keys a param group may hold: the per-group hyper-parameters, torch's names, the key torch's
# lr schedulers add (a group saved after a scheduler ran carries it) and emoq's pulse record slot
GROUP_KEYS = ("params", "param_names", "lr", "betas", "eps", "weight_decay", "initial_lr", "emo")


def factored_shape(shape: tuple[int, ...] | torch.Size) -> bool:
    """SPEC.md: ``len(shape) >= 2`` and ``(shape[0] + shape[1]) / numel < 0.05`` (never for zero-size)."""
    return len(shape) >= 2 and math.prod(shape) > 0 and (shape[0] + shape[1]) / math.prod(shape) < 0.05


def is_factored(p: Tensor) -> bool:
    """Whether the rules factor ``p``'s statistics (:func:`factored_shape` of its shape)."""
    return factored_shape(p.shape)


def grad_limit(numel: int) -> float:
    """A gradient magnitude a step always accepts for a tensor of ``numel`` elements.

    ``sqrt(FP32_MAX / (4 * numel))``: a gradient whose every entry is within it has a sum of
    squares within ``SQUARES_LIMIT`` (the rule :func:`grads_in_range` applies), so ``g**2`` and
    any sum of ``g**2`` over the tensor (EmoSens' ``v``, EmoAiry's row/column means) stay finite
    in fp32 with a 4x margin for the moving averages.
    """
    return math.sqrt(FP32_MAX / 4.0 / max(int(numel), 1))


def _is_number(value: Any) -> bool:
    """A real number (Python or numpy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _check_loss_tensor(loss: Tensor, what: str) -> None:
    if loss.numel() != 1:
        raise ValueError(f"{what} must be a scalar (float or 0-dim tensor), got a tensor of shape {tuple(loss.shape)}")
    if torch.is_complex(loss) or loss.dtype == torch.bool:
        raise TypeError(f"{what} must be a real number, got a {loss.dtype} tensor")


def as_loss_float(loss: Any, what: str) -> float:
    """A loss given as a float, a numpy scalar or a one-element real tensor, as a Python float."""
    if isinstance(loss, Tensor):
        _check_loss_tensor(loss, what)
        return float(loss.detach().double().item())
    if _is_number(loss):
        return float(loss)
    if type(loss).__module__ == "numpy" and getattr(loss, "size", 0) == 1 and getattr(loss.dtype, "kind", "") in "fiu":
        return float(loss.item())  # a one-element numpy array
    raise TypeError(f"{what} must be a float or a 0-dim tensor, got {type(loss).__name__}")


FLOAT64_MESSAGE = (
    "{name} does not support float64 parameters: its rules compute in fp32, so each step would round the "
    "weights to fp32 values; train in float32 (or bf16/fp16 with compensation=), or use a torch optimizer "
    "for float64 work"
)

RECHECK_CHUNK = 1 << 20  # elements converted to float64 at a time (16 MB per operand)


def grad_dot_params(params: Iterable[Tensor]) -> float:
    """``<g, x>`` summed over ``params`` that have a gradient, in float64 (float32 on MPS, which
    has no float64), converting ``RECHECK_CHUNK`` elements at a time; one device sync per device.

    The recheck's predicted decrease is the difference of this sum before and after the update,
    so it reads ``g`` and ``x`` twice per step instead of keeping a copy of ``x``."""
    totals: dict[torch.device, Tensor] = {}
    for p in params:
        if p.grad is None:
            continue
        g, x = local(p.grad).reshape(-1), local(p.detach()).reshape(-1)
        dtype = torch.float32 if x.device.type == "mps" else torch.float64
        acc = totals.setdefault(x.device, torch.zeros((), dtype=dtype, device=x.device))
        for i in range(0, x.numel(), RECHECK_CHUNK):
            acc += torch.dot(g[i:i + RECHECK_CHUNK].to(dtype), x[i:i + RECHECK_CHUNK].to(dtype))
    return math.fsum(float(t) for t in totals.values())


def recheck_ratio(before: float, after: float, predicted: float) -> float:
    """The recheck's ratio: the decrease achieved on the minibatch over the one ``<g, x - x_new>``
    predicts, clamped to [-1, 1]; -1 when no decrease was predicted or ``after`` is not finite."""
    if not (predicted > 0 and math.isfinite(after) and math.isfinite(predicted)):
        return -1.0
    return max(-1.0, min(1.0, (before - after) / predicted))


@torch.compiler.disable(reason="emoq optimizers refuse torch.compile of step()")
def _refuse_compile(name: str) -> None:
    # Reached only from code dynamo traced (torch.compiler.is_compiling() was True): dynamo cannot
    # inline a disabled function, so it runs this eagerly, and the error reaches the caller.
    raise RuntimeError(
        f"{name}.step() cannot run under torch.compile: emoPulse reads the loss as a Python number and the "
        "low-bit states run their own compiled kernels (already compiled per parameter). Call opt.step() "
        "outside the compiled function; compile the model's forward/backward only."
    )


SQUARES_LIMIT = float(torch.finfo(torch.float32).max) / 4


def grads_in_range(norms: list[Tensor], squares: list[Tensor]) -> bool:
    """Whether every gradient is finite with a sum of squares at most ``SQUARES_LIMIT`` (fp32
    max / 4), with one device sync.

    ``norms`` are gradients' 2-norms, ``squares`` sums of ``g**2`` (from a rule's statistics).
    A NaN or inf anywhere in a gradient makes its norm NaN or inf; below the limit, ``g**2`` and
    every sum of it over the tensor (EmoSens' ``v``, EmoAiry's row and column means) stay finite
    with a 4x margin.
    """
    checks = []
    if norms:
        checks.append(torch.stack(norms).float() <= math.sqrt(SQUARES_LIMIT))  # NaN compares False
    if squares:
        checks.append(torch.cat([s.reshape(-1) for s in squares]).float() <= SQUARES_LIMIT)
    return not checks or bool(torch.cat(checks).all())


def grad_norms(grads: list[Tensor]) -> list[Tensor]:
    """The 2-norm of each gradient, in one call (torch's multi-tensor norm: one pass per tensor,
    no Python per tensor)."""
    return list(torch._foreach_norm(grads, 2, dtype=torch.float32)) if grads else []


DOT_MIN = 1 << 16
"""A contiguous fp32 CPU gradient (or stack of them) of at least this many elements is range-checked
by ``torch.dot(g, g)`` (its sum of squares, one BLAS pass) instead of ``torch._foreach_norm``:
measured on a 4096 x 4096 gradient, 2 threads: 4.9 ms vs 7.9 ms (docs/decisions.md)."""


def dot_checked(g: Tensor) -> bool:
    """Whether ``g``'s range check is its sum of squares by ``torch.dot`` (see :data:`DOT_MIN`)."""
    return g.dtype == torch.float32 and g.device.type == "cpu" and g.numel() >= DOT_MIN and g.is_contiguous()


def sum_of_squares(g: Tensor) -> Tensor:
    """``sum(g**2)`` of a :func:`dot_checked` gradient, one element; NaN or inf if any element is."""
    flat = g.view(-1)
    return torch.dot(flat, flat).reshape(1)


CHUNK = 1 << 22
"""A parameter of more elements (element-wise rule, low-bit states) is stepped in pieces of at most
this many: the compiled step needs each state's new fp32 value whole before its block maxima,
so pieces bound those values to 16 MB per state (measured on a 4096² weight, 2 threads: an 8-bit
step of an element-wise rule 278 → 189 ms); each piece keeps them in scratch between steps
(``emoq.kernels.SCRATCH_MIN``), where the allocator had returned fresh ones to the system."""


@functools.lru_cache(maxsize=256)
def chunk_spans(n: int, layouts: tuple[StateLayout, ...], chunk: int) -> tuple[tuple[int, int], ...]:
    """``[lo, hi)`` pieces of ``n`` elements, at most ``chunk`` each and of at most two sizes (≤ 2
    compiles), each a whole number of every low-bit state's quantization blocks (so each block is
    quantized as a whole)."""
    block = max(BLOCK_SIZE.get(lay.precision) or 1 for lay in layouts)
    pieces = -(-n // chunk)
    size = -(-n // pieces // block) * block
    return tuple((lo, min(lo + size, n)) for lo in range(0, n, size))


@functools.lru_cache(maxsize=256)
def chunk_sig(sig: ParamSig, n: int) -> ParamSig:
    """The signature of a flat piece of ``n`` elements of an element-wise rule's parameter."""
    return ParamSig(tuple(lay._replace(shape=(n,)) for lay in sig.layouts), Extent((n,)), sig.p_dtype,
                    sig.g_dtype, sig.compensation, (n,))


class Unit:
    """Parameters stepped by one call: one parameter, or a stack of same-shape small ones.

    A stack keeps the buffer its gradients are stacked into between steps (a copy of the
    gradients): stacking into fresh tensors every step measured 3x slower on the LoRA set whenever
    glibc had returned the previous step's blocks to the kernel (page faults; 10.1 vs 3.1 ms for
    the stacking and copying back), and the same when it had not. Its members' values live in a
    :class:`ParamHome` (the optimizer's, kept across plans); a stack of DTensor shards stacks
    their values into a kept buffer ``"values"`` and copies them back."""

    __slots__ = ("params", "stacked", "extent", "dtensors", "kernel_args", "grads", "g", "stats", "home", "_bufs")

    def __init__(self, params: tuple[Tensor, ...], stacked: bool, extent: Extent) -> None:
        self.params, self.stacked, self.extent = params, stacked, extent
        self.dtensors = True  # whether a parameter or gradient may be a DTensor (stepped through its shard)
        # a stack's (signature, state parts, residual), from EmoOptimizer._stack: a unit lives in one plan,
        # which load_state_dict and any regrouping of its members replace
        self.kernel_args: tuple | None = None
        self.grads: list[Tensor] = []
        self.g: Tensor | None = None  # the gradient (stacked for a stack), set each step
        self.stats: tuple[Tensor, ...] = ()
        self.home: ParamHome | None = None  # where a stack's members live (EmoOptimizer._homes)
        self._bufs: dict[str, tuple[Tensor, list[Tensor]]] = {}

    def stack(self, which: str, members: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """``torch.stack(members)`` into this unit's kept buffer ``which`` (made, or remade when the
        members' shape, dtype or device changed), and the buffer's per-member views."""
        kept = self._bufs.get(which)
        first = members[0]
        if (kept is None or kept[0].shape[1:] != first.shape or kept[0].dtype != first.dtype
                or kept[0].device != first.device):
            buf = torch.empty((len(members),) + tuple(first.shape), dtype=first.dtype, device=first.device)
            kept = self._bufs[which] = (buf, list(buf.unbind(0)))
        torch.stack(members, out=kept[0])
        return kept


def _storage_uses(storage: Any) -> int | None:
    """How many tensors (and storage objects) hold ``storage``, or ``None`` where torch cannot say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else int(count(storage._cdata))


def movable(p: Tensor) -> bool:
    """Whether ``p``'s values may move into an optimizer buffer (``p.data`` becomes a view of it):
    a plain contiguous CPU tensor that alone holds a storage of exactly its size. Anything else (a
    view of a larger tensor, a storage another tensor also holds, such as an alias ``p.detach()`` or
    a ``state_dict()`` the user keeps, a tensor subclass) stays where it is, so every alias keeps
    seeing the updates; so does every accelerator tensor (a captured CUDA graph reads parameters by
    address, and there the copies are not what the step waits on)."""
    if (type(p.data) is not Tensor or p.device.type != "cpu" or p.layout is not torch.strided
            or not p.is_contiguous() or p.storage_offset()):
        return False
    storage = p.untyped_storage()
    return storage.nbytes() == p.numel() * p.element_size() and _storage_uses(storage) == 2  # p and `storage`


class ParamHome:
    """One buffer that the members of a stack live in between steps: each member's ``.data`` is
    a view of it, so the compiled step updates them in place, with no stacking of the values and
    no copying back (the LoRA set: 14 passes over the members' bytes per step become 10;
    docs/decisions.md). Members are moved in at their first step when :func:`movable`; one that is
    not (or no longer is a view of its slot) is copied in before each step and back after it, as a
    stack of copies would be. Kept by the optimizer per member tuple, across plans and
    ``load_state_dict``: its buffer holds the parameters' values."""

    __slots__ = ("buf", "views", "ptrs")

    def __init__(self, first: Tensor, n: int) -> None:
        self.buf = torch.empty((n,) + tuple(first.shape), dtype=first.dtype, device=first.device)
        self.views = list(self.buf.unbind(0))
        self.ptrs: list[int | None] = [None] * n  # a member's data_ptr while it lives in its slot

    def fits(self, first: Tensor) -> bool:
        buf = self.buf
        return buf.shape[1:] == first.shape and buf.dtype == first.dtype and buf.device == first.device

    @staticmethod
    def where(members: tuple[Tensor, ...]) -> list[int]:
        """Each member's data_ptr, -1 for a non-contiguous one (never a view of its slot)."""
        return [p.data_ptr() if p.is_contiguous() else -1 for p in members]

    def lived_in(self) -> bool:
        """Whether a member lives in its slot."""
        return any(ptr is not None for ptr in self.ptrs)

    def enter(self, members: tuple[Tensor, ...], ptrs: list[int]) -> list[int]:
        """Copy the values of the members not living in their slots in, and move in those that may
        move; returns the indices of those that stay where they are (copy back after the step)."""
        out = [i for i, ptr in enumerate(ptrs) if ptr != self.ptrs[i]]
        torch._foreach_copy_([self.views[i] for i in out], [members[i] for i in out])
        back = []
        for i in out:
            p = members[i]
            if movable(p):
                p.data = self.views[i]
                self.ptrs[i] = self.views[i].data_ptr()
            else:
                self.ptrs[i] = None
                back.append(i)
        return back


_EVERY = object()
"""Noted in :class:`_WatchedStates`' set when a write may have touched any parameter's states."""


def _memo_lowbit(states: Iterable[Any], memo: dict[int, Any]) -> None:
    """Put a copy of every torchao low-bit value of ``states`` (per-parameter dicts) in ``memo``:
    they implement no ``aten.clone``, so ``copy.deepcopy`` reaches them only through the memo."""
    for st in states:
        if isinstance(st, dict):
            for value in st.values():
                if is_lowbit(value) and id(value) not in memo:
                    memo[id(value)] = clone_lowbit(value, memo)


class _WatchedState(dict):
    """One parameter's state dict; a write into it notes the parameter in its optimizer's set
    (``EmoOptimizer._adopt_replaced_states``). Pickles and copies as a plain dict."""

    def __init__(self, written: set, key: Any, *args: Any) -> None:
        super().__init__(*args)
        self.written, self.key = written, key

    def __reduce__(self) -> tuple:
        return dict, (dict(self),)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict:
        _memo_lowbit([self], memo)
        return copy.deepcopy(dict(self), memo)


class _WatchedStates(defaultdict):
    """``Optimizer.state`` of an emoq optimizer: a missing parameter gets a :class:`_WatchedState`
    (as torch's ``defaultdict(dict)`` gets a dict), and a write notes the parameter (or
    :data:`_EVERY`). Pickles and copies as torch's plain ``defaultdict(dict)``."""

    def __init__(self, written: set, items: Any = ()) -> None:
        super().__init__(None)
        self.written = written
        for key, value in dict(items).items():
            self[key] = value

    def __missing__(self, key: Any) -> _WatchedState:
        value = _WatchedState(self.written, key)
        dict.__setitem__(self, key, value)  # a state created by reading it: nothing to check
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, dict) and not (type(value) is _WatchedState and value.written is self.written
                                            and value.key is key):
            value = _WatchedState(self.written, key, value)  # the caller's dict is not modified
        self.written.add(key)
        dict.__setitem__(self, key, value)

    def __reduce__(self) -> tuple:
        return defaultdict, (dict,), None, None, iter((k, dict(v) if isinstance(v, dict) else v)
                                                       for k, v in self.items())

    def __deepcopy__(self, memo: dict[int, Any]) -> defaultdict:
        _memo_lowbit(self.values(), memo)
        out: defaultdict = defaultdict(dict)
        memo[id(self)] = out
        for k, v in self.items():
            out[copy.deepcopy(k, memo)] = copy.deepcopy(dict(v) if isinstance(v, dict) else v, memo)
        return out


def _noting(cls: type, name: str, every: bool) -> None:
    base = getattr(dict, name)

    @functools.wraps(base)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        written = getattr(self, "written", None)  # unset while unpickling
        if written is not None:
            written.add(_EVERY if every else (self.key if isinstance(self, _WatchedState) else args[0]))
        return base(self, *args, **kwargs)

    setattr(cls, name, method)


for _name in ("__setitem__", "__delitem__", "pop", "popitem", "clear", "update", "setdefault", "__ior__"):
    _noting(_WatchedState, _name, every=False)
for _name in ("__delitem__", "pop"):
    _noting(_WatchedStates, _name, every=False)
for _name in ("popitem", "clear", "update", "setdefault", "__ior__"):
    _noting(_WatchedStates, _name, every=True)


class _Undo:
    """What a step changes before its units write, kept to put back when the update fails in
    the middle (out of memory, ``KeyboardInterrupt``): the pulse, the recorded losses, the last
    loss and the probe's start points recorded this step. The values the units already wrote
    cannot be put back (that would need a copy of every parameter and state): the exception says
    how many were written. A step that fails before its first write (memory that runs out at the
    start of the first unit) leaves every value as it was, so that trying it again takes the
    step that never failed (tested)."""

    def __init__(self, opt: EmoOptimizer, recorded: tuple[Any, int]) -> None:
        self.opt, self.recorded, self.last_loss = opt, recorded, opt._last_loss
        self.pulse = dict(vars(opt._pulse))  # plain Python scalars
        self.written = set(opt._written)  # parameters whose state dict was written before this point
        self.probed: set = set()  # parameters the probe recorded a start point for, this step

    def __call__(self, exc: BaseException, done: int | None, units: int) -> None:
        opt = self.opt
        vars(opt._pulse).clear()
        vars(opt._pulse).update(self.pulse)
        opt._recorded_sum, opt._recorded_count = self.recorded
        opt._last_loss = self.last_loss
        for p in self.probed:
            opt.state[p].pop(PROBE_STATE, None)
        if done is not None and hasattr(exc, "add_note"):  # Python >= 3.11; None: no unit started
            before = f"{done} unit(s) before it keep their update" if done else "no unit before it was written"
            exc.add_note(f"emoq: {type(opt).__name__}.step() failed in unit {done + 1} of {units} (a parameter, or a "
                         f"stack of small ones); the pulse and the recorded losses are as before the step, {before}, "
                         "and the failed one may be partly written: reload a checkpoint to continue exactly.")


class EmoOptimizer(Optimizer):
    """Base of EmoSens, EmoAiry, EmoCats and EmoTion (not used directly).

    Args:
        params: iterable of parameters or param-group dicts.
        lr: the scope of emoPulse (default 1.0), *not* a learning rate. One per optimizer:
            param groups may not set their own ``lr``. After every step each group's ``lr``
            holds the real step size, so schedulers and loggers see it.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to denominators, >= 0.
        weight_decay: decoupled weight decay, >= 0 (multiplied by the step size).
        use_shadow: keep a shadow copy of each parameter (SPEC.md, "Optional shadow"). The
            shadow is stored in the parameter's dtype.
        state_precision: how states are stored: ``"fp32"``, ``"bf16"``, ``"8bit"``, ``"4bit"``
            or ``"fp8"`` (torchao blockwise states; see docs/precision.md).
        min_lowbit_size: with a low-bit ``state_precision``, the states of a parameter with
            fewer elements than this stay fp32 (default 4096; bitsandbytes' ``min_8bit_size``).
            Sizes that are not a multiple of the block (256; 128 at 4 bits) stay fp32 too.
        compensation: how an updated bf16/fp16 parameter is rounded back: ``"none"`` (to
            nearest), ``"stochastic"`` (unbiased, no memory), ``"error_feedback"`` (residual
            kept in the param dtype, 2 B/param for bf16; the default, chosen by measurement,
            docs/precision.md) or ``"error_feedback8"`` (residual in int8 ulp units, 1 B/param).
            No effect on fp32 parameters.
        fused: ``None``/``True`` (default): each step runs as compiled functions (load states
            → rule → store states, one loop per parameter; small same-shape parameters
            stacked into one call); the first step of each new shape compiles (seconds). ``False``: the rule
            runs eagerly, parameter by parameter, with Python-float scalars: the reference
            path (what tests/reference.py is compared with). Both run the same rule function;
            docs/precision.md says where they are bit-identical. ``EMOQ_COMPILE=0`` in the
            environment has the effect of ``fused=False``.
        pulse: the emoPulse variant (emoq/pulse.py, docs/pulse.md): ``"v3.8"`` (default,
            reference-exact), ``"v3.9"`` (upstream's emoChain) or ``"adaptive"`` (emoq's own).
    """

    stop_thresholds: tuple[float, float] = (1e-6, 1e-7)
    noise_floor: float = 1e-10
    #: the kind of step the rule takes (``emoq.pulse.RULE_KINDS``), which the adaptive pulse reads:
    #: ``"adam"`` a scaled step, ``"sign"`` +-eta per coordinate along the gradient (or a rank-1
    #: blend), ``"lion"`` +-eta per coordinate along a momentum blend
    rule_kind: str = "adam"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.995),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        use_shadow: bool = False,
        state_precision: str = "fp32",
        min_lowbit_size: int = DEFAULT_MIN_LOWBIT_SIZE,
        compensation: str | None = None,
        fused: bool | None = None,
        pulse: str = "v3.8",
    ) -> None:
        if not (_is_number(lr) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr (the pulse scope) must be a finite float > 0, got {lr!r}")
        self._check_hparams(betas, eps, weight_decay)
        if not isinstance(use_shadow, bool):
            raise ValueError(f"use_shadow must be True or False, got {use_shadow!r}")
        self._storage = StateStorage(state_precision, min_lowbit_size)
        self.min_lowbit_size = min_lowbit_size
        self.compensation = compensate.check_compensation(compensation)
        if fused not in (None, True, False) or isinstance(fused, int) and not isinstance(fused, bool):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        self.fused = fused
        self._runner = Runner(compile=None if fused is not False else False)
        # where each stack's members live (ParamHome, per member tuple): not a cache, never reset
        self._homes: dict[tuple[Tensor, ...], ParamHome] = {}
        self._reset_caches()
        defaults = dict(lr=float(lr), betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.use_shadow = use_shadow
        self.state_precision = state_precision
        self._pulse = make_pulse(pulse, float(lr), self.noise_floor, self.stop_thresholds, self.rule_kind)
        self._state_shapes: dict[Tensor, torch.Size] = {}  # each parameter's shape when its states were made
        self._recorded_sum: Tensor | None = None  # running sum of the recorded micro-batch losses
        self._recorded_count = 0
        self.skipped_steps = 0
        self._warned_skip = False
        super().__init__(params, defaults)
        self._watch_states()

    @classmethod
    def _family_name(cls) -> str:
        """The Emo family this optimizer belongs to (``"EmoSens"`` for ``EmoSens8bit`` or a subclass)."""
        return next((c.__name__ for c in cls.__mro__ if c.__name__ in FAMILIES and c.__module__.startswith("emoq.")),
                    cls.__name__)

    # ------------------------------------------------------------------ validation
    eps_in_denominator = False  # EmoSens and EmoAiry divide by (... + eps): they need eps > 0

    @classmethod
    def _check_hparams(cls, betas: Any, eps: Any, weight_decay: Any) -> None:
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            if not (_is_number(beta) and 0.0 <= beta < 1.0):
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
        if not (_is_number(eps) and math.isfinite(eps) and eps >= 0.0):
            raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
        if cls.eps_in_denominator and not eps >= torch.finfo(torch.float32).tiny:
            # eps = 0 (or one that is 0 in fp32) makes 0/0 = NaN wherever a gradient entry is 0
            raise ValueError(f"eps must be >= 1.2e-38 for {cls._family_name()} (it divides by (... + eps)), "
                             f"got {eps!r}")
        if not (_is_number(weight_decay) and math.isfinite(weight_decay) and weight_decay >= 0.0):
            raise ValueError(f"weight_decay must be a finite float >= 0, got {weight_decay!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, validated first: a group that raises is not added."""
        name = type(self).__name__
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        unknown = sorted(str(k) for k in param_group if k not in GROUP_KEYS)
        if unknown:
            raise ValueError(f"param group key(s) {unknown} unknown to {name}: a group may set "
                             f"{', '.join(k for k in GROUP_KEYS if k not in ('params', 'initial_lr'))}; "
                             "state_precision, use_shadow, compensation, fused, min_lowbit_size are per optimizer")
        if "lr" in param_group and param_group["lr"] != self.defaults["lr"]:
            raise ValueError(
                f"param groups of {name} cannot set their own lr ({param_group['lr']!r}): "
                "lr is the scope of the one emoPulse shared by all groups; set it on the optimizer"
            )
        self._check_hparams(param_group.get("betas", self.defaults["betas"]),
                            param_group.get("eps", self.defaults["eps"]),
                            param_group.get("weight_decay", self.defaults["weight_decay"]))
        params = param_group.get("params")
        if isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering "
                            "of tensors in sets will change between runs. Please use a list instead.")
        params = [params] if isinstance(params, Tensor) else list(params) if params is not None else []
        for p in params:
            tensor = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # (name, param) pairs too
            if isinstance(tensor, Tensor) and torch.is_complex(tensor):
                raise ValueError(f"{name} does not support complex parameters")
            if isinstance(tensor, Tensor) and tensor.dtype == torch.float64:
                raise ValueError(FLOAT64_MESSAGE.format(name=name))
        super().add_param_group({**param_group, "params": params})
        group = self.param_groups[-1]
        group["betas"] = tuple(group["betas"])
        group["emo"] = None  # state_dict() puts the pulse record here: see state_dict()
        if self._pulse.eta is not None:
            group["lr"] = self._pulse.eta

    # ------------------------------------------------------------------ public state
    @property
    def pulse(self) -> float | None:
        """The step size used by the last step (``None`` before the first step)."""
        return self._pulse.eta

    @property
    def should_stop(self) -> bool:
        """The stop signal of the last step (advice; the optimizer never stops by itself)."""
        return self._pulse.should_stop

    @property
    def emo_pulse(self) -> EmoPulse:
        """The underlying :class:`~emoq.EmoPulse` (read it; do not feed it by hand)."""
        return self._pulse

    @property
    def last_loss(self) -> float | None:
        """The loss the pulse consumed at the last step (mean over ranks and micro-batches)."""
        return self._last_loss

    _last_loss: float | None = None

    # ------------------------------------------------------------------ loss intake
    def record_loss(self, loss: float | Tensor) -> None:
        """Record the loss of one micro-batch; the next ``step()`` uses the mean of all recorded.

        The losses are added up as they come, in float64 on the loss's device (no device sync),
        and the running sum is what ``state_dict()`` saves: a run resumed mid-accumulation takes
        exactly the step the uninterrupted one takes.
        """
        if isinstance(loss, Tensor):
            _check_loss_tensor(loss, "record_loss(loss)")
            value = loss.detach().reshape(())
            value = value.to(torch.float32 if value.device.type == "mps" else torch.float64)  # mps has no fp64
        else:
            value = torch.tensor(as_loss_float(loss, "record_loss(loss)"), dtype=torch.float64)
        self._recorded_sum = value if self._recorded_sum is None else self._recorded_sum + value
        self._recorded_count += 1

    def discard_recorded_losses(self) -> None:
        """Forget the micro-batch losses recorded since the last step (e.g. when a GradScaler
        skipped ``step()``, so they do not leak into the next update's mean)."""
        self._recorded_sum, self._recorded_count = None, 0

    def _take_loss(self, closure: Callable[[], Any] | None, loss: Any) -> tuple[Any, float]:
        """The step's loss; changes nothing (the recorded losses are dropped by ``step`` later)."""
        name = type(self).__name__
        sources = [closure is not None, loss is not None, self._recorded_count > 0]
        if sum(sources) > 1:
            raise RuntimeError(f"{name}.step() got a loss from more than one source (closure, loss=, "
                               "record_loss); give exactly one (discard_recorded_losses() drops the recorded ones)")
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            if result is None:
                raise RuntimeError(NO_LOSS_MESSAGE.format(name=name) + " (the closure returned None)")
            return result, as_loss_float(result, "the closure's return value")
        if loss is not None:
            return loss, as_loss_float(loss, "step(loss=...)")
        if self._recorded_count:
            return None, float(self._recorded_sum.item()) / self._recorded_count
        raise RuntimeError(NO_LOSS_MESSAGE.format(name=name))

    # ------------------------------------------------------------------ step
    def _params_with_grad(self) -> list[tuple[dict, list[Tensor]]]:
        """Per param group, its parameters to update, after checking everything that can fail.

        Runs before any parameter, state or the pulse changes, so a step that raises has changed
        nothing. Parameters without a gradient and zero-size parameters are skipped (a sharded
        parameter whose shard here is empty is not zero-size: it still joins the collectives).
        """
        out = []
        for i, group in enumerate(self.param_groups):
            self._check_group(i, group)
            params = self._group_params_with_grad(group)
            if params:
                out.append((group, params))
        return out

    def _check_group(self, i: int, group: dict) -> None:
        try:  # groups can be edited after construction
            self._check_hparams(group["betas"], group["eps"], group["weight_decay"])
        except ValueError as err:
            raise ValueError(f"{type(self).__name__} param group {i}: {err}") from None

    def _group_params_with_grad(self, group: dict) -> list[Tensor]:
        """The parameters of ``group`` to update, each checked (see :meth:`_params_with_grad`)."""
        name = type(self).__name__
        params = []
        shapes, needs_probe = self._state_shapes, self._pulse.needs_probe  # (hundreds of parameters: locals)
        for p in group["params"]:
            grad = p.grad
            if grad is None or p.numel() == 0:
                continue
            if grad.layout is not torch.strided:
                what = "sparse gradients" if grad.is_sparse else f"gradients of layout {grad.layout}"
                raise RuntimeError(f"{name} does not support {what}")
            if grad.is_complex():
                raise RuntimeError(f"{name} does not support complex gradients")
            if p.dtype == torch.float64:  # converted after construction (model.double())
                raise RuntimeError(FLOAT64_MESSAGE.format(name=name))
            shape = p.shape
            if grad.shape != shape:
                raise RuntimeError(f"{name}: a gradient of shape {tuple(grad.shape)} for a parameter of shape "
                                   f"{tuple(shape)}")
            made = shapes.get(p)
            if made is not None and made != shape and self.state.get(p):
                raise RuntimeError(f"{name}: a parameter's shape changed from {tuple(made)} to {tuple(shape)} "
                                   "after its optimizer states were made (p.data replaced?)")
            if needs_probe and self._layout(p).mesh is not None:  # bad shardings raise in _layout (first use)
                raise NotImplementedError(
                    f"{name}: pulse={self._pulse.name!r} does not support sharded (FSDP2/DTensor) parameters "
                    "yet (its probe of the starting point is not sharded); use pulse='v3.8' or 'v3.9'")
            params.append(p)
        return params

    def _plan(self) -> list[tuple[dict, Unit]]:
        """This step's units of work (each with its gradients), per param group, after checking
        everything that can fail, as :meth:`_params_with_grad`.

        A group whose parameters (by identity), gradients' presence, layout, dtypes and shapes are
        those of its last step reuses that step's plan after one pass over its parameters; any
        difference (including one that must raise) takes the full checks and regrouping
        (:meth:`_group_params_with_grad`, :meth:`_units`), so both give the same plan and errors."""
        out = []
        for i, group in enumerate(self.param_groups):
            self._check_group(i, group)
            units = self._cached_units(group)
            if units is None:
                units = self._units(group, self._group_params_with_grad(group))
            for unit in units:
                grads = [p.grad for p in unit.params]
                unit.grads[:] = locals_of(grads) if unit.dtensors else grads  # DTensor shards: the rows held here
                out.append((group, unit))
        return out

    def _cached_units(self, group: dict) -> list[Unit] | None:
        """The group's last plan if it still holds (see :meth:`_plan`), else ``None``."""
        cached = self._unit_cache.get(id(group))
        params = group["params"]
        if cached is None or len(cached[0]) != len(params):
            return None
        strided = torch.strided
        for p, q, want in zip(params, cached[0], cached[1]):
            if p is not q:
                return None
            g = p.grad
            if want is None:  # no gradient, or zero-size, when the plan was made
                if g is not None and p.numel() != 0:
                    return None
                continue
            shape, p_dtype, g_dtype, g_type = want
            if (g is None or type(g) is not g_type or g.layout is not strided or g.dtype is not g_dtype
                    or p.dtype is not p_dtype or g.shape != shape or p.shape != shape):
                return None
        return cached[2]

    def step(self, closure: Callable[[], Any] | None = None, *, loss: float | Tensor | None = None,
             recheck: Callable[[], Any] | None = None) -> Any:
        """One update. The loss comes from ``closure``, ``loss=`` or the recorded micro-batch losses.

        ``recheck`` (``pulse="adaptive"`` with an Adam-type rule, i.e. EmoSens, only; others raise
        ``ValueError`` before anything changes): a callable returning the loss of the *same*
        minibatch (all of this update's micro-batches, averaged like the step's loss) with the
        updated weights. It runs once after the update, under ``torch.no_grad()``; the pulse
        averages ``(loss - recheck()) / <g, x - x_new>`` and holds its growth while that average
        is under ``VETO`` (:class:`~emoq.pulse.EmoPulseAdaptive`). Cost: one forward per update and
        two reads of every gradient and parameter. Under ``torch.distributed`` every rank must
        call it (its value is averaged over ranks). A skipped step, or one that moved no
        parameter (none has a gradient), does not call it. If it raises, the update stays applied
        and no ratio is recorded.

        All or nothing: everything that can fail is checked before anything changes. A
        non-finite loss, or a gradient that is non-finite or whose sum of squares exceeds fp32
        max / 4 (:func:`grads_in_range`), skips the whole step (parameters, states and pulse
        untouched), warns once and increments ``skipped_steps``. Refuses to run under
        ``torch.compile`` (and where dynamo does not let the refusal through, runs eagerly: never a
        differently computed step).
        """
        if torch.compiler.is_compiling():
            _refuse_compile(type(self).__name__)
        if self._in_recheck:
            raise RuntimeError(f"{type(self).__name__}.step() was called from its own recheck; the recheck only "
                               "computes the minibatch's loss")
        pending, self._recheck_next = self._recheck_next, None
        if recheck is not None and pending is not None:
            raise RuntimeError(f"{type(self).__name__}.step() got recheck= and a recheck_next() one; give one")
        recheck = pending if recheck is None else recheck
        if recheck is not None:
            self._check_recheck(recheck)
        return self._step(closure, loss, recheck)

    _recheck_next: Callable[[], Any] | None = None
    _in_recheck = False

    def recheck_next(self, recheck: Callable[[], Any] | None) -> None:
        """Give the next ``step()`` its ``recheck`` (for integrations that do not call ``step()``
        themselves, such as :class:`~emoq.integrations.transformers.EmoCallback`); the next
        ``step()`` consumes it, applied or skipped. ``None`` withdraws one given."""
        if recheck is not None:
            self._check_recheck(recheck)
        self._recheck_next = recheck

    def _check_recheck(self, recheck: Any) -> None:
        if not callable(recheck):
            raise TypeError(f"recheck must be a callable returning the minibatch's loss, got {type(recheck).__name__}")
        if not self._pulse.uses_recheck:
            raise ValueError(f"{type(self).__name__}: recheck= needs {self._pulse.RECHECK_NEEDS}; this optimizer's "
                             f"pulse is {self._pulse.name!r}, its rule kind {self._pulse.rule_kind!r}")

    @torch.compiler.disable(reason="an emoq step runs eagerly (its low-bit kernels are compiled on their own)")
    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None, loss: Any, recheck: Callable[[], Any] | None = None) -> Any:
        self._adopt_replaced_states()
        if closure is None and loss is None and self._is_state_init_step():
            self._init_states()
            return None
        result, loss_value = self._take_loss(closure, loss)
        if closure is not None:  # the closure may have written states too
            self._adopt_replaced_states()
        units = self._plan()
        try:
            grads_ok = self._gradient_stats([unit for _, unit in units])
            device = units[0][1].params[0].device if units else None
            loss_value, finite = reduce_loss(loss_value, grads_ok, device)
            if finite:
                self._pulse.check_loss(loss_value)  # a loss the pulse refuses: nothing has changed yet
            recorded = (self._recorded_sum, self._recorded_count)
            self.discard_recorded_losses()
            if not finite:
                self.skipped_steps += 1
                if not self._warned_skip:
                    self._warned_skip = True
                    warnings.warn(f"{type(self).__name__}: non-finite loss, or a gradient that is non-finite or so "
                                  "large its square overflows fp32; step skipped (parameters, states and pulse "
                                  "unchanged; see .skipped_steps; warned once)", RuntimeWarning, stacklevel=2)
                return result
            undo = _Undo(self, recorded)
            self._last_loss = loss_value
            done = None  # units written, once the first starts
            try:
                if recheck is not None:
                    dot_before = grad_dot_params(p for _, u in units for p in u.params)
                probe = None  # only a pulse that measures tensors (the adaptive one) gets the parameter list
                if self._pulse.needs_probe:
                    probe = self._pulse.measure([p for _, u in units for p in u.params], self.state)
                    undo.probed = self._written - undo.written
                lr = self._pulse.update(loss_value, probe)
                hypers: dict[tuple, tuple[Hyper, Tensor | None]] = {}  # per group and device
                done = 0
                for group, unit in units:
                    key = (id(group), unit.params[0].device)
                    if key not in hypers:
                        h = Hyper.of(lr, group, self._pulse.steps)
                        hypers[key] = (h, h.as_tensor(key[1]) if self._runner.compiling else None)
                    self._step_unit(group, unit, *hypers[key])
                    done += 1
            except BaseException as exc:  # out of memory, KeyboardInterrupt in the middle of the update
                undo(exc, done, len(units))
                raise
            for group in self.param_groups:
                group["lr"] = lr
            if recheck is not None and units:  # no parameter moved: nothing to recheck
                self._recheck(recheck, loss_value, dot_before, units, device)
            return result
        finally:  # the units are cached: holding this step's gradients would keep them alive after
            for _, unit in units:  # zero_grad(set_to_none=True), through the next backward (+1x gradient memory)
                unit.grads.clear()
                unit.g, unit.stats = None, ()
            self._written.clear()  # this step's own writes into the states

    def _recheck(self, recheck: Callable[[], Any], before: float, dot_before: float, units: list, device: Any) -> None:
        """After an applied update: the minibatch's loss again, and the ratio for the pulse."""
        predicted = dot_before - grad_dot_params(p for _, u in units for p in u.params)
        self._in_recheck = True
        try:
            value = recheck()
            after = as_loss_float(value, "recheck()'s return value")
        except BaseException as exc:
            exc.add_note(f"{type(self).__name__}: the update was applied; its recheck failed, so the pulse "
                         "recorded no ratio for it")
            raise
        finally:
            self._in_recheck = False
        after, finite = reduce_loss(after, True, device)
        self._pulse.record_ratio(recheck_ratio(before, after if finite else math.inf, predicted))

    def _adopt_replaced_states(self) -> None:
        """Take states written from outside since the last step as :meth:`load_state_dict` takes
        saved ones.

        The step keeps plain views of every state between steps (its cached plans and stacks), so
        ``opt.state[p]["m"] = t``, ``opt.state[p] = {}`` or ``del opt.state[p]`` (ReLoRA-style
        resets) would otherwise be ignored while ``state_dict()`` saved the new values. The state
        dicts note such writes (:class:`_WatchedStates`; nothing to check when there were none);
        a written parameter's states are checked and rebuilt through the storage policy
        (quantized for a low-bit optimizer) like saved ones, an emptied state starts afresh as in
        torch, and an invalid one raises ``ValueError`` naming it before anything changes. An
        ``opt.state`` replaced as a whole is taken the same way for every parameter. In-place
        changes (``opt.state[p]["m"].zero_()``) need none of this.
        """
        state, written = self.state, self._written
        whole = not (type(state) is _WatchedStates and state.written is written) or _EVERY in written
        if not whole and not written:
            return
        if not isinstance(state, dict):
            raise TypeError(f"{type(self).__name__}.state must be a dict of per-parameter dicts, got "
                            f"{type(state).__name__}")
        params = self._params_by_index()
        index = {p: i for i, p in enumerate(params)}
        todo = params if whole else [p for p in written if p in index]  # others are stepped by no group
        rebuilt = {}
        for p in todo:
            now = state.get(p)
            where = f"parameter {index[p]} (shape {tuple(p.shape)})"
            if now is not None and not isinstance(now, dict):
                raise ValueError(f"{type(self).__name__}: the state of {where} was replaced by a "
                                 f"{type(now).__name__}, not a dict")
            try:
                rebuilt[p] = self._check_param_state(p, self._export_state(p, now or {}), where, self.compensation)
            except ValueError as err:
                err_text = str(err).removeprefix("state_dict: ")
                raise ValueError(f"{type(self).__name__}: a state written since the last step: {err_text} (change "
                                 "states in place, e.g. opt.state[p]['m'].zero_(), or use load_state_dict)") from None
        if whole:  # everything checked: a fresh watched container, keeping any other key it held
            self.state = _WatchedStates(written, {k: v for k, v in state.items() if k not in index})
        for p, st in rebuilt.items():
            self.state[p] = st
            if st:
                self._state_shapes[p] = p.shape
        self._reset_caches()
        written.clear()

    def _is_state_init_step(self) -> bool:
        """Whether this ``step()`` is torch.distributed.checkpoint's state initialisation.

        ``torch.distributed.checkpoint.state_dict`` (``get_optimizer_state_dict`` /
        ``set_optimizer_state_dict``, used by accelerate and the HF Trainer under FSDP2) builds
        the states of an optimizer that has none by calling ``step()`` with zero gradients and
        every group's ``lr`` set to 0. An emoq group's ``lr`` is the scope (> 0) or the pulse
        (>= its floor), never 0, so no loss + every ``lr`` 0 + all-zero gradients is that call.
        """
        if not self.param_groups or any(float(g["lr"]) != 0.0 for g in self.param_groups):
            return False
        grads = [local(p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
        return all(not bool(g.any()) for g in grads if not g.is_sparse)

    def _init_states(self) -> None:
        """Allocate the states of every parameter with a gradient, and nothing else: no pulse,
        no weight decay, no skip count, recorded losses kept (the initialisation step above)."""
        for _, params in self._params_with_grad():
            for p in params:
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
        self._written.clear()

    def _layout(self, p: Tensor) -> Layout:
        layout = self._layouts.get(p)
        if layout is None:
            layout = self._layouts[p] = Layout(p)
        return layout

    def _quantize(self, layout: Layout, spec: StateSpec) -> bool:
        """The low-bit decision for one state, from global shapes (the same on every rank)."""
        if self.state_precision not in LOWBIT:
            return False
        return layout.quantizable(layout.state(spec.shape, spec.per_row), self._storage.block, self.min_lowbit_size)

    # ------------------------------------------------------------------ units: a parameter, or a stack
    def _units(self, group: dict, params: list[Tensor]) -> list[Unit]:
        """``params`` (checked, with gradients) as units of work: small parameters sharing shape,
        dtypes and extent are stacked (when compiling), everything else runs alone. The plan is
        kept for :meth:`_cached_units`, with what each parameter of the group was (``None``: not
        updated; else its shape, dtype, and its gradient's dtype and type)."""
        stackable = self._runner.compiling and not self.use_shadow
        by_kind: dict[tuple, list[Tensor]] = {}
        for p in params:
            extent = self._extent(p)
            kind = (tuple(p.shape), p.dtype, p.grad.dtype, extent)
            if not stackable or p.numel() >= SMALL or not local(p).is_contiguous():
                kind = kind + (id(p),)
            by_kind.setdefault(kind, []).append(p)
        units = [Unit(tuple(ps), len(ps) > 1, kind[3]) for kind, ps in by_kind.items()]
        for unit in units:
            unit.dtensors = any(is_dtensor(t) for p in unit.params for t in (p, p.grad))
        updated = {id(p) for p in params}
        wants = tuple((p.shape, p.dtype, p.grad.dtype, type(p.grad)) if id(p) in updated else None
                      for p in group["params"])
        self._unit_cache[id(group)] = (tuple(group["params"]), wants, units)
        return units

    def _gradient_stats(self, units: list[Unit]) -> bool:
        """The rule's statistics of every unit's gradient (summed over shards) and whether every
        gradient is in range. A unit the rule has statistics for is checked through the first one
        (its sum of squares, from the same pass); a large contiguous fp32 CPU one by its sum of
        squares from ``torch.dot`` (:data:`DOT_MIN`); the others by one multi-tensor norm.

        A sharded parameter's (``extent.sharded``) partial sums, and the squared norms of its
        shard when the rule has no statistics, are summed over the shards with one collective per
        shard group and step, so the statistics and the range check are those of the whole
        tensor on every rank (docs/distributed.md)."""
        fn = type(self).stats
        plain: list[Tensor] = []
        squares: list[Tensor] = []
        dots: list[Tensor] = []  # sums of squares of the plain gradients checked by torch.dot
        sharded: dict[Callable[[Tensor], Tensor], list[Unit]] = {}
        for unit in units:
            g = unit.stack("g", unit.grads)[0] if unit.stacked else unit.grads[0]
            unit.g = g
            unit.stats = ()
            if fn is not None and self._uses_stats(unit.params[0]):
                # an empty shard (zero rows here) runs eagerly: it only contributes zeros
                unit.stats = self._runner.stats(fn, unit.extent, g) if g.numel() else param_stats(fn, unit.extent, g)
                if not unit.extent.sharded:
                    squares.append(unit.stats[0].reshape(-1))
            elif not unit.extent.sharded:
                if dot_checked(g):
                    dots.append(sum_of_squares(g))
                else:
                    plain.append(g)
            if unit.extent.sharded:
                sharded.setdefault(unit.extent.sum_shards, []).append(unit)
        for sum_shards, members in sharded.items():
            partial = [u.stats or (torch.stack(grad_norms(u.grads)).square(),) for u in members]
            total = sum_shards(torch.cat([t.reshape(-1).float() for ts in partial for t in ts]))
            sums = iter(total.split([t.numel() for ts in partial for t in ts]))
            for unit, ts in zip(members, partial):
                summed = tuple(next(sums).view(t.shape).clone() for t in ts)
                unit.stats = summed if unit.stats else ()
                squares.append(summed[0].reshape(-1))
        ok = grads_in_range(grad_norms(plain), squares + dots)
        if not ok and (plain or dots):  # a stack's joint norm may exceed the limit while each member is within it
            ok = grads_in_range([], [torch.stack([n.square() for n in grad_norms(u.grads)]) for u in units
                                     if not u.stats and not u.extent.sharded] + squares)
        return ok

    def _step_unit(self, group: dict, unit: Unit, h: Hyper, c: Tensor | None) -> None:
        opts = self._rule_options(group)
        if not unit.stacked:
            p = unit.params[0]
            sig, parts, residual = self._item(p)
            before = None
            if self.use_shadow:  # the shadow step runs eagerly on the working value, then the rule
                shadow = self.state[p]["shadow"]
                def before(x: Tensor) -> None:  # noqa: E306
                    self._shadow_step(x, shadow)
            elif self._chunked(sig, unit, residual):
                values, grads = local(p).view(-1), unit.g.view(-1)
                for lo, hi in chunk_spans(values.numel(), sig.layouts, CHUNK):
                    pieces = [slice_kernel_args(lay.precision, pt, lo, hi) for lay, pt in zip(sig.layouts, parts)]
                    self._runner.step(self.rule, opts, chunk_sig(sig, hi - lo), values[lo:hi], grads[lo:hi],
                                      unit.stats, pieces, None, h, c)
                return
            self._run(opts, sig, local(p), unit, parts, residual, h, c, before)
            return
        sig, parts, residual = unit.kernel_args or self._stack(unit)
        members = unit.params
        if unit.dtensors:  # DTensor shards (the rows held here): their storage is the DTensor's, copied
            members = locals_of(members)
            values, views = unit.stack("values", members)  # under no_grad: plain copies
            self._run(opts, sig, values, unit, parts, residual, h, c)
            torch._foreach_copy_(members, views)
            return
        home = self._home(unit)
        ptrs = home.where(members)
        back = self._move_in(home, members, ptrs) if ptrs != home.ptrs else ()  # () on the usual step
        self._run(opts, sig, home.buf, unit, parts, residual, h, c)
        if back:
            torch._foreach_copy_([members[i] for i in back], [home.views[i] for i in back])
        torch.autograd.graph.increment_version(members)  # written in place: autograd's saved-tensor check sees it

    def _home(self, unit: Unit) -> ParamHome:
        """The buffer a stack's members live in: the unit's, else the one kept for the same members,
        else a new one (when the members' shape, dtype or device no longer fit, too)."""
        members = unit.params
        home = unit.home
        if home is None or not home.fits(members[0]):
            home = self._homes.get(members)
            if home is None or not home.fits(members[0]):
                home = ParamHome(members[0], len(members))
            unit.home = home
        return home

    def _move_in(self, home: ParamHome, members: tuple[Tensor, ...], ptrs: list[int]) -> list[int]:
        """:meth:`ParamHome.enter`, and keep ``home`` while a member lives in it: a home nobody moved
        into (its members live in another stack's, e.g. when gradients come and go) is scratch for
        this plan only, as a stack's copy was."""
        back = home.enter(members, ptrs)
        if home.lived_in():
            self._homes[members] = home
        elif self._homes.get(members) is home:
            del self._homes[members]
        return back

    def _chunked(self, sig: ParamSig, unit: Unit, residual: Tensor | None) -> bool:
        """Whether ``unit`` (one parameter) is stepped in pieces of at most :data:`CHUNK` elements:
        an element-wise rule, compiled, more than ``CHUNK`` fp32 elements held whole here, a
        low-bit state and none rounded stochastically (its dither numbers the elements)."""
        p = local(unit.params[0])
        return (self.elementwise and self._runner.compiling and p.numel() > CHUNK and residual is None
                and p.dtype == torch.float32 and unit.g.dtype == torch.float32 and not unit.extent.sharded
                and p.is_contiguous() and unit.g.is_contiguous()
                and any(lay.precision in LOWBIT for lay in sig.layouts)
                and all(lay.shape == tuple(p.shape) and not rounds_stochastically(lay.precision, lay.signed)
                        for lay in sig.layouts))

    def _run(self, opts: dict, sig: ParamSig, p: Tensor, unit: Unit, parts: list[list[Tensor]],
             residual: Tensor | None, h: Hyper, c: Tensor | None,
             before: Callable[[Tensor], None] | None = None) -> None:
        """The rule on plain tensors (never a DTensor); an empty shard eagerly (nothing to compile)."""
        if p.numel() == 0:  # a shard with no rows here: only a replicated state (EmoAiry's col) changes
            param_step(self.rule, opts, sig, p, unit.g, unit.stats, parts, residual, h, before)
        else:
            self._runner.step(self.rule, opts, sig, p, unit.g, unit.stats, parts, residual, h, c, before)

    def _stack(self, unit: Unit) -> tuple[ParamSig, list[list[Tensor]], Tensor | None]:
        """The stacked states of ``unit`` (built on first use: each member's state becomes a view
        of one stacked buffer); rebuilt if a member's states were replaced."""
        cached = self._stacks.get(unit.params)
        if cached is not None:  # dropped by load_state_dict and by restacking a member elsewhere
            unit.kernel_args = cached
            return cached
        for p in unit.params:  # a member's states move to the new buffer: its old stack is stale
            self._stacks.pop(self._stacked_in.get(p), None)
            self._stacked_in[p] = unit.params
        items = [self._item(p) for p in unit.params]  # allocates missing states
        specs = self._state_specs(unit.params[0])
        parts: list[list[Tensor]] = []
        layouts = []
        for name, layout in zip(specs, items[0][0].layouts):
            kparts, members = self._storage.stack([self.state[p][name] for p in unit.params])
            parts.append(kparts)
            layouts.append(layout._replace(shape=(len(unit.params),) + layout.shape, members=len(unit.params)))
            for p, view in zip(unit.params, members):
                self.state[p][name] = view
        residual = None
        if items[0][2] is not None:
            residual = torch.stack([self.state[p]["residual"] for p in unit.params])
            for p, view in zip(unit.params, residual.unbind(0)):
                self.state[p]["residual"] = view
        first = items[0][0]
        shape = (len(unit.params),) + first.shape
        sig = ParamSig(tuple(layouts), first.extent, first.p_dtype, first.g_dtype, first.compensation, shape)
        for p in unit.params:
            self._items.pop(p, None)  # the per-parameter parts now point at replaced states
        self._stacks[unit.params] = unit.kernel_args = (sig, parts, residual)
        return sig, parts, residual

    def _item(self, p: Tensor) -> tuple[ParamSig, list[list[Tensor]], Tensor | None]:
        g = p.grad
        cached = self._items.get(p)
        if cached is None or cached[0].g_dtype != g.dtype or cached[0].p_dtype != p.dtype:
            cached = self._items[p] = self._build_item(p, g)
        return cached

    def _build_item(self, p: Tensor, g: Tensor) -> tuple[ParamSig, list[list[Tensor]], Tensor | None]:
        """The static signature and plain tensors of ``p``'s step (cached until states change)."""
        state = self.state[p]
        specs = self._state_specs(p)
        if not state.keys() - {PROBE_STATE}:  # the adaptive pulse's probe may have come first
            self._init_state(p, state)
        missing = [n for n in specs if n not in state]
        if missing:
            raise KeyError(f"{type(self).__name__}: states {missing} missing for a parameter of shape "
                           f"{tuple(p.shape)}")
        where = self._layout(p)
        layouts = tuple(StateLayout(precision_of(state[n]), bool(getattr(state[n], "signed", spec.signed)),
                                    tuple(state[n].shape), where.first_element(spec.shape, spec.per_row))
                        for n, spec in specs.items())
        parts = [self._storage.kernel_args(state[n]) for n in specs]
        residual = None
        if compensate.needs_residual(p, self.compensation):
            residual = state.get("residual")
            if residual is None:
                residual = state["residual"] = compensate.new_residual(local(p), self.compensation)
        mode = self.compensation if compensate.needs_compensation(p) else "none"
        sig = ParamSig(layouts, self._extent(p), p.dtype, g.dtype, mode, tuple(local(p).shape))
        return sig, parts, residual

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        self._state_shapes[p] = p.shape
        layout = self._layout(p)
        for name, spec in self._state_specs(p).items():
            shape = layout.state(spec.shape, spec.per_row).local_shape
            state[name] = self._storage.zeros(shape, signed=spec.signed, device=p.device,
                                              quantize=self._quantize(layout, spec))
        if self.use_shadow:
            state["shadow"] = local(p).detach().clone()

    _NOT_RULE_STATES = ("shadow", "residual", PROBE_STATE)

    def _shadow_step(self, p: Tensor, shadow: Tensor) -> None:
        """SPEC.md "Optional shadow", applied before the moment update."""
        scalar, trust = self._pulse.scalar, abs(self._pulse.trust)
        ratio = 1.0 - abs(scalar) if abs(scalar) > 0.625 else 0.0
        if ratio > 0:
            # two roundings, then the sum, as the spec's (1 - ratio)*p + trust*shadow: add(alpha=) would
            # fuse trust*shadow into one FMA on CPU and differ in the last bit (found by the fuzz test)
            p.mul_(1.0 - ratio).add_(shadow.to(p.dtype).mul(trust))
        else:
            shadow.add_((p.to(shadow.dtype) - shadow).mul_(0.1 * trust))

    # ------------------------------------------------------------------ family hooks
    rule: Callable[..., tuple[Tensor, tuple[Tensor, ...]]]
    """The family's update rule ``(p, g, states, stats, h, extent, **options) -> (p, states)``, out of place."""

    stats: Callable[..., tuple[Tensor, ...]] | None = None
    """Sums over a gradient's rows the rule needs, ``(g, extent) -> (sum g^2, ...)`` (partial
    over the rows held here; the engine sums all but the first over shards), or ``None``."""

    elementwise: bool = False
    """Whether :attr:`rule` is element-wise (each output element depends only on the same element
    of the inputs and on the scalars), so a large parameter may be stepped in pieces
    (:data:`CHUNK`); EmoSens and EmoCats. A subclass whose rule is not must set it ``False``."""

    def _uses_stats(self, p: Tensor) -> bool:
        """Whether ``p``'s step needs :attr:`stats` (by default: whenever the family has them)."""
        return True

    def _state_specs(self, p: Tensor) -> dict[str, StateSpec]:
        raise NotImplementedError

    def _rule_options(self, group: dict) -> dict:
        """Static keyword arguments of ``rule`` for a param group (e.g. EmoSens' ``decay``)."""
        return {}

    def _extent(self, p: Tensor) -> Extent:
        """The whole parameter ``p`` is part of: its shape (a DTensor's global shape) and, when its
        rows are split over ranks, the sum over the shards (emoq.distributed.ShardSum)."""
        layout = self._layout(p)
        return Extent(layout.param_shape, layout.sum_shards) if layout.sharded else Extent(layout.param_shape)

    _CACHES = ("_items", "_unit_cache", "_stacks", "_stacked_in", "_layouts")

    def _reset_caches(self) -> None:
        """Forget the per-step plans (signatures, state views, stacks); they are rebuilt on demand."""
        self._items: dict[Tensor, tuple[ParamSig, list[list[Tensor]], Tensor | None]] = {}
        self._unit_cache: dict[int, tuple[tuple, tuple, list[Unit]]] = {}  # per param group (by id)
        self._stacks: dict[tuple, tuple] = {}
        self._stacked_in: dict[Tensor, tuple] = {}
        self._layouts: dict[Tensor, Layout] = {}  # how each parameter is split over ranks (emoq.distributed)

    def _watch_states(self) -> None:
        """Make ``self.state`` a :class:`_WatchedStates` (after torch set a plain one), nothing noted."""
        self._written: set = set()
        self.state = _WatchedStates(self._written, self.state)
        self._written.clear()

    # ------------------------------------------------------------------ checkpoints
    def _params_by_index(self) -> list[Tensor]:
        """Parameters in the order torch numbers them in ``state_dict()``."""
        return list(chain.from_iterable(g["params"] for g in self.param_groups))

    def _state_layout(self, p: Tensor, name: str) -> tuple[Layout, StatePlacement, StateSpec | None]:
        """(layout of the parameter, layout of its state ``name``, spec or ``None`` for shadow/residual)."""
        layout = self._layout(p)
        spec = self._state_specs(p).get(name)
        if spec is None:  # shadow, residual: shaped like the parameter
            return layout, layout.state(tuple(p.shape), True), None
        return layout, layout.state(spec.shape, spec.per_row), spec

    def _export_state(self, p: Tensor, st: dict[str, Any]) -> dict[str, Any]:
        """One parameter's states as ``state_dict()`` saves them (plain tensors; others as they are)."""
        exported = {}
        for name, value in st.items():
            if not isinstance(value, Tensor):
                exported[name] = value
                continue
            layout, st_layout, spec = self._state_layout(p, name)
            plain = value if spec is None else self._storage.export(value)
            exported[name] = layout.export(plain, st_layout)
        return exported

    def _emo_record(self) -> dict[str, Any]:
        return {
            "format": 3,
            "family": self._family_name(),
            "use_shadow": self.use_shadow,
            "pulse": self._pulse.state_dict(),
            "skipped_steps": self.skipped_steps,
            "state_precision": self.state_precision,
            "compensation": self.compensation,
            "recorded_sum": None if self._recorded_sum is None else self._recorded_sum.detach().to("cpu", copy=True),
            "recorded_count": self._recorded_count,
        }

    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state dict; every param group carries ``"emo"``: the pulse state, skip
        counter, recorded micro-batch losses, family and precision.

        The record lives in ``param_groups`` because ``torch.distributed.checkpoint.state_dict``
        (what accelerate and the HF Trainer use under FSDP2) keeps only ``state`` and
        ``param_groups``; live groups hold the key with ``None`` because its flattened format
        restores only the group keys a live optimizer has. States are plain tensors
        (``torch.load(weights_only=True)`` works); those of a sharded (DTensor) parameter are
        DTensors, low-bit ones as DTensor codes and scales in a row-aligned layout, so
        ``torch.distributed.checkpoint`` saves each rank's shard.
        """
        sd = super().state_dict()
        params = self._params_by_index()
        state = {}
        for pid, st in sd["state"].items():
            state[pid] = self._export_state(params[pid], st)
        sd["state"] = state
        record = self._emo_record()
        for group in sd["param_groups"]:
            group["emo"] = copy.deepcopy(record)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`, saved at any ``state_precision``.

        Also takes emoq 0.1's format (the record at the top level) and the output of
        ``torch.distributed.checkpoint.state_dict`` (keys by name, DTensor states; a full state
        dict loaded into a sharded optimizer keeps each rank's rows). Everything is checked
        before anything changes (:meth:`_check_state_dict`): a state dict of another family,
        with another ``use_shadow``, with states of the wrong names or shapes, or with a NaN/inf
        in a state or in the pulse raises ``ValueError`` naming the parameter and the mismatch,
        and leaves this optimizer as it was.
        """
        states, pulse, skipped, recorded = self._check_state_dict(state_dict)
        # torch's loader would cast floating states to the parameter's dtype: give it the groups
        # only, and put the states rebuilt through the storage policy (any saved precision) in place.
        groups = [{k: v for k, v in g.items() if k != "emo"} for g in state_dict["param_groups"]]
        super().load_state_dict({"state": {}, "param_groups": groups})
        for group in self.param_groups:
            group["emo"] = None
        self._state_shapes = {}
        for p, st in states.items():
            self.state[p] = st
            self._state_shapes[p] = p.shape
        self._reset_caches()
        self._written.clear()
        self._pulse.load_state_dict(pulse)
        self.skipped_steps = skipped
        self._recorded_sum, self._recorded_count = recorded

    @staticmethod
    def _saved_record(state_dict: dict[str, Any]) -> Any:
        """The saved ``"emo"`` record: from the param groups (this format) or the top level (emoq 0.1)."""
        groups = state_dict.get("param_groups")
        if isinstance(groups, list):
            for group in groups:
                if isinstance(group, dict) and group.get("emo") is not None:  # None: a live group's slot
                    return group["emo"]
        return state_dict.get("emo")

    def _check_state_dict(self, state_dict: Any) -> tuple[dict[Tensor, dict[str, Any]], dict, int, tuple]:
        """Validate a saved state dict against this optimizer and rebuild its states, changing nothing.

        Returns ``(states by parameter, pulse state, skipped_steps, (recorded sum, count))``.
        """
        name = type(self).__name__
        emo = self._saved_record(state_dict) if isinstance(state_dict, dict) else None
        if emo is None:
            raise KeyError(f"not an emoq state_dict (no 'emo' record in its param_groups): {name} needs the pulse "
                           "state to resume; load a state_dict saved by an emoq optimizer")
        saved_groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(emo, dict) or emo.get("format") not in (1, 2, 3):
            found = emo.get("format") if isinstance(emo, dict) else emo
            raise ValueError(f"emoq state_dict: unknown 'emo' format {found!r}")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            raise ValueError("emoq state_dict: 'param_groups' must be a list and 'state' a dict")
        family = emo.get("family")
        if family is not None and family != self._family_name():
            ours = name if name == self._family_name() else f"{name} (an {self._family_name()})"
            raise ValueError(f"state_dict of an {family} optimizer cannot be loaded into {ours}")
        shadow = emo.get("use_shadow")
        if shadow is not None and bool(shadow) != self.use_shadow:
            raise ValueError(f"state_dict saved with use_shadow={bool(shadow)}, this {name} has "
                             f"use_shadow={self.use_shadow}")
        # param groups: the same layout, valid hyper-parameters
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param group(s), {name} has {len(self.param_groups)}")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
                raise ValueError(f"state_dict param group {i} has no 'params' list")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict param group {i} has {len(saved['params'])} parameters, {name}'s has "
                                 f"{len(group['params'])}")
            try:
                self._check_hparams(saved.get("betas"), saved.get("eps"), saved.get("weight_decay"))
            except ValueError as err:
                raise ValueError(f"state_dict param group {i}: {err}") from None
        try:  # the pulse first: another pulse= variant is the likeliest mismatch, named as such
            pulse = self._pulse.check_state_dict(emo.get("pulse"))
        except (KeyError, ValueError) as err:
            raise ValueError(f"state_dict pulse: {err}") from None
        ids = list(chain.from_iterable(g["params"] for g in saved_groups))
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        if len(set(ids)) != len(ids):
            raise ValueError("state_dict param groups list a parameter id twice")
        id_map = dict(zip(ids, params))
        index = dict(zip(ids, range(len(ids))))
        states = {}
        for pid, saved in saved_state.items():
            if pid not in id_map:
                raise ValueError(f"state_dict has a state for parameter id {pid!r}, which no param group lists")
            p = id_map[pid]
            where = f"parameter {index[pid]} (shape {tuple(p.shape)})"
            if not isinstance(saved, dict):
                raise ValueError(f"state_dict: the state of {where} is not a dict")
            states[p] = self._check_param_state(p, saved, where, emo.get("compensation"))
        # counters, recorded micro-batch losses
        skipped = emo.get("skipped_steps", 0)
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise ValueError(f"state_dict 'skipped_steps' must be an int >= 0, got {skipped!r}")
        return states, pulse, skipped, self._check_recorded(emo)

    def _check_param_state(self, p: Tensor, saved: dict[str, Any], where: str, saved_compensation: Any) -> dict:
        """One parameter's saved states, checked and rebuilt through the storage policy (each taken
        to this rank's shard first when ``p`` is sharded)."""
        specs = self._state_specs(p)
        present = [n for n in saved if n not in ("residual", PROBE_STATE)]
        expected = list(specs) + (["shadow"] if self.use_shadow else [])
        if saved.keys() - {PROBE_STATE} and sorted(present) != sorted(expected):
            raise ValueError(f"state_dict: {where} has states {sorted(present)}, {type(self).__name__} "
                             f"(use_shadow={self.use_shadow}) keeps {sorted(expected)} for it")
        rebuilt: dict[str, Any] = {}
        for name, value in saved.items():
            if name == PROBE_STATE:  # the adaptive pulse's subset of the starting point (emoq/probe.py)
                problem = check_probe_state(value, p) if self._pulse.needs_probe else "kept by no pulse but 'adaptive'"
                if problem:
                    raise ValueError(f"state_dict: {name} of {where} {problem}")
                rebuilt[name] = value.detach().to(device=p.device, dtype=torch.float32, copy=True)
                continue
            layout, st_layout, spec = self._state_layout(p, name)
            value = layout.import_(value, st_layout)
            if name == "shadow":
                problem = check_saved_state(value, st_layout.local_shape, True, plain_only=True)
                if problem:
                    raise ValueError(f"state_dict: shadow of {where} {problem}")
                rebuilt[name] = value.detach().to(device=p.device, dtype=p.dtype, copy=True)
            elif name == "residual":  # compensation buffer: param dtype, or int8 ulp units
                if not isinstance(value, Tensor) or tuple(value.shape) != st_layout.local_shape:
                    raise ValueError(f"state_dict: residual of {where} is not a tensor of the parameter's shape")
                want = torch.int8 if self.compensation == "error_feedback8" else p.dtype
                # kept when it means the same thing here; else dropped (less than one ulp of the weight)
                if (compensate.needs_compensation(p) and self.compensation == saved_compensation
                        and value.dtype == want and bool(torch.isfinite(value.float()).all())):
                    rebuilt[name] = value.detach().to(device=p.device, copy=True)
            else:
                problem = check_saved_state(value, st_layout.local_shape, spec.signed)
                if problem:
                    raise ValueError(f"state_dict: state {name!r} of {where} {problem}")
                rebuilt[name] = self._storage.import_(value, signed=spec.signed, device=p.device,
                                                      quantize=self._quantize(layout, spec))
        return rebuilt

    @staticmethod
    def _check_recorded(emo: dict[str, Any]) -> tuple[Tensor | None, int]:
        if "recorded_count" not in emo:  # format 1: a list of floats, added up as record_loss would
            values = emo.get("recorded", [])
            if not isinstance(values, list) or not all(_is_number(v) for v in values):
                raise ValueError("state_dict 'recorded' must be a list of numbers")
            total = None
            for v in values:
                t = torch.tensor(float(v), dtype=torch.float64)
                total = t if total is None else total + t
            return total, len(values)
        total, count = emo.get("recorded_sum"), emo["recorded_count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"state_dict 'recorded_count' must be an int >= 0, got {count!r}")
        if count == 0 and total is None:
            return None, 0
        if not (isinstance(total, Tensor) and total.numel() == 1 and total.is_floating_point()) or count == 0:
            raise ValueError("state_dict 'recorded_sum' must be a one-element float tensor when 'recorded_count' > 0")
        return total.detach().reshape(()).clone(), count

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults/state/param_groups, which leaves a pickled emoq optimizer
        # without its pulse, storage and counters: keep everything but the step caches (compiled
        # functions, state views), rebuilt on demand
        return {k: v for k, v in self.__dict__.items() if k not in ("_runner", "_written", "_homes") + self._CACHES}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._watch_states()
        self._runner = Runner(compile=None if self.__dict__.get("fused") is not False else False)
        self._homes = {}
        self._reset_caches()

    def __deepcopy__(self, memo: dict[int, Any]) -> EmoOptimizer:
        """A deep copy (torchao's low-bit states have no ``aten.clone``: they are rebuilt from their parts)."""
        _memo_lowbit(self.state.values(), memo)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__getstate__().items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        new._runner = Runner(self._runner.compile)  # compiled functions are shared process-wide anyway
        new._homes = {}
        new._reset_caches()
        new._watch_states()
        return new
