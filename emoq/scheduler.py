"""EmoPulseScheduler: drive any torch optimizer's learning rate with emoPulse."""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from emoq.distributed import reduce_loss
from emoq.optim.base import as_loss_float
from emoq.pulse import EmoPulse


class EmoPulseScheduler:
    """Set every param group's ``lr`` of ``optimizer`` to the emoPulse step size.

    Call ``scheduler.step(loss)`` after ``backward()`` and *before* ``optimizer.step()``: the
    update then uses the step size computed from this step's loss, as the Emo optimizers do.

    A non-finite loss leaves the lr and the pulse unchanged, warns once and counts
    ``skipped_steps`` (the optimizer step itself is yours to skip). Under
    ``torch.distributed`` the loss is averaged over ranks first.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        scope: scale on the pulse (the ``lr`` of an Emo optimizer), default 1.0.
        noise_floor, stop_thresholds: as in :class:`~emoq.EmoPulse` (EmoSens defaults).
    """

    def __init__(self, optimizer: Optimizer, scope: float = 1.0, noise_floor: float = 1e-10,
                 stop_thresholds: tuple[float, float] = (1e-6, 1e-7)) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"EmoPulseScheduler needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.pulse = EmoPulse(scope=scope, noise_floor=noise_floor, stop_thresholds=stop_thresholds)
        self.skipped_steps = 0
        self._warned = False

    def step(self, loss: float | Tensor) -> float | None:
        """Feed one loss; returns the new lr (``None`` if the loss was not finite)."""
        loss = as_loss_float(loss, "EmoPulseScheduler.step(loss)")
        device = next((p.device for g in self.optimizer.param_groups for p in g["params"]), None)
        value, finite = reduce_loss(loss, True, device)
        if not finite:
            self.skipped_steps += 1
            if not self._warned:
                self._warned = True
                warnings.warn("EmoPulseScheduler: non-finite loss, lr and pulse left unchanged (warned once)",
                              RuntimeWarning, stacklevel=2)
            return None
        eta = self.pulse.update(value)
        for group in self.optimizer.param_groups:
            group["lr"] = eta
        return eta

    @property
    def should_stop(self) -> bool:
        return self.pulse.should_stop

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"pulse": self.pulse.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pulse.load_state_dict(state_dict["pulse"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
