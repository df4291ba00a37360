"""EmoAiry: the Adafactor-type member of the Emo family (SPEC.md, "EmoAiry")."""

from __future__ import annotations

import torch
from torch import Tensor

from emoq.optim.base import EmoOptimizer, StateSpec, is_factored


def emoairy_update(p: Tensor, g: Tensor, row: Tensor | None, col: Tensor | None, *, lr: float,
                   beta1: float, eps: float, weight_decay: float) -> None:
    """One EmoAiry step in place (SPEC.md order).

    Factored (``row``/``col`` given): ``r = mean_{dims>=1}(g^2) + eps``, ``c = mean_0(g^2) + eps``,
    ``R <- b1*R + (1-b1)*sqrt(r)``, ``C <- b1*C + (1-b1)*sqrt(c)``, ``u = g / (sqrt(R*C) + eps)``.
    Otherwise ``u = g / (mean|g| + eps)``. Then ``p <- p - wd*lr*p``; ``p <- p - lr*sign(u)``.

    Every denominator is positive, so ``sign(u) == sign(g)``: the direction is the sign of the
    gradient and R, C never change it (as in v3.8). They are kept because the spec keeps them.
    """
    if row is not None and col is not None:
        g2 = g * g
        r = g2.mean(dim=tuple(range(1, g.dim())), keepdim=True).add_(eps)
        c = g2.mean(dim=0, keepdim=True).add_(eps)
        row.mul_(beta1).add_(r.sqrt_(), alpha=1 - beta1)
        col.mul_(beta1).add_(c.sqrt_(), alpha=1 - beta1)
        u = g / (row * col).sqrt_().add_(eps)
    else:
        u = g / (g.abs().mean() + eps)
    p.add_(p, alpha=-weight_decay * lr)
    p.add_(torch.sign(u), alpha=-lr)


class EmoAiry(EmoOptimizer):
    """Adafactor-type Emo optimizer: sign update, factored row/column statistics.

    States exist only for factored weights (``dim >= 2`` and ``(d0 + d1) / numel < 0.05``):
    ``row`` (d0 x 1 x ...) and ``col`` (1 x d1 x ...). LoRA-shaped matrices are not factored
    and keep no state at all.
    """

    noise_floor = 1e-8

    eps_in_denominator = True

    def _state_specs(self, p: Tensor) -> dict[str, StateSpec]:
        if not is_factored(p):
            return {}
        row_shape = (p.shape[0],) + (1,) * (p.dim() - 1)
        col_shape = (1,) + tuple(p.shape[1:])
        return {"row": StateSpec(row_shape, signed=False), "col": StateSpec(col_shape, signed=False)}

    def _rule(self, p: Tensor, g: Tensor, states: dict[str, Tensor], group: dict, lr: float) -> None:
        emoairy_update(p, g, states.get("row"), states.get("col"), lr=lr, beta1=group["betas"][0],
                       eps=group["eps"], weight_decay=group["weight_decay"])
