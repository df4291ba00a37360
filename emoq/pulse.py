"""emoPulse: the loss-driven step size shared by every Emo optimizer (SPEC.md, "emoPulse").

Pure Python floats, no tensors: the pulse is a small state machine that turns the history of
the training loss into the step size ``eta`` of the next update.
"""

from __future__ import annotations

import math
from typing import Any

ETA_MIN = 1e-6
ETA_MAX = 3e-3


class EmoPulse:
    """The emoPulse state machine of Emo v3.8 (SPEC.md steps 1-9).

    ``update(loss)`` consumes one finite loss per optimizer step and returns the step size
    ``eta = clamp(hist * scope * 1e-4, 1e-6, 3e-3)``.

    Args:
        scope: the user's scale on the pulse (the optimizer's ``lr``, default 1.0). It is
            reset to 1.0 whenever the stop signal fires (SPEC.md step 9).
        noise_floor: lower bound on ``noise`` in the denominator term ``D`` (1e-10; EmoAiry
            uses 1e-8).
        stop_thresholds: ``(a, b)`` of the stop signal ``|scalar| <= a and |N - D| <= b``.

    Trap: the pulse expects the *unscaled* loss of one optimizer update. Feeding it a loss
    multiplied by an AMP GradScaler, or the sum instead of the mean of micro-batch losses,
    changes its history and so every later step size.
    """

    def __init__(
        self,
        scope: float = 1.0,
        noise_floor: float = 1e-10,
        stop_thresholds: tuple[float, float] = (1e-6, 1e-7),
    ) -> None:
        if not (isinstance(scope, (int, float)) and math.isfinite(scope) and scope > 0):
            raise ValueError(f"scope (the optimizer's lr) must be a finite float > 0, got {scope!r}")
        if not noise_floor >= 0:
            raise ValueError(f"noise_floor must be >= 0, got {noise_floor!r}")
        self.noise_floor = float(noise_floor)
        self.stop_thresholds = (float(stop_thresholds[0]), float(stop_thresholds[1]))
        self.initial_scope = float(scope)
        self.reset()

    def reset(self) -> None:
        """Forget the loss history (the state of a freshly built optimizer)."""
        self.short: float | None = None  # s: fast loss EMA
        self.medium: float | None = None  # m
        self.long: float | None = None  # l: slow loss EMA
        self.noise = 1.0
        self.d = 0.02
        self.hist = 1.0
        self.scope = self.initial_scope
        self.scalar = 0.0
        self.trust = 0.0
        self.eta: float | None = None
        self.should_stop = False
        self.steps = 0

    def update(self, loss: float) -> float:
        """Consume one loss and return the step size of this step (SPEC.md steps 1-9)."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"emoPulse received a non-finite loss ({loss}); it must be filtered out before")
        # 1. loss EMAs
        if self.short is None:
            self.short = self.medium = self.long = loss
        self.short = 0.3 * loss + 0.7 * self.short
        self.medium = 0.05 * loss + 0.95 * self.medium
        self.long = 0.01 * loss + 0.99 * self.long
        # 2. the emotional scalar
        bl = max(self.long, 1e-5)
        bm = max(self.medium, 1e-5)
        delta = self.long - self.short
        xl = delta / bl
        xm = delta / bm
        if abs(xl) < 0.05:
            scalar = math.tanh(xl)
        elif abs(xm) * bm < abs(xl) * bl:
            # quirk (SPEC.md step 2): both sides equal |delta| up to rounding, so this branch is
            # taken only by a rounding accident; evaluated exactly as written on purpose.
            scalar = math.tanh(xm)
        else:
            scalar = math.tanh(xl)
        # 3. trust
        trust = math.copysign(1.0 - abs(scalar), scalar)
        # 4. noise and d
        self.noise = 0.97 * self.noise + 0.03 * abs(scalar)
        self.d = 0.97 * self.d + 0.03 * abs(trust)
        # 5. ratio
        n = abs(scalar - trust) + 0.1
        dd = abs(max(self.noise, self.noise_floor) - self.d) + 0.1
        r = (dd / n) ** 2
        # 6. history
        if r >= self.hist and trust >= 0.5:
            self.hist = min(r, 1.5 * self.hist)
        elif -0.5 <= trust <= 0.5:
            self.hist = 0.8 * r
        # 7. step size (clamp bounds do not scale with scope)
        eta = min(max(self.hist * self.scope * 1e-4, ETA_MIN), ETA_MAX)
        # 9. stop signal: advice only; it resets the scope to 1.0
        a, b = self.stop_thresholds
        self.should_stop = abs(scalar) <= a and abs(n - dd) <= b
        if self.should_stop:
            self.scope = 1.0
        self.scalar = scalar
        self.trust = trust
        self.eta = eta
        self.steps += 1
        return eta

    _FIELDS = ("short", "medium", "long", "noise", "d", "hist", "scope", "scalar", "trust", "eta",
               "should_stop", "steps")

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly (plain Python scalars)."""
        return {name: getattr(self, name) for name in self._FIELDS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; every value is checked first, so a bad one changes nothing."""
        values = check_pulse_state(state, self._FIELDS)
        for name, value in values.items():
            setattr(self, name, value)

    def __repr__(self) -> str:
        return (f"EmoPulse(scope={self.scope}, eta={self.eta}, hist={self.hist}, steps={self.steps}, "
                f"should_stop={self.should_stop})")


def check_pulse_state(state: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    """The validated values of a pulse ``state_dict`` (raises ``KeyError``/``ValueError``, names the field).

    A NaN or inf anywhere (``hist = nan`` makes every later step size NaN), a negative count,
    a scope <= 0 or loss EMAs set only in part are refused.
    """
    if not isinstance(state, dict):
        raise ValueError(f"EmoPulse state_dict must be a dict, got {type(state).__name__}")
    missing = [name for name in fields if name not in state]
    if missing:
        raise KeyError(f"EmoPulse state_dict is missing {missing}")
    out: dict[str, Any] = {}
    for name in fields:
        value = state[name]
        if name == "should_stop":
            if not isinstance(value, (bool, int)) or value not in (0, 1):
                raise ValueError(f"EmoPulse state {name!r} must be a bool, got {value!r}")
            out[name] = bool(value)
        elif name == "steps":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"EmoPulse state {name!r} must be an int >= 0, got {value!r}")
            out[name] = value
        elif value is None and name in ("short", "medium", "long", "eta"):
            out[name] = None
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
        else:
            raise ValueError(f"EmoPulse state {name!r} must be a finite float, got {value!r}")
    emas = [out.get(n) for n in ("short", "medium", "long") if n in out]
    if any(v is None for v in emas) and not all(v is None for v in emas):
        raise ValueError("EmoPulse state: the loss EMAs 'short', 'medium', 'long' are set only in part")
    if "scope" in out and not out["scope"] > 0:
        raise ValueError(f"EmoPulse state 'scope' must be > 0, got {out['scope']!r}")
    return out
