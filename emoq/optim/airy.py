"""EmoAiry: the Adafactor-type member of the Emo family (SPEC.md, "EmoAiry")."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from emoq.arith import Hyper, axpy, col_sum, param_dims, sqrt
from emoq.kernels import Extent
from emoq.optim.base import EmoOptimizer, StateSpec, factored_shape, is_factored


def emoairy_stats(g: Tensor, extent: Extent) -> tuple[Tensor, ...]:
    """The sums over rows the rule needs, partial over the rows held here: ``(sum g^2, sum_0 g^2)``
    (factored) or ``(sum g^2, sum |g|)``. The first is the engine's overflow check."""
    dims = param_dims(g, extent.shape)
    if factored_shape(extent.shape):
        col = col_sum(g * g, dims[0])
        return col.sum(dim=dims, keepdim=True), col
    return (g * g).sum(dim=dims, keepdim=True), g.abs().sum(dim=dims, keepdim=True)


def emoairy_rule(p: Tensor, g: Tensor, states: tuple[Tensor, ...], stats: tuple[Tensor, ...], h: Hyper,
                 extent: Extent) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One EmoAiry step, out of place (SPEC.md order).

    Factored (``states = (R, C)``): ``r = mean_{dims>=1}(g^2) + eps``, ``c = mean_0(g^2) + eps``,
    ``R <- b1*R + (1-b1)*sqrt(r)``, ``C <- b1*C + (1-b1)*sqrt(c)``, ``u = g / (sqrt(R*C) + eps)``.
    Otherwise ``u = g / (mean|g| + eps)``. Then ``p <- p - wd*lr*p``; ``p <- p - lr*sign(u)``.
    Means over rows come from :func:`emoairy_stats` (summed over all rows) divided by the row count.

    Every denominator is positive, so ``sign(u) == sign(g)``: the direction is the sign of the
    gradient and R, C never change it (as in v3.8). They are kept because the spec keeps them.
    """
    dims = param_dims(g, extent.shape)
    if states:
        row, col = states
        r = (g * g).mean(dim=dims[1:], keepdim=True) + h.eps
        c = stats[1] / extent.shape[0] + h.eps
        row = axpy(row * h.beta1, sqrt(r), h.one_minus_beta1)
        col = axpy(col * h.beta1, sqrt(c), h.one_minus_beta1)
        u = g / (sqrt(row * col) + h.eps)
        states = (row, col)
    else:
        u = g / (stats[1] / math.prod(extent.shape) + h.eps)
    p = axpy(p, p, h.neg_lr_wd)
    p = axpy(p, torch.sign(u), h.neg_lr)
    return p, states


class EmoAiry(EmoOptimizer):
    """Adafactor-type Emo optimizer: sign update, factored row/column statistics.

    States exist only for factored weights (``dim >= 2`` and ``(d0 + d1) / numel < 0.05``):
    ``row`` (d0 x 1 x ...) and ``col`` (1 x d1 x ...). LoRA-shaped matrices are not factored
    and keep no state at all.
    """

    noise_floor = 1e-8
    rule = staticmethod(emoairy_rule)
    rule_kind = "sign"
    stats = staticmethod(emoairy_stats)

    eps_in_denominator = True

    def _state_specs(self, p: Tensor) -> dict[str, StateSpec]:
        if not is_factored(p):
            return {}
        row_shape = (p.shape[0],) + (1,) * (p.dim() - 1)
        col_shape = (1,) + tuple(p.shape[1:])
        return {"row": StateSpec(row_shape, signed=False),
                "col": StateSpec(col_shape, signed=False, per_row=False)}
