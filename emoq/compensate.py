"""Quantization compensation for low-precision (bf16 / fp16) parameters.

An Emo step moves a weight by η ≈ 1e-4 relative, below half a bf16 ulp (2^-9 ≈ 2e-3
relative): rounded to nearest, most updates vanish. Each mode decides how the fp32 result of
the rule is written back into the low-precision parameter (fp32 parameters are never touched
by this module):

- ``"none"``: round to nearest (no memory; small updates are lost).
- ``"stochastic"``: round up or down with probabilities that make the rounding unbiased
  (no memory; adds rounding noise of one ulp).
- ``"error_feedback"``: keep the rounding residual ``x - round(x)`` in a buffer of the
  parameter's dtype (2 B/param for bf16) and add it back before the next step, so the rule
  sees ``p + residual``, an fp32-accurate master weight to ~16 mantissa bits.
- ``"error_feedback8"``: the same residual stored in int8 as a fraction of the weight's ulp
  (1 B/param; the residual is known to 1/254 ulp).

Memory and measured quality: docs/precision.md and bench/README.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

COMPENSATIONS = ("none", "stochastic", "error_feedback", "error_feedback8")
DEFAULT_COMPENSATION = "error_feedback"
LOW_PRECISION = (torch.bfloat16, torch.float16)
_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


def check_compensation(value: Any) -> str:
    """Validate ``compensation=``; ``None`` means the default."""
    if value is None:
        return DEFAULT_COMPENSATION
    if value not in COMPENSATIONS:
        raise ValueError(f"compensation must be one of {COMPENSATIONS} (or None for the default "
                         f"{DEFAULT_COMPENSATION!r}), got {value!r}")
    return value


def ulp(q: Tensor) -> Tensor:
    """fp32 spacing of the low-precision values ``q`` at their own magnitude (normal numbers)."""
    _, exponent = torch.frexp(q.float())  # |q| = mant * 2**exponent, mant in [0.5, 1)
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float32),
                       exponent - 1 - _MANTISSA_BITS[q.dtype])


def stochastic_round(x: Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> Tensor:
    """Unbiased rounding of fp32 ``x`` to ``dtype``: E[result] = x (within the dtype's range).

    The neighbour on the other side of ``x`` is found on the 16-bit pattern (one up or down in
    magnitude; the smallest subnormal of the error's sign next to 0), so compiled code, which
    computes bf16/fp16 ops in fp32, finds the same one.
    """
    nearest = x.to(dtype)
    near = nearest.float()
    err = x - near
    bits = nearest.view(torch.int16)
    away = (err > 0) == (near > 0)  # moving away from zero: one more in magnitude
    other_bits = torch.where(away, bits + 1, bits - 1)
    tiny = torch.where(err > 0, torch.ones_like(bits), torch.full_like(bits, -32767))  # +-smallest subnormal
    other = torch.where(near == 0, tiny, other_bits).to(torch.int16).view(dtype)
    gap = (other.float() - near).abs()
    prob = torch.where(gap > 0, err.abs() / gap, torch.zeros_like(gap))
    rand = torch.rand(x.shape, generator=generator, device=x.device)
    return torch.where(rand < prob, other, nearest)


def needs_compensation(p: Tensor) -> bool:
    return p.dtype in LOW_PRECISION


def needs_residual(p: Tensor, mode: str) -> bool:
    """Whether ``mode`` keeps a residual buffer for ``p`` (error feedback on a bf16/fp16 parameter)."""
    return p.dtype in LOW_PRECISION and mode in ("error_feedback", "error_feedback8")


def new_residual(p: Tensor, mode: str) -> Tensor:
    """A zero residual for ``p`` (int8 ulp units for ``error_feedback8``, else the param dtype)."""
    return torch.zeros_like(p, dtype=torch.int8 if mode == "error_feedback8" else p.dtype,
                            memory_format=torch.contiguous_format)


def working_value(p: Tensor, residual: Tensor | None, mode: str) -> Tensor:
    """The fp32 value the rule updates: ``p`` itself (fp32), ``p + residual`` (error feedback),
    else ``p`` in fp32. Written with out-of-place ops so that compiled steps can inline it."""
    if p.dtype == torch.float32:
        return p
    x = p.float()
    if residual is not None and p.dtype in LOW_PRECISION:
        if mode == "error_feedback8":
            x = x + (residual.float() * ulp(p)) / 254.0
        elif mode == "error_feedback":
            x = x + residual.float()
    return x


def store_value(p: Tensor, x: Tensor, residual: Tensor | None, mode: str) -> None:
    """Write the updated fp32 value ``x`` into ``p`` according to ``mode`` (and the residual).

    Saturating: a value beyond the largest finite value of ``p``'s dtype is written as that
    value (rounding it would give inf), in every mode.
    """
    if x is p:
        return
    if p.dtype in LOW_PRECISION:
        top = torch.finfo(p.dtype).max
        x = x.clamp(-top, top)
    if p.dtype not in LOW_PRECISION or mode == "none":
        p.copy_(x)
        return
    if mode == "stochastic":
        p.copy_(stochastic_round(x, p.dtype))
        return
    p.copy_(x)  # round to nearest
    r = x - p.float()
    if residual is None:
        return
    if mode == "error_feedback8":
        residual.copy_(((r / ulp(p)) * 254.0).round().clamp(-127, 127).to(torch.int8))
    else:
        residual.copy_(r.to(p.dtype))


def compensation_bytes_per_param(mode: str, dtype: torch.dtype) -> float:
    """Extra optimizer memory of ``mode`` for a parameter of ``dtype`` (bytes per element)."""
    if dtype not in LOW_PRECISION or mode in ("none", "stochastic"):
        return 0.0
    return 1.0 if mode == "error_feedback8" else float(torch.finfo(dtype).bits // 8)
