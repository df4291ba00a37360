"""EmoCats: the Lion-type member of the Emo family (SPEC.md, "EmoCats")."""

from __future__ import annotations

import torch
from torch import Tensor

from emoq.arith import Hyper, axpy
from emoq.kernels import Extent
from emoq.optim.base import EmoOptimizer, StateSpec


def emocats_rule(p: Tensor, g: Tensor, states: tuple[Tensor, ...], stats: tuple[Tensor, ...],
                 h: Hyper,
                 extent: Extent) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One EmoCats step, out of place (SPEC.md order).

    ``p <- p*(1 - lr*wd)``; ``u = sign((1-b1)*g + b1*m)``; ``p <- p - lr*u``;
    ``m <- b2*m + (1-b2)*g``. The blend is ``g*(1-b1)`` rounded once, then ``+ b1*m`` in one
    rounding: another order flips the sign of near-zero entries (SPEC.md, "Rounding").
    """
    (m,) = states
    p = p * h.one_minus_lr_wd
    u = torch.sign(axpy(g * h.one_minus_beta1, m, h.beta1))
    p = axpy(p, u, h.neg_lr)
    m = axpy(m * h.beta2, g, h.one_minus_beta2)
    return p, (m,)


class EmoCats(EmoOptimizer):
    """Lion-type Emo optimizer: sign of a momentum blend, step size from emoPulse.

    State: ``m``, the shape of the parameter (1 byte/param at 8 bits).
    """

    stop_thresholds = (5e-6, 5e-7)
    rule = staticmethod(emocats_rule)
    rule_kind = "lion"
    elementwise = True

    def _state_specs(self, p: Tensor) -> dict[str, StateSpec]:
        return {"m": StateSpec(p.shape, signed=True)}
