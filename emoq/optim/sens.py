"""EmoSens: the Adam-type member of the Emo family (SPEC.md, "EmoSens")."""

from __future__ import annotations

from torch import Tensor

from emoq.optim.base import EmoOptimizer, StateSpec


def emosens_update(p: Tensor, g: Tensor, m: Tensor, v: Tensor, *, lr: float, beta1: float,
                   beta2: float, eps: float, weight_decay: float) -> None:
    """One EmoSens step in place, in the order of SPEC.md (no bias correction).

    ``m <- b1*m + (1-b1)*g``; ``v <- b2*v + (1-b2)*g^2``; ``p <- p - wd*lr*p``;
    ``p <- p - lr * m / (sqrt(v) + eps)``.
    """
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if weight_decay != 0:
        p.add_(p, alpha=-weight_decay * lr)
    p.addcdiv_(m, v.sqrt().add_(eps), value=-lr)


class EmoSens(EmoOptimizer):
    """Adam-type Emo optimizer: first and second moments, step size from emoPulse.

    States: ``m`` and ``v``, both the shape of the parameter. Leave ``lr=1.0``: it scales the
    pulse, it is not a learning rate.
    """

    eps_in_denominator = True

    def _state_specs(self, p: Tensor) -> dict[str, StateSpec]:
        return {"m": StateSpec(p.shape, signed=True), "v": StateSpec(p.shape, signed=False)}

    def _rule(self, p: Tensor, g: Tensor, states: dict[str, Tensor], group: dict, lr: float) -> None:
        beta1, beta2 = group["betas"]
        emosens_update(p, g, states["m"], states["v"], lr=lr, beta1=beta1, beta2=beta2,
                       eps=group["eps"], weight_decay=group["weight_decay"])
