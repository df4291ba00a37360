"""EmoPulseScheduler: drive any torch optimizer's learning rate with emoPulse."""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from emoq.distributed import reduce_loss
from emoq.optim.base import as_loss_float
from emoq.probe import STATE_NAME as PROBE_STATE
from emoq.probe import check_probe_state
from emoq.pulse import make_pulse


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
        pulse: the variant, ``"v3.8"`` (default), ``"v3.9"`` or ``"adaptive"``.
        rule_kind: the kind of step ``optimizer`` takes, which ``pulse="adaptive"`` reads:
            ``"adam"`` (default: AdamW, Adafactor, SGD, ... a step scaled by the gradient),
            ``"sign"`` (signSGD: +-lr on every coordinate along the gradient) or ``"lion"`` (Lion:
            +-lr along a momentum blend; needs a loss >= 0). See :class:`~emoq.pulse.EmoPulseAdaptive`.
    """

    def __init__(self, optimizer: Optimizer, scope: float = 1.0, noise_floor: float = 1e-10,
                 stop_thresholds: tuple[float, float] = (1e-6, 1e-7), pulse: str = "v3.8",
                 rule_kind: str = "adam") -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"EmoPulseScheduler needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.pulse = make_pulse(pulse, scope, noise_floor, stop_thresholds, rule_kind)
        self.skipped_steps = 0
        self._warned = False
        self._probe_state: dict[Tensor, dict[str, Tensor]] = defaultdict(dict)  # the adaptive pulse's, per param

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _params_with_grad(self) -> list[Tensor]:
        return [p for p in self._all_params() if p.grad is not None]

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
        self.pulse.check_loss(value)  # before the probe records anything
        eta = self.pulse.update(value, self.pulse.measure(self._params_with_grad(), self._probe_state))
        for group in self.optimizer.param_groups:
            group["lr"] = eta
        return eta

    @property
    def should_stop(self) -> bool:
        return self.pulse.should_stop

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """The pulse, the skip counter and (adaptive pulse) its per-parameter probe tensors by index."""
        probe = {i: dict(self._probe_state[p]) for i, p in enumerate(self._all_params()) if self._probe_state.get(p)}
        return {"pulse": self.pulse.state_dict(), "skipped_steps": self.skipped_steps, "probe": probe}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Everything is checked first (a pulse state of another
        variant, a bad value, a probe entry for a parameter this optimizer lacks or of the wrong
        shape raises ``ValueError``/``KeyError``) so a refused state changes nothing."""
        if not isinstance(state_dict, dict) or "pulse" not in state_dict:
            raise KeyError("not an EmoPulseScheduler state_dict (no 'pulse' entry)")
        pulse = self.pulse.check_state_dict(state_dict["pulse"])
        skipped = state_dict.get("skipped_steps", 0)
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise ValueError(f"EmoPulseScheduler state 'skipped_steps' must be an int >= 0, got {skipped!r}")
        params = self._all_params()
        probe = state_dict.get("probe", {})
        if not isinstance(probe, dict):
            raise ValueError("EmoPulseScheduler state 'probe' must be a dict")
        rebuilt: dict[Tensor, dict[str, Tensor]] = defaultdict(dict)
        for i, entries in probe.items():
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(params):
                raise ValueError(f"EmoPulseScheduler state has a probe entry for parameter {i!r}; this optimizer "
                                 f"has {len(params)} parameters")
            p = params[i]
            if not isinstance(entries, dict) or set(entries) != {PROBE_STATE}:
                raise ValueError(f"EmoPulseScheduler state: probe entry {i} must be {{{PROBE_STATE!r}: tensor}}")
            if not self.pulse.needs_probe:
                raise ValueError(f"EmoPulseScheduler state has probe entries, which the {self.pulse.name!r} pulse "
                                 "does not keep")
            problem = check_probe_state(entries[PROBE_STATE], p)
            if problem:
                raise ValueError(f"EmoPulseScheduler state: {PROBE_STATE} of parameter {i} {problem}")
            rebuilt[p] = {PROBE_STATE: entries[PROBE_STATE].detach().to(p.device, torch.float32, copy=True)}
        self.pulse.load_state_dict(pulse)
        self.skipped_steps = skipped
        self._probe_state = rebuilt
