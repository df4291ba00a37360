"""EmoTion: the original member of the Emo family (SPEC.md, "EmoTion")."""

from __future__ import annotations

import torch
from torch import Tensor

from emoq.optim.base import EmoOptimizer, StateSpec, is_factored


def emotion_update(p: Tensor, g: Tensor, row: Tensor | None, col: Tensor | None, *, lr: float,
                   beta1: float, beta2: float, weight_decay: float) -> None:
    """One EmoTion step in place (SPEC.md order).

    Factored: ``G = g.view(d0, -1)``, ``u = sign(b1*(row (x) col) + (1-b1)*G)``, then
    ``row <- b2*row + (1-b2)*mean_cols(G)``, ``col <- b2*col + (1-b2)*mean_rows(G)``.
    Otherwise ``u = sign(g)``. Then ``p <- p - wd*lr*p``; ``p <- p - lr*u``.
    """
    if row is not None and col is not None:
        mat = g.reshape(g.shape[0], -1)
        u = torch.outer(row, col).mul_(beta1).add_(mat, alpha=1 - beta1).sign_().view_as(p)
        row.mul_(beta2).add_(mat.mean(dim=1), alpha=1 - beta2)
        col.mul_(beta2).add_(mat.mean(dim=0), alpha=1 - beta2)
    else:
        u = torch.sign(g)
    p.add_(p, alpha=-weight_decay * lr)
    p.add_(u, alpha=-lr)


class EmoTion(EmoOptimizer):
    """The original Emo optimizer: sign of a rank-1 momentum blend.

    States exist only for factored weights: ``row`` (length d0) and ``col`` (numel / d0).
    LoRA-shaped matrices are not factored and keep no state at all.
    """

    stop_thresholds = (5e-6, 5e-7)

    def _state_specs(self, p: Tensor) -> dict[str, StateSpec]:
        if not is_factored(p):
            return {}
        return {"row": StateSpec((p.shape[0],), signed=True),
                "col": StateSpec((p.numel() // p.shape[0],), signed=True)}

    def _rule(self, p: Tensor, g: Tensor, states: dict[str, Tensor], group: dict, lr: float) -> None:
        beta1, beta2 = group["betas"]
        emotion_update(p, g, states.get("row"), states.get("col"), lr=lr, beta1=beta1, beta2=beta2,
                       weight_decay=group["weight_decay"])
