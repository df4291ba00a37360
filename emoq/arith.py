"""The arithmetic the update rules are written in: one rounding per ``a + c·b``, in eager and compiled code.

Each rule (``emoq/optim/sens.py`` …) is written once, out of place, with these helpers and a
:class:`Hyper` of scalars. The same function runs

- **eagerly** with Python-float scalars: the helpers are ``torch.add(a, b, alpha=c)``,
  ``torch.addcmul`` and ``torch.addcdiv``, exactly the ops of tests/reference.py;
- **compiled** (``torch.compile``, emoq's default path) with the scalars as 0-dim tensors (a new
  step size never recompiles): the helpers then spell out the order in which ATen's CPU kernels
  round. ATen computes ``add(a, b, alpha=c)`` as ``fma(b, c, a)``, ``addcmul(s, a, b, value=c)``
  as ``fma(c·a, b, s)`` and ``addcdiv(s, a, b, value=c)`` as ``(c·a)/b + s``; inductor's lowering
  of those ops uses FMA only on CUDA, so the CPU forms are written here with inductor's ``fma``
  primitive (generated as ``fmadd``/``std::fma``), and inductor's own FMA contraction stays off.

Square roots are correctly rounded (:func:`sqrt`) in both: inductor's vector ``sqrt`` is, but
ATen's CPU ``torch.sqrt`` on float32 (MKL VML) is not (measured: 1 ulp off for 17 % of inputs),
so the eager form takes the float64 square root and rounds it once (exact for every float32).

Measured on x86-64 (AVX2): compiled and eager results are bit-identical for every element-wise
rule (tests/test_kernels.py checks it against tests/reference.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

Scalar = float | Tensor
STEP_PERIOD = 1 << 24  # Hyper.step is the step count modulo this: exact in fp32, so a compiled call gets it exactly


def _fma(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """``a·b + c`` with one rounding: inductor's ``fma`` when compiling, else ATen's ``addcmul``
    (which ATen's CPU kernel evaluates as one FMA when its ``value`` is 1)."""
    if torch.compiler.is_compiling():
        from torch._inductor import inductor_prims

        return inductor_prims.fma(a, b, c)
    return torch.addcmul(c, a, b)


def sqrt(x: Tensor) -> Tensor:
    """Correctly rounded square root (IEEE 754), in eager and compiled code."""
    if torch.compiler.is_compiling():
        return x.sqrt()
    return x.double().sqrt().to(x.dtype)


def col_sum(x: Tensor, dim: int) -> Tensor:
    """Sum over ``dim`` (the rows), keeping it. Eager: ``x.sum(dim)``, ATen's order, as the reference.
    Compiled: over blocks of 8 rows first, then over the blocks (inductor's plain reduction over a
    non-last dim reads the columns with a stride and measured 2x slower on CPU); the order of the
    additions then differs."""
    n = x.shape[dim]
    if torch.compiler.is_compiling() and dim < x.dim() - 1 and n % 8 == 0 and n > 8:
        split = x.view(*x.shape[:dim], n // 8, 8, *x.shape[dim + 1:])
        return split.sum(dim + 1).sum(dim, keepdim=True)
    return x.sum(dim, keepdim=True)


def param_dims(x: Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dims of ``x`` that belong to one parameter of ``shape`` (the trailing ones): a rule may
    get one parameter or a stack of same-shape parameters along leading dims."""
    return tuple(range(x.dim() - len(shape), x.dim()))


def axpy(a: Tensor, b: Tensor, alpha: Scalar) -> Tensor:
    """``a + alpha·b`` rounded once (``torch.add(a, b, alpha=alpha)``)."""
    if isinstance(alpha, Tensor):
        return _fma(b, alpha, a)
    return torch.add(a, b, alpha=alpha)


def addcmul(a: Tensor, b: Tensor, c: Tensor, value: Scalar) -> Tensor:
    """``a + value·b·c`` as ``torch.addcmul``: ``value·b`` rounded, then one FMA."""
    if isinstance(value, Tensor):
        return _fma(b * value, c, a)
    return torch.addcmul(a, b, c, value=value)


def addcdiv(a: Tensor, b: Tensor, c: Tensor, value: Scalar) -> Tensor:
    """``a + value·b/c`` as ``torch.addcdiv``: ``(value·b)/c`` rounded twice, then added."""
    if isinstance(value, Tensor):
        return (b * value) / c + a
    return torch.addcdiv(a, b, c, value=value)


class Hyper(NamedTuple):
    """The scalars of one step of one param group, derived in float64 from ``lr`` (the pulse η)
    and the group's hyper-parameters: Python floats (eager) or fp32 0-dim tensors (compiled);
    and ``step``, the optimizer's step count modulo ``STEP_PERIOD`` (exact in fp32),
    which seeds the stochastic rounding of states."""

    lr: Scalar
    beta1: Scalar
    one_minus_beta1: Scalar
    beta2: Scalar
    one_minus_beta2: Scalar
    eps: Scalar
    neg_lr: Scalar
    neg_lr_wd: Scalar
    one_minus_lr_wd: Scalar
    step: Scalar = 0

    @classmethod
    def of(cls, lr: float, group: dict, step: int = 0) -> Hyper:
        b1, b2 = group["betas"]
        wd = group["weight_decay"]
        return cls(lr, b1, 1 - b1, b2, 1 - b2, group.get("eps", 0.0), -lr, -wd * lr, 1 - lr * wd,
                   int(step) % STEP_PERIOD)

    def as_tensor(self, device: torch.device) -> Tensor:
        """The same scalars as one fp32 tensor (each rounded once from float64, as ATen rounds a
        Python scalar argument)."""
        return torch.tensor(self, dtype=torch.float32, device=device)

    @classmethod
    def from_tensor(cls, t: Tensor) -> Hyper:
        return cls(*t.unbind(0))
