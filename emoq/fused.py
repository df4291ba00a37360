"""Fused per-parameter steps: dequantize -> rule -> requantize in one (compiled) function.

The reference maths lives in the rule functions (``emoq/optim/sens.py``, ``cats.py``), which
run eagerly in SPEC order and are reference-exact. This module holds the *fast* form of the
two element-wise rules (EmoSens, EmoCats), written out-of-place with the step's scalars as
one small tensor (so a new step size never triggers a recompile), and the glue that loads
and stores every state of a parameter inside the same function. ``torch.compile`` fuses the
whole thing into one loop over the parameter; compiled code may contract ``a*b + c`` into an
FMA, so the fused path is *not* bit-identical to the reference (tests/test_lowbit_fused.py
bounds the difference). EmoAiry and EmoTion keep their eager rules: their states are row and
column vectors, and the work on the weight is already a couple of passes.

Compilation: on by default where a C++ compiler is available; ``EMOQ_COMPILE=0`` turns it
off (the same kernels then run eagerly, same formulas). If compilation fails, emoq warns
once, loudly (``RuntimeWarning`` with the error), and runs the kernels eagerly: results stay
those of the fused formulas, only slower.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from emoq.states import StateStorage, dequantize_parts, precision_of, quantize_parts_

FUSED_FAMILIES = ("EmoSens", "EmoCats")


def compile_enabled() -> bool:
    """False when the environment variable ``EMOQ_COMPILE`` is ``0``/``false``/``off``."""
    return os.environ.get("EMOQ_COMPILE", "1").strip().lower() not in ("0", "false", "off", "no")


# ---------------------------------------------------------------------- the fast maths
def sens_math(p: Tensor, g: Tensor, m: Tensor, v: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """EmoSens (SPEC.md), out of place. ``c = [lr, b1, 1-b1, b2, 1-b2, eps, lr*wd]``."""
    m = m * c[1] + g * c[2]
    v = v * c[3] + g * g * c[4]
    p = p - p * c[6]
    p = p - c[0] * m / (v.sqrt() + c[5])
    return p, m, v


def cats_math(p: Tensor, g: Tensor, m: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """EmoCats (SPEC.md), out of place. ``c = [lr, b1, 1-b1, b2, 1-b2, eps, lr*wd]``."""
    p = p * (1 - c[6])
    u = torch.sign(g * c[2] + m * c[1])
    p = p - c[0] * u
    m = m * c[3] + g * c[4]
    return p, m


# A state's layout: (precision, signed). The kernel loads each state to fp32, runs the maths,
# stores each state back; p and g are flat fp32 views.
Layout = tuple[tuple[str, bool], ...]


def _load(layout: tuple[str, bool], st: Sequence[Tensor], n: int) -> Tensor:
    prec, signed = layout
    if prec in ("8bit", "4bit", "fp8"):
        return dequantize_parts(prec, signed, st[0], st[1], st[2] if len(st) > 2 else None, n)
    return st[0].float()


def _store(layout: tuple[str, bool], st: Sequence[Tensor], x: Tensor) -> None:
    # st: [state] | [codes, scale] (fp8) | [codes, scale, qmap] | [codes, scale, qmap, first, thresholds]
    prec, signed = layout
    if prec in ("8bit", "4bit", "fp8"):
        tables = (st[3], st[4]) if len(st) == 5 else None
        quantize_parts_(prec, signed, st[0], st[1], st[2] if len(st) > 2 else None, x, tables)
    else:
        st[0].copy_(x)


def _make_kernel(family: str, layout: Layout) -> Callable[..., None]:
    if family == "EmoSens":
        def kernel(p: Tensor, g: Tensor, c: Tensor, ms: list[Tensor], vs: list[Tensor]) -> None:
            n = p.numel()
            m, v = _load(layout[0], ms, n), _load(layout[1], vs, n)
            p_new, m, v = sens_math(p, g, m, v, c)
            p.copy_(p_new)
            _store(layout[0], ms, m)
            _store(layout[1], vs, v)
    elif family == "EmoCats":
        def kernel(p: Tensor, g: Tensor, c: Tensor, ms: list[Tensor]) -> None:  # type: ignore[misc]
            m = _load(layout[0], ms, p.numel())
            p_new, m = cats_math(p, g, m, c)
            p.copy_(p_new)
            _store(layout[0], ms, m)
    else:
        raise ValueError(f"no fused kernel for {family}")
    return kernel


RECOMPILE_LIMIT = 64


def _raise_recompile_limit() -> None:
    """Static shapes compile ~4x faster kernels than dynamic ones on CPU (measured), at one
    compile per distinct parameter size; raise dynamo's per-function limit (default 8) so a
    model with many sizes keeps its compiled kernels."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < RECOMPILE_LIMIT:
            setattr(cfg, name, RECOMPILE_LIMIT)
    if hasattr(cfg, "accumulated_recompile_limit") and cfg.accumulated_recompile_limit < 4 * RECOMPILE_LIMIT:
        cfg.accumulated_recompile_limit = 4 * RECOMPILE_LIMIT


class FusedKernels:
    """Compiled kernels of one optimizer, one per (family, state layout), built on first use."""

    def __init__(self, compile: bool | None = None) -> None:
        self.compile = compile_enabled() if compile is None else bool(compile)
        self._cache: dict[tuple[str, Layout], Callable[..., None]] = {}
        self._eager: dict[tuple[str, Layout], Callable[..., None]] = {}
        self._failed = False

    def _get(self, family: str, layout: Layout) -> tuple[Callable[..., None], Callable[..., None]]:
        key = (family, layout)
        if key not in self._eager:
            eager = _make_kernel(family, layout)
            self._eager[key] = eager
            if self.compile:
                _raise_recompile_limit()
                self._cache[key] = torch.compile(eager, fullgraph=True, dynamic=False)
            else:
                self._cache[key] = eager
        return self._cache[key], self._eager[key]

    def run(self, family: str, p: Tensor, g: Tensor, states: list[Tensor], c: Tensor, storage: StateStorage) -> None:
        """One fused step of ``family`` on the flat fp32 tensor ``p`` (updated in place)."""
        layout = tuple((precision_of(s), bool(getattr(s, "signed", True))) for s in states)
        args: list[Any] = [storage.kernel_args(s) for s in states]
        fn, eager = self._get(family, layout)
        if self._failed or fn is eager:
            eager(p, g, c, *args)
            return
        try:
            fn(p, g, c, *args)
        except Exception as exc:  # compile unavailable (no compiler, unsupported backend, ...)
            self._failed = True
            warnings.warn(f"emoq: torch.compile of the fused {family} step failed ({type(exc).__name__}: "
                          f"{exc}); running the same fused kernels eagerly from now on (same formulas, "
                          "slower). Set EMOQ_COMPILE=0 to silence this.", RuntimeWarning, stacklevel=3)
            eager(p, g, c, *args)


def step_scalars(lr: float, group: dict[str, Any], device: torch.device) -> Tensor:
    """``[lr, b1, 1-b1, b2, 1-b2, eps, lr*wd]`` as one fp32 tensor (computed in float64)."""
    b1, b2 = group["betas"]
    vals = [lr, b1, 1 - b1, b2, 1 - b2, group.get("eps", 0.0), lr * group["weight_decay"]]
    return torch.tensor(vals, dtype=torch.float32, device=device)
