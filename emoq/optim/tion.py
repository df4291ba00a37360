"""EmoTion: the original member of the Emo family (SPEC.md, "EmoTion")."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from emoq.arith import Hyper, axpy, col_sum
from emoq.kernels import Extent
from emoq.optim.base import EmoOptimizer, StateSpec, factored_shape, is_factored


def _matrix(g: Tensor, extent: Extent) -> Tensor:
    """``g`` as ``(..., rows, numel / d0)``: its rows (those held here, for a shard) by the columns
    of the whole parameter (leading stack dims kept; an empty shard has zero rows)."""
    lead = g.dim() - len(extent.shape)
    return g.reshape(*g.shape[:lead], g.shape[lead], math.prod(extent.shape[1:]))


def emotion_stats(g: Tensor, extent: Extent) -> tuple[Tensor, ...]:
    """The sums over rows the rule needs, partial over the rows held here: ``(sum g^2, sum_0 G)``
    with ``G = g.view(d0, -1)`` (factored; the engine asks only then). The first is the engine's
    overflow check."""
    mat = _matrix(g, extent)
    return col_sum(mat * mat, mat.dim() - 2).sum(dim=(-2, -1), keepdim=True), col_sum(mat, mat.dim() - 2)


def emotion_rule(p: Tensor, g: Tensor, states: tuple[Tensor, ...], stats: tuple[Tensor, ...], h: Hyper,
                 extent: Extent) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One EmoTion step, out of place (SPEC.md order).

    Factored (``states = (row, col)``): ``G = g.view(d0, -1)``,
    ``u = sign(b1*(row (x) col) + (1-b1)*G)``, then ``row <- b2*row + (1-b2)*mean_cols(G)``,
    ``col <- b2*col + (1-b2)*mean_rows(G)`` (the column sums of :func:`emotion_stats` divided by
    the row count). Otherwise ``u = sign(g)``. Then ``p <- p - wd*lr*p``; ``p <- p - lr*u``.
    """
    if states:
        row, col = states
        mat = _matrix(g, extent)
        outer = row.unsqueeze(-1) * col.unsqueeze(-2)  # row (x) col, one rounding per entry
        u = torch.sign(axpy(outer * h.beta1, mat, h.one_minus_beta1)).view_as(p)
        col_mean = stats[1].squeeze(-2) / extent.shape[0]
        states = (axpy(row * h.beta2, mat.mean(dim=-1), h.one_minus_beta2),
                  axpy(col * h.beta2, col_mean, h.one_minus_beta2))
    else:
        u = torch.sign(g)
    p = axpy(p, p, h.neg_lr_wd)
    p = axpy(p, u, h.neg_lr)
    return p, states


class EmoTion(EmoOptimizer):
    """The original Emo optimizer: sign of a rank-1 momentum blend.

    States exist only for factored weights: ``row`` (length d0) and ``col`` (numel / d0).
    LoRA-shaped matrices are not factored and keep no state at all.
    """

    stop_thresholds = (5e-6, 5e-7)
    rule = staticmethod(emotion_rule)
    rule_kind = "sign"
    stats = staticmethod(emotion_stats)

    def _uses_stats(self, p: Tensor) -> bool:
        return factored_shape(self._extent(p).shape)

    def _state_specs(self, p: Tensor) -> dict[str, StateSpec]:
        if not is_factored(p):
            return {}
        return {"row": StateSpec((p.shape[0],), signed=True),
                "col": StateSpec((p.numel() // p.shape[0],), signed=True, per_row=False)}
