"""emoPulse: the loss-driven step size shared by every Emo optimizer (SPEC.md, "emoPulse").

Pure Python floats, no tensors: the pulse is a small state machine that turns the history of
the training loss into the step size ``eta`` of the next update. One shared core (the loss
EMAs, ``scalar``, ``trust``, ``noise``, ``d`` and ``hist`` of SPEC.md steps 1-6) and one small
class per variant for what differs: how ``eta`` and the stop signal follow from the core.

=============  ==================================================================
``"v3.8"``     :class:`EmoPulse` itself, the default, reference-exact (SPEC.md)
``"v3.9"``     :class:`EmoPulseV39`, upstream's emoChain (SPEC.md "The v3.9 pulse")
``"adaptive"`` :class:`~emoq.pulse.EmoPulseAdaptive`, emoq's own (docs/pulse.md)
=============  ==================================================================

``EmoPulse(scope, pulse="v3.9")`` builds the named variant (an instance of its class, which
is an :class:`EmoPulse`). A variant's ``state_dict()`` is a flat dict of plain Python scalars
with ``"pulse"`` naming the variant; loading another variant's state raises ``ValueError``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

ETA_MIN = 1e-6
ETA_MAX = 3e-3
#: what the optimizer's step does per coordinate, which only ``pulse="adaptive"`` reads:
#: ``"adam"`` a scaled step ``eta * m / sqrt(v)`` (EmoSens, and the default for other optimizers
#: under :class:`~emoq.EmoPulseScheduler`), ``"sign"`` a step of ``+-eta`` per coordinate in the
#: direction of the gradient or of a rank-1 blend (EmoAiry, EmoTion), ``"lion"`` a step of
#: ``+-eta`` per coordinate in the direction of a momentum blend (EmoCats, Lion)
RULE_KINDS = ("adam", "sign", "lion")


def _check_pulse_type(pulse: Any) -> None:
    if not isinstance(pulse, str):
        raise TypeError(f"pulse must be one of {sorted(EmoPulse.variants)} (a str), got {type(pulse).__name__} "
                        f"{pulse!r}")


def _check_scope(scope: Any) -> float:
    if isinstance(scope, bool) or not (isinstance(scope, (int, float)) and math.isfinite(scope) and scope > 0):
        raise ValueError(f"scope (the optimizer's lr) must be a finite float > 0, got {scope!r}")
    return float(scope)


class EmoPulse:
    """The emoPulse state machine; this class is the Emo v3.8 pulse (SPEC.md steps 1-9).

    ``update(loss)`` consumes one finite loss per optimizer step and returns the step size
    ``eta = clamp(hist * scope * 1e-4, 1e-6, 3e-3)``.

    Args:
        scope: the user's scale on the pulse (the optimizer's ``lr``, default 1.0). It is
            reset to 1.0 whenever the stop signal fires (SPEC.md step 9).
        noise_floor: lower bound on ``noise`` in the denominator term ``D`` (1e-10; EmoAiry
            uses 1e-8).
        stop_thresholds: ``(a, b)`` of the stop signal ``|scalar| <= a and |N - D| <= b``.
        pulse: the variant, ``"v3.8"`` (default), ``"v3.9"`` or ``"adaptive"``;
            ``EmoPulse(pulse="v3.9")`` returns an :class:`EmoPulseV39`.
        rule_kind: ``"adam"`` (default), ``"sign"`` or ``"lion"``: the kind of step the pulse scales
            (``RULE_KINDS``); each Emo optimizer passes its own. v3.8 and v3.9 ignore it; the
            adaptive pulse takes its start, its growth target and (``"lion"``) its Polyak bound
            from it.

    Trap: the pulse expects the *unscaled* loss of one optimizer update. Feeding it a loss
    multiplied by an AMP GradScaler, or the sum instead of the mean of micro-batch losses,
    changes its history and so every later step size.
    """

    name: ClassVar[str] = "v3.8"
    variants: ClassVar[dict[str, type[EmoPulse]]] = {}
    #: the per-step tensor statistics a variant needs from the optimizer (see ``needs_probe``)
    needs_probe: ClassVar[bool] = False
    #: whether this pulse reads the recheck ratio (:meth:`record_ratio`; the optimizers' ``recheck=``)
    uses_recheck: bool = False
    #: what ``recheck=`` needs, for the refusal's message
    RECHECK_NEEDS = "pulse='adaptive' and an Adam-type rule (EmoSens, rule_kind 'adam')"
    _CORE_FIELDS: ClassVar[tuple[str, ...]] = (
        "short", "medium", "long", "noise", "d", "hist", "scope", "scalar", "trust", "eta", "should_stop", "steps")
    _FIELDS: ClassVar[tuple[str, ...]] = ()  # the variant's own state, after the core's
    _OPTIONAL: ClassVar[tuple[str, ...]] = ("short", "medium", "long", "eta")  # fields that may be None

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            EmoPulse.variants[cls.name] = cls

    def __new__(cls, *args: Any, pulse: str | None = None, **kwargs: Any) -> EmoPulse:
        if pulse is not None:
            _check_pulse_type(pulse)
            target = EmoPulse.variants.get(pulse)
            if target is None:
                raise ValueError(f"pulse must be one of {sorted(EmoPulse.variants)}, got {pulse!r}")
            if not issubclass(target, cls):
                raise ValueError(f"{cls.__name__} is the {cls.name!r} pulse, not {pulse!r}")
            cls = target
        return super().__new__(cls)

    def __init__(self, scope: float = 1.0, noise_floor: float = 1e-10,
                 stop_thresholds: tuple[float, float] = (1e-6, 1e-7), pulse: str | None = None,
                 rule_kind: str = "adam") -> None:
        if not (isinstance(noise_floor, (int, float)) and noise_floor >= 0):
            raise ValueError(f"noise_floor must be >= 0, got {noise_floor!r}")
        if not isinstance(rule_kind, str) or rule_kind not in RULE_KINDS:
            raise ValueError(f"rule_kind must be one of {list(RULE_KINDS)}, got {rule_kind!r}")
        self.rule_kind = rule_kind
        self.noise_floor = float(noise_floor)
        self.stop_thresholds = (float(stop_thresholds[0]), float(stop_thresholds[1]))
        self.initial_scope = _check_scope(scope)
        self.reset()

    @classmethod
    def names(cls) -> list[str]:
        """The registered variant names."""
        return list(EmoPulse.variants)

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

    # ------------------------------------------------------------------ the shared core
    def update(self, loss: float, probe: tuple[float, ...] | None = None) -> float:
        """Consume one loss and return the step size of this step.

        ``probe`` is the tuple of tensor statistics of a variant with ``needs_probe`` (the
        optimizer measures them; see :class:`~emoq.pulse.EmoPulseAdaptive`); others ignore it.
        """
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"emoPulse received a non-finite loss ({loss}); it must be filtered out before")
        self.check_loss(loss)
        self._observe(loss, probe)
        eta = self._step_size()
        self.should_stop = self._stop_signal()
        self.eta = eta
        self.steps += 1
        return eta

    def _observe(self, loss: float, probe: tuple[float, ...] | None) -> None:
        """SPEC.md steps 1-6: the loss EMAs, ``scalar``, ``trust``, ``noise``, ``d``, ``hist``.

        Leaves ``bm``, ``n`` (N) and ``dd`` (D) of this step on ``self`` for the variant.
        """
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
        self._after_noise(scalar)
        # 5. ratio
        n = abs(scalar - trust) + 0.1
        dd = abs(max(self.noise, self.noise_floor) - self.d) + 0.1
        r = (dd / n) ** 2
        # 6. history
        if r >= self.hist and trust >= 0.5:
            self.hist = min(r, 1.5 * self.hist)
        elif -0.5 <= trust <= 0.5:
            self.hist = 0.8 * r
        self.scalar, self.trust, self.bm, self.n, self.dd = scalar, trust, bm, n, dd

    # ------------------------------------------------------------------ what a variant changes
    def check_loss(self, loss: float) -> None:
        """Raise ``ValueError`` for a finite loss this variant cannot use (called by :meth:`update`,
        and by the optimizer and the scheduler before they measure or change anything). v3.8 and
        v3.9 take any finite loss."""

    def measure(self, params: list[Any], state: dict[Any, dict[str, Any]]) -> tuple[float, ...] | None:
        """The tensor statistics this variant needs for the next :meth:`update` (``probe=``),
        measured by the caller (optimizer or scheduler) on ``params`` — the parameters that have
        a gradient this step, before any of them moves — keeping what it must in ``state[p]``.
        v3.8 and v3.9 need none: ``None``, at no cost."""
        return None

    def _after_noise(self, scalar: float) -> None:
        """Hook between SPEC.md steps 4 and 5 (v3.9's chain factor); v3.8: nothing."""

    def _step_size(self) -> float:
        """SPEC.md step 7: ``clamp(hist * scope * 1e-4, 1e-6, 3e-3)`` (bounds do not scale with scope)."""
        return min(max(self.hist * self.scope * 1e-4, ETA_MIN), ETA_MAX)

    def _stop_signal(self) -> bool:
        """SPEC.md step 9: ``|scalar| <= a and |N - D| <= b``; when true the scope resets to 1.0.

        Advice only. The step size of this step was computed with the old scope.
        """
        a, b = self.stop_thresholds
        stop = abs(self.scalar) <= a and abs(self.n - self.dd) <= b
        if stop:
            self.scope = 1.0
        return stop

    def record_ratio(self, ratio: float) -> None:
        """Take one recheck ratio (see :class:`EmoPulseAdaptive`); only a variant with
        ``uses_recheck`` reads it, the others raise ``ValueError``."""
        raise ValueError(f"the {self.name!r} pulse does not read a recheck ratio (recheck= needs {self.RECHECK_NEEDS})")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly: a flat dict of plain Python scalars, with
        ``"pulse"`` naming the variant."""
        out: dict[str, Any] = {"pulse": self.name}
        out.update((name, getattr(self, name)) for name in self._CORE_FIELDS + self._FIELDS)
        return out

    def check_state_dict(self, state: Any) -> dict[str, Any]:
        """The validated values of :meth:`state_dict` output, without loading them.

        Raises ``ValueError`` for a state of another variant or a bad value (:func:`check_pulse_state`),
        ``KeyError`` for a missing field.
        """
        if not isinstance(state, dict):
            raise ValueError(f"EmoPulse state_dict must be a dict, got {type(state).__name__}")
        saved = state.get("pulse", "v3.8")  # states saved before variants existed are v3.8
        if saved != self.name:
            raise ValueError(f"cannot load a {saved!r} pulse state into the {self.name!r} pulse; build the "
                             f"optimizer (or EmoPulseScheduler) with pulse={saved!r} to resume this checkpoint")
        return {"pulse": self.name, **check_pulse_state(state, self._CORE_FIELDS + self._FIELDS, self._OPTIONAL)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; every value is checked first, so a bad one (or a state of
        another variant) changes nothing."""
        for name, value in self.check_state_dict(state).items():
            if name != "pulse":
                setattr(self, name, value)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(scope={self.scope}, eta={self.eta}, hist={self.hist}, steps={self.steps}, "
                f"should_stop={self.should_stop})")


EmoPulse.variants[EmoPulse.name] = EmoPulse


def check_pulse_state(state: Any, fields: tuple[str, ...],
                      optional: tuple[str, ...] = ("short", "medium", "long", "eta")) -> dict[str, Any]:
    """The validated values of a pulse ``state_dict`` (raises ``KeyError``/``ValueError``, names the field).

    A NaN or inf anywhere (``hist = nan`` makes every later step size NaN), a negative count,
    a scope <= 0 or loss EMAs set only in part are refused. ``optional`` fields may be ``None``.
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
        elif value is None and name in optional:
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


def make_pulse(pulse: str, scope: float, noise_floor: float = 1e-10,
               stop_thresholds: tuple[float, float] = (1e-6, 1e-7), rule_kind: str = "adam") -> EmoPulse:
    """The variant named ``pulse`` (the optimizers' and the scheduler's ``pulse=``) for a rule of
    kind ``rule_kind`` (``RULE_KINDS``).

    Raises ``TypeError`` for a ``pulse`` that is not a string, ``ValueError`` for an unknown name
    or rule kind."""
    _check_pulse_type(pulse)
    if pulse not in EmoPulse.variants:
        raise ValueError(f"pulse must be one of {sorted(EmoPulse.variants)}, got {pulse!r}")
    return EmoPulse(scope, noise_floor, stop_thresholds, pulse=pulse, rule_kind=rule_kind)


class EmoPulseV39(EmoPulse):
    """Upstream's v3.9.1 pulse, emoChain (SPEC.md "The v3.9 pulse"); ``pulse="v3.9"``.

    Core steps 1-6 as v3.8, with the noise floor 1e-10 for every family and a chain factor
    ``c <- 0.7*c + 0.3*scalar`` after step 4. Step 7:
    ``eta = clamp(hist * scope * max(100**c, 1e-2) * 1e-4, 1e-8, scope * 3e-3)`` (``min`` with
    the upper bound first). Stop signal: ``d - noise >= 0.3 and bm <= 0.04``, re-evaluated every
    step, without any change of scope.

    Trap: the upper bound scales with the scope, so a sign rule (EmoCats, EmoTion, EmoAiry) can
    take ``+-3e-3 * scope`` steps per coordinate: measured to diverge for EmoCats on digits.
    """

    name = "v3.9"
    _FIELDS = ("c",)
    STOP_COEF = 0.04

    def __init__(self, scope: float = 1.0, noise_floor: float = 1e-10,
                 stop_thresholds: tuple[float, float] = (1e-6, 1e-7), pulse: str | None = None,
                 rule_kind: str = "adam") -> None:
        # v3.9 uses the 1e-10 floor for every family and its own stop rule: the family's values are ignored
        super().__init__(scope, 1e-10, stop_thresholds, pulse, rule_kind)

    def reset(self) -> None:
        super().reset()
        self.c = 0.0

    def _after_noise(self, scalar: float) -> None:
        self.c = 0.7 * self.c + 0.3 * scalar

    def _step_size(self) -> float:
        raw = self.hist * self.scope * max(100.0 ** self.c, 1e-2) * 1e-4
        return max(min(raw, self.scope * 3e-3), 1e-8)

    def _stop_signal(self) -> bool:
        return self.d - self.noise >= 0.3 and self.bm <= self.STOP_COEF


class EmoPulseAdaptive(EmoPulse):
    """emoq's own pulse, ``pulse="adaptive"``: looks for the step-size scale each family needs.

    The step size lives in log space, starts at ``ETA0 * scope`` (``1e-3`` for Adam-type steps,
    torch's Adam default; ``1e-4`` for sign steps, v3.8's and Lion's usual rate) and moves every
    step by::

        c      = cos(g, x0 - x)                   # on a fixed 1/61 subset of coordinates (emoq/probe.py)
        growth = GAIN * (c - TARGET[rule_kind])   # TARGET: "adam" -0.01, "sign" +0.01, "lion" -0.01
        rise   = max(0, (s - m) / |m|)            # fast loss EMA above the medium one (SPEC step 1)
        log_eta += clamp(growth - BACKOFF * min(rise, 1), -MAX_CHANGE, MAX_CHANGE)
        eta    = max(min(scope * exp(log_eta), scope * ETA_MAX), 1e-8)

    and, for the kinds in ``POLYAK`` ("lion": 0.2), never above a stochastic Polyak step::

        F, L   = ema_0.9(loss), ema_0.9(|g|_1)    # |g|_1 estimated on the probe's subset
        eta   <= scope * POLYAK[rule_kind] * F / L

    - While the gradient still points along the way the weights travelled from the start (the
      signal D-Adaptation and Prodigy accumulate), the steps are too small: eta grows. Once the
      family's own steps overshoot along their path (``c`` below the target) it shrinks. ``c``
      measures what the family's direction actually did, so every family finds its own scale.
    - The target depends on the kind of step (``rule_kind``, each optimizer class names its
      own). Adam-type steps (EmoSens, ``m/sqrt(v)``: small where the gradient is noisy) grow
      unless ``c`` is clearly negative (target -0.01): in high dimension ``c`` is small, and
      waiting for it to be positive kept EmoSens at a third of its best scale on a noisy task.
      Sign steps of the gradient (EmoAiry, EmoTion: ``+-eta`` on every coordinate, however small
      its gradient) overshoot long before ``c`` turns negative; they grow only while ``c`` exceeds
      +0.01. Sign steps of a momentum blend (EmoCats, Lion) grow like Adam steps, held by the
      Polyak bound: a step of ``+-eta`` lowers the loss by about ``eta * |g|_1``, so
      ``F / L`` is the step that would take it to 0 (its lower bound for a cross-entropy), and
      they take a fifth of it. The bound anneals them where the loss falls toward 0 (a task the
      model can fit) and holds them up where it stays high. Every constant chosen by
      measurement (bench/README.md "Pulse study", docs/decisions.md).
    - A loss that rises above its recent level pulls eta down (up to ``e**-MAX_CHANGE`` per
      step): the fast reaction to spikes, and what bounds the Adam kind's growth.
    With a recheck (the optimizers' ``step(..., recheck=fn)``: the same minibatch's loss after
    the update), the growth has a veto::

        ratio     = (f(x) - f(x_new)) / <g, x - x_new>    # the decrease achieved / the one predicted
        ratio_avg = ema_0.9(clamp(ratio, -1, 1))          # -1 when <g, x - x_new> <= 0 or f(x_new) not finite
        if ratio_avg < VETO (0.65): eta may not grow this step (it may shrink)

    A ratio near 1 says the step is still in the region where the loss is linear; it falls as
    the step nears the curvature's scale. Measured (bench/README.md "Stop 22"): EmoSens on the
    char-LM 1.069x the best AdamW without it, 1.038x with it (20 seeds); digits within 1.05x of
    the best scope either way, the QLoRA recipe unchanged. Without recheck (``ratio_avg`` None)
    nothing changes.
    eta never anneals below ``STOP_RATIO`` (1/100) of the largest value it reached, except where
    the Polyak bound is lower (the floor then lifts it back at most ``e**MAX_CHANGE`` per step:
    eta never rises faster than that); the stop signal (advice, the scope is untouched) holds while it
    sits at or under that floor. Core steps 1-6 run as in v3.8 (the shadow reads ``scalar`` and
    ``trust``). The rule kind is configuration (:class:`~emoq.EmoPulseScheduler` takes
    ``rule_kind=``), not state: a checkpoint does not record it.

    Needs ``probe`` with every loss (``measure``): Emo optimizers and
    :class:`~emoq.EmoPulseScheduler` measure it; ``update(loss)`` alone raises ``ValueError``.
    A kind with the Polyak bound needs a loss >= 0 (``ValueError`` otherwise, before anything
    changes). Traps: ``rise`` is relative to the loss level, so a loss with a large constant
    offset reacts less to its noise, and a loss near zero more (on digits eta anneals once the
    training loss is ~1e-3); the Polyak bound takes 0 as the loss's lower bound, so an offset
    loosens it. Design and measurements: docs/pulse.md, docs/decisions.md, bench/README.md.
    """

    name = "adaptive"
    needs_probe = True
    _FIELDS = ("log_eta", "log_peak", "cos", "avg_loss", "avg_l1", "ratio_avg")
    _OPTIONAL = EmoPulse._OPTIONAL + ("cos", "avg_loss", "avg_l1", "ratio_avg")
    #: fields a checkpoint from before they existed may lack: they restart (the bound's averages,
    #: the recheck ratio's average)
    _ADDED = ("avg_loss", "avg_l1", "ratio_avg")
    ETA0: ClassVar[dict[str, float]] = {"adam": 1e-3, "sign": 1e-4, "lion": 1e-4}
    GAIN = 1.0
    TARGET: ClassVar[dict[str, float]] = {"adam": -0.01, "sign": 0.01, "lion": -0.01}
    POLYAK: ClassVar[dict[str, float]] = {"lion": 0.2}
    AVERAGE = 0.9
    BACKOFF = 3.0
    MAX_CHANGE = 0.3
    ETA_MAX = 0.1
    STOP_RATIO = 0.01
    VETO = 0.65
    RATIO_AVERAGE = 0.9

    def reset(self) -> None:
        super().reset()
        self.log_eta = math.log(self.ETA0[self.rule_kind])
        self.log_peak = self.log_eta
        self.cos: float | None = None
        self.avg_loss: float | None = None
        self.avg_l1: float | None = None
        self.ratio_avg: float | None = None

    @property
    def uses_recheck(self) -> bool:  # type: ignore[override]
        """Adam-type steps only: on the charLM the veto held the sign kinds' eta too low (EmoAiry,
        EmoCats, EmoTion 1.056-1.060x their best scope with it, 1.041-1.052x without, seeds
        100-102; bench/README.md "Stop 22")."""
        return self.rule_kind == "adam"

    def record_ratio(self, ratio: float) -> None:
        """Average one recheck ratio, clamped to [-1, 1] (read by the next step's growth veto)."""
        if not self.uses_recheck:
            super().record_ratio(ratio)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
            raise ValueError(f"a recheck ratio must be a finite float, got {ratio!r}")
        ratio = max(-1.0, min(1.0, float(ratio)))
        w = self.RATIO_AVERAGE
        self.ratio_avg = ratio if self.ratio_avg is None else w * self.ratio_avg + (1 - w) * ratio

    def measure(self, params: list[Any], state: dict[Any, dict[str, Any]]) -> tuple[float, float, float, float]:
        from emoq.probe import distance_probe

        return distance_probe(params, state)

    def check_loss(self, loss: float) -> None:
        if loss < 0 and self.rule_kind in self.POLYAK:
            raise ValueError(f"pulse='adaptive' bounds a {self.rule_kind!r} step by a Polyak step, loss / |g|_1, "
                             f"which takes 0 as the loss's lower bound: the loss must be >= 0, got {loss!r} (add "
                             "the loss's lower bound to it, or use pulse='v3.8' or 'v3.9')")

    def check_state_dict(self, state: Any) -> dict[str, Any]:
        if isinstance(state, dict) and any(name not in state for name in self._ADDED):
            state = {**{name: None for name in self._ADDED}, **state}  # saved before the Polyak bound
        out = super().check_state_dict(state)
        for name in ("avg_loss", "avg_l1"):  # averages of a loss >= 0 and of a norm
            if out[name] is not None and out[name] < 0:
                raise ValueError(f"EmoPulse state {name!r} must be >= 0 or None, got {out[name]!r}")
        if out["ratio_avg"] is not None and not -1.0 <= out["ratio_avg"] <= 1.0:
            raise ValueError(f"EmoPulse state 'ratio_avg' must be in [-1, 1] or None, got {out['ratio_avg']!r}")
        return out

    def _growth(self, cos: float) -> float:
        """The change of ``log eta`` this step's cosine asks for (before the back-off and clamp)."""
        return self.GAIN * (cos - self.TARGET[self.rule_kind])

    def _observe(self, loss: float, probe: tuple[float, ...] | None) -> None:
        if (probe is None or len(probe) != 4 or not all(map(math.isfinite, probe))
                or min(probe[1], probe[2], probe[3]) < 0):
            raise ValueError("pulse='adaptive' needs its probe (<g, x0 - x>, |g|^2 >= 0, |x0 - x|^2 >= 0, |g|_1 >= 0), "
                             "finite, with every loss: use it through an Emo optimizer or EmoPulseScheduler, or pass "
                             "probe=pulse.measure(...)")
        super()._observe(loss, probe)
        gx, gg, xx, l1 = probe
        norms = math.sqrt(gg) * math.sqrt(xx)  # two roots: no overflow or underflow of gg * xx
        self.cos = max(-1.0, min(1.0, gx / norms)) if norms > 0 else None
        # loss rising above its recent level (fast EMA over the medium one), relative
        rise = max(0.0, (self.short - self.medium) / max(abs(self.medium), 1e-12))
        change = -self.BACKOFF * min(rise, 1.0)
        if self.cos is not None:
            change += self._growth(self.cos)
        last = self.log_eta
        self.log_eta += max(-self.MAX_CHANGE, min(self.MAX_CHANGE, change))
        # bounds in log space too, so it can never run away: at most ETA_MAX, at least
        # STOP_RATIO of the peak reached so far (annealed, not stopped), never below 1e-8; where
        # the Polyak bound held eta under that floor, the floor lifts it back at most as fast as
        # eta may grow (e**MAX_CHANGE per step), never at once
        ceiling = math.log(self.ETA_MAX)
        lowest = math.log(1e-8) - math.log(self.scope)
        floor = min(ceiling, max(lowest, self.log_peak + math.log(self.STOP_RATIO)), last + self.MAX_CHANGE)
        self.log_eta = max(floor, min(ceiling, self.log_eta))
        coef = self.POLYAK.get(self.rule_kind)
        if coef is not None:
            first = self.avg_loss is None or self.avg_l1 is None
            w = self.AVERAGE
            self.avg_loss = loss if first else w * self.avg_loss + (1 - w) * loss
            self.avg_l1 = l1 if first else w * self.avg_l1 + (1 - w) * l1
            if self.avg_l1 > 0:  # no gradient yet: no bound
                bound = coef * self.avg_loss / self.avg_l1
                # at most the bound (which may lie under the 1/100-of-peak floor), never below 1e-8
                self.log_eta = max(lowest, min(self.log_eta, math.log(bound) if bound > 0 else lowest))
        if self.ratio_avg is not None and self.ratio_avg < self.VETO:  # the recheck's veto on growth
            self.log_eta = min(self.log_eta, last)
        self.log_peak = max(self.log_peak, self.log_eta)

    def _step_size(self) -> float:
        # as v3.9: min with the upper bound first, then the 1e-8 floor (which wins for a scope < 1e-7)
        return max(min(self.scope * math.exp(self.log_eta), self.scope * self.ETA_MAX), 1e-8)

    def _stop_signal(self) -> bool:
        return self.log_eta <= self.log_peak + math.log(self.STOP_RATIO) + 1e-9
