"""EmoSens: the Adam-type member of the Emo family (SPEC.md, "EmoSens")."""

from __future__ import annotations

from torch import Tensor

from emoq.arith import Hyper, addcdiv, addcmul, axpy, sqrt
from emoq.kernels import Extent
from emoq.optim.base import EmoOptimizer, StateSpec


def emosens_rule(p: Tensor, g: Tensor, states: tuple[Tensor, ...], stats: tuple[Tensor, ...],
                 h: Hyper, extent: Extent,
                 decay: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One EmoSens step, out of place, in the order of SPEC.md (no bias correction).

    ``m <- b1*m + (1-b1)*g``; ``v <- b2*v + (1-b2)*g^2``; if ``wd != 0``: ``p <- p - wd*lr*p``;
    ``p <- p - lr * m / (sqrt(v) + eps)``. Each ``a + c*b`` is rounded once (emoq.arith).
    """
    m, v = states
    m = axpy(m * h.beta1, g, h.one_minus_beta1)
    v = addcmul(v * h.beta2, g, g, h.one_minus_beta2)
    if decay:
        p = axpy(p, p, h.neg_lr_wd)
    p = addcdiv(p, m, sqrt(v) + h.eps, h.neg_lr)
    return p, (m, v)


class EmoSens(EmoOptimizer):
    """Adam-type Emo optimizer: first and second moments, step size from emoPulse.

    States: ``m`` and ``v``, both the shape of the parameter. Leave ``lr=1.0``: it scales the
    pulse, it is not a learning rate.
    """

    eps_in_denominator = True
    rule = staticmethod(emosens_rule)
    elementwise = True

    def _state_specs(self, p: Tensor) -> dict[str, StateSpec]:
        return {"m": StateSpec(p.shape, signed=True), "v": StateSpec(p.shape, signed=False)}

    def _rule_options(self, group: dict) -> dict:
        return {"decay": group["weight_decay"] != 0}
