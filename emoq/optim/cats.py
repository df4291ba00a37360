"""EmoCats: the Lion-type member of the Emo family (SPEC.md, "EmoCats")."""

from __future__ import annotations

from torch import Tensor

from emoq.optim.base import EmoOptimizer, StateSpec


def emocats_update(p: Tensor, g: Tensor, m: Tensor, *, lr: float, beta1: float, beta2: float,
                   weight_decay: float) -> None:
    """One EmoCats step in place (SPEC.md order).

    ``p <- p*(1 - lr*wd)``; ``u = sign((1-b1)*g + b1*m)``; ``p <- p - lr*u``;
    ``m <- b2*m + (1-b2)*g``. The blend is ``g*(1-b1)`` rounded once, then ``+ b1*m`` in one
    add-with-alpha: another order flips the sign of near-zero entries (SPEC.md, "Rounding").
    """
    p.mul_(1 - lr * weight_decay)
    blend = g.mul(1 - beta1).add_(m, alpha=beta1)
    p.add_(blend.sign_(), alpha=-lr)
    m.mul_(beta2).add_(g, alpha=1 - beta2)


class EmoCats(EmoOptimizer):
    """Lion-type Emo optimizer: sign of a momentum blend, step size from emoPulse.

    State: ``m``, the shape of the parameter (1 byte/param at 8 bits).
    """

    stop_thresholds = (5e-6, 5e-7)

    def _state_specs(self, p: Tensor) -> dict[str, StateSpec]:
        return {"m": StateSpec(p.shape, signed=True)}

    def _rule(self, p: Tensor, g: Tensor, states: dict[str, Tensor], group: dict, lr: float) -> None:
        beta1, beta2 = group["betas"]
        emocats_update(p, g, states["m"], lr=lr, beta1=beta1, beta2=beta2,
                       weight_decay=group["weight_decay"])
