"""Research candidates for the adaptive pulse (bench/pulse_study.py specs ``... cand:NAME ...``).

Each candidate is an :class:`emoq.EmoPulse` subclass installed into an Emo optimizer in place
of its pulse; it measures what it needs from the optimizer's parameters itself (full tensors or
a strided subset), so it can try statistics the library does not compute. The library's
``pulse="adaptive"`` is the candidate that won (docs/decisions.md); the others stay here so
the study's negative results can be reproduced.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from emoq.pulse import EmoPulse


class Probe:
    """Strided subset of every parameter: x0, the previous x and an EMA ``s`` of weighted grads."""

    def __init__(self, opt: Any, stride: int = 1) -> None:
        self.opt, self.stride = opt, stride
        self.x0: dict[int, torch.Tensor] = {}
        self.prev: dict[int, torch.Tensor] = {}
        self.s: dict[int, torch.Tensor] = {}

    def _sub(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.detach().reshape(-1).float()
        return flat[:: self.stride] if self.stride > 1 else flat

    def measure(self, weight: float, beta: float) -> dict[str, float]:
        """Inner products on this step's gradients, before any parameter moves."""
        out = dict(g_x0=0.0, g_prev=0.0, g2=0.0, g1=0.0, prev2=0.0, s1=0.0, x0d2=0.0, n=0)
        for group in self.opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                key = id(p)
                g, x = self._sub(p.grad), self._sub(p)
                if key not in self.x0:
                    self.x0[key], self.prev[key] = x.clone(), x.clone()
                    self.s[key] = torch.zeros_like(x)
                x0, prev, s = self.x0[key], self.prev[key], self.s[key]
                out["g_x0"] += float(torch.dot(g, x0 - x))
                out["g_prev"] += float(torch.dot(g, prev - x))
                out["prev2"] += float((prev - x).square().sum())
                out["x0d2"] += float((x0 - x).square().sum())
                out["g2"] += float(g.square().sum())
                out["g1"] += float(g.abs().sum())
                s.mul_(beta).add_(g, alpha=weight)
                out["s1"] += float(s.abs().sum())
                out["n"] += g.numel()
                prev.copy_(x)
        return out


class Candidate(EmoPulse, register=False):
    """Base of the research candidates: v3.8 core plus a probe of the optimizer's parameters."""

    name = "cand"

    def attach(self, opt: Any, **kw: Any) -> None:
        self.opt = opt
        self.kw = kw
        self.probe = Probe(opt, kw.get("stride", 1))
        self.extra_init()

    def extra_init(self) -> None:
        pass


class Prodigy(Candidate, register=False):
    """Prodigy's distance estimate for every family: eta = c * d, d = max(d, A / ||s||_1)."""

    name = "cand-prodigy"

    def extra_init(self) -> None:
        self.dd0 = self.kw.get("d0", 1e-6)
        self.dist = self.dd0
        self.num = 0.0
        self.beta3 = self.kw.get("beta3", math.sqrt(0.995))
        self.coef = self.kw.get("coef", 1.0)

    def _distance(self, loss: float) -> dict[str, float]:
        """Core steps 1-6, then Prodigy's distance estimate ``d``; returns the probe's sums."""
        self._observe(float(loss), None)
        eta_prev = self.eta if self.eta is not None else self.dist * self.coef
        w = (self.dist / self.dd0) * eta_prev
        st = self.probe.measure(w, self.beta3)
        self.num = self.beta3 * self.num + w * st["g_x0"]
        if st["s1"] > 0:
            self.dist = max(self.dist, self.num / st["s1"])
        return st

    def update(self, loss: float, probe: Any = None) -> float:
        self._distance(loss)
        eta = self.coef * self.dist * self.scope * self._guard()
        self.should_stop = False
        self.eta = eta
        self.steps += 1
        return eta

    def _guard(self) -> float:
        return 1.0


class ProdigyGuard(Prodigy, register=False):
    """Prodigy estimate times v3.8's hist (the loss-history dynamics) capped at 1."""

    name = "cand-prodigy-hist"

    def _guard(self) -> float:
        return min(self.hist, 1.0)


class HyperCos(Candidate, register=False):
    """Multiplicative step size: log eta += k * cos(g_k, x_{k-1} - x_k) (hypergradient sign)."""

    name = "cand-hypercos"

    def extra_init(self) -> None:
        self.log_eta = math.log(self.kw.get("eta0", 1e-4))
        self.gain = self.kw.get("gain", 0.5)
        self.c_ema = 0.0

    def update(self, loss: float, probe: Any = None) -> float:
        self._observe(float(loss), None)
        st = self.probe.measure(0.0, 0.0)
        if st["prev2"] > 0 and st["g2"] > 0:
            cos = st["g_prev"] / math.sqrt(st["g2"] * st["prev2"])
            self.log_eta += self.gain * cos
        eta = math.exp(self.log_eta) * self.scope
        self.should_stop = False
        self.eta = eta
        self.steps += 1
        return eta


class DoG(Candidate, register=False):
    """Distance over gradients for normalised updates: eta = rbar / sqrt(sum of unit step^2).

    ``rbar`` = max RMS distance from the start (subset), unit step = RMS(x_{k-1} - x_k) / eta_{k-1}:
    grows while the motion is ballistic, settles once it is diffusive, then decays ~ 1/sqrt(t).
    """

    name = "cand-dog"

    def extra_init(self) -> None:
        self.r_eps = self.kw.get("r_eps", 1e-4)
        self.rbar = self.r_eps
        self.units = 0.0
        self.coef = self.kw.get("coef", 1.0)

    def update(self, loss: float, probe: Any = None) -> float:
        self._observe(float(loss), None)
        st = self.probe.measure(0.0, 0.0)
        n = max(st["n"], 1)
        self.rbar = max(self.rbar, math.sqrt(st["x0d2"] / n))
        if self.eta is not None:
            self.units += (st["prev2"] / n) / self.eta ** 2
        eta = self.coef * self.scope * (self.rbar / math.sqrt(self.units) if self.units > 0 else self.r_eps)
        self.should_stop = False
        self.eta = eta
        self.steps += 1
        return eta


class X0Cos(Candidate, register=False):
    """log eta += gain * (cos(g_k, x0 - x_k) - target): grow while the gradient still points
    along the way travelled from the start (Prodigy's signal, as a cosine), shrink slowly after."""

    name = "cand-x0cos"

    def extra_init(self) -> None:
        self.log_eta = math.log(self.kw.get("eta0", 1e-4))
        self.gain = self.kw.get("gain", 0.3)
        self.target = self.kw.get("target", 0.0)
        self.max_change = self.kw.get("max_change", 0.2)

    def update(self, loss: float, probe: Any = None) -> float:
        self._observe(float(loss), None)
        st = self.probe.measure(0.0, 0.0)
        if st["x0d2"] > 0 and st["g2"] > 0:
            cos = st["g_x0"] / math.sqrt(st["g2"] * st["x0d2"])
            change = self.gain * (cos - self.target)
            self.log_eta += max(-self.max_change, min(self.max_change, change))
        eta = math.exp(self.log_eta) * self.scope
        self.should_stop = False
        self.eta = eta
        self.steps += 1
        return eta


class ProdigyBackoff(Prodigy, register=False):
    """Prodigy's distance estimate d (the scale) times a factor b <= 1 that the loss noise pulls
    down and the cosine lets recover: log b += gain * (cos - target) - backoff * rise, log b <= 0."""

    name = "cand-prodigy-backoff"

    def extra_init(self) -> None:
        super().extra_init()
        self.log_b = 0.0
        self.gain = self.kw.get("gain", 1.0)
        self.target = self.kw.get("target", 0.0)
        self.backoff = self.kw.get("backoff", 3.0)
        self.max_change = self.kw.get("max_change", 0.3)

    def update(self, loss: float, probe: Any = None) -> float:
        st = self._distance(loss)
        rise = max(0.0, (self.short - self.medium) / max(abs(self.medium), 1e-12))
        change = -self.backoff * min(rise, 1.0)
        if st["x0d2"] > 0 and st["g2"] > 0:
            change += self.gain * (st["g_x0"] / math.sqrt(st["g2"] * st["x0d2"]) - self.target)
        self.log_b = min(0.0, max(math.log(1e-4), self.log_b + max(-self.max_change, min(self.max_change, change))))
        eta = self.coef * self.dist * self.scope * math.exp(self.log_b)
        self.should_stop = False
        self.eta = eta
        self.steps += 1
        return eta


CANDIDATES = {c.name[5:]: c for c in (Prodigy, ProdigyGuard, HyperCos, DoG, X0Cos, ProdigyBackoff)}


class Calibrated(Candidate, register=False):
    """The library's adaptive pulse, with the step of a sign rule scaled by ``kappa`` = the RMS of an
    Adam direction ``m / sqrt(v)`` (bias-corrected EMAs of the gradient on the probe's subset): a
    sign step moves every coordinate by eta, an Adam step by eta * |m / sqrt(v)|, so ``kappa``
    puts both in the same units. EmoSens (an Adam rule) keeps ``kappa = 1``.
    Keys: ``gain``, ``eta0``, ``backoff``, ``max_change``, ``sign`` (1: apply kappa), ``b1``, ``b2``,
    ``kpow`` (kappa ** kpow)."""

    name = "cand-calib"

    def extra_init(self) -> None:
        kw = self.kw
        # the library's adaptive pulse as it was when this candidate ran: the normalised cosine
        cls = raw_cosine(adaptive_variant(gain=kw.get("gain", 0.1), eta0=kw.get("eta0", 1e-4),
                                          backoff=kw.get("backoff", 3.0), max_change=kw.get("max_change", 0.3)),
                         0.0, True)
        self.inner = cls(self.initial_scope, self.noise_floor, self.stop_thresholds)
        self.apply_kappa = bool(kw.get("sign", 1.0))
        self.b1, self.b2 = kw.get("b1", 0.9), kw.get("b2", 0.999)
        self.kpow = kw.get("kpow", 1.0)
        self.m: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.kappa = 1.0
        self.t = 0
        self.chain = kw.get("chain", 0.0)  # > 0: times max(100**c, 1e-2) ** chain, c = v3.9's chain EMA
        self.c = 0.0

    def _kappa(self) -> float:
        self.t += 1
        num, n = 0.0, 0
        for group in self.opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.detach().reshape(-1)[::61].float()
                m = self.m.setdefault(id(p), torch.zeros_like(g))
                v = self.v.setdefault(id(p), torch.zeros_like(g))
                m.mul_(self.b1).add_(g, alpha=1 - self.b1)
                v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
                mh = m / (1 - self.b1 ** self.t)
                vh = v / (1 - self.b2 ** self.t)
                num += float((mh.square() / (vh + 1e-30)).sum())
                n += g.numel()
        return math.sqrt(num / max(n, 1))

    def update(self, loss: float, probe: Any = None) -> float:
        from emoq.probe import distance_probe

        params = [p for g in self.opt.param_groups for p in g["params"] if p.grad is not None]
        pr = distance_probe(params, self.opt.state)
        self.kappa = self._kappa() ** self.kpow if self.apply_kappa else 1.0
        self.inner.update(loss, pr)
        self._observe(float(loss), None)  # keeps the core (shadow) fields moving like the library's
        self.c = 0.7 * self.c + 0.3 * self.scalar
        eta = self.inner.eta * self.kappa * (max(100.0 ** self.c, 1e-2) ** self.chain if self.chain else 1.0)
        self.should_stop = False
        self.eta = eta
        self.steps += 1
        return eta


CANDIDATES["calib"] = Calibrated


def adaptive_variant(**constants: float) -> type:
    """The library's adaptive pulse with other constants (GAIN, TARGET, MAX_CHANGE, ETA_MAX, ...)."""
    from emoq.pulse import RULE_KINDS, EmoPulseAdaptive

    per_kind = ("ETA0", "TARGET")  # the library keeps these per rule kind: a candidate's value serves both
    attrs = {k.upper(): (dict.fromkeys(RULE_KINDS, v) if k.upper() in per_kind else v)
             for k, v in constants.items()}
    return type("AdaptiveVariant", (EmoPulseAdaptive,), attrs, register=False)


def raw_cosine(base: type, target: float, normalize: bool) -> type:
    """The adaptive pulse growing on ``GAIN * (signal - target)``, for every family alike: the
    signal is the raw cosine, or (``normalize``) its EMA over its RMS — the library's signal for
    every family until 26 Nov (``ema_0.9(c) / sqrt(ema_0.99(c**2))``, GAIN 0.1)."""

    def _growth(self: Any, cos: float) -> float:
        if not normalize:
            return self.GAIN * (cos - target)
        m = 0.9 * getattr(self, "cand_m", 0.0) + 0.1 * cos
        v = cos * cos if getattr(self, "cand_v", None) is None else 0.99 * self.cand_v + 0.01 * cos * cos
        self.cand_m, self.cand_v = m, v
        return self.GAIN * (m / (math.sqrt(v) + 1e-12) - target)

    return type("AdaptiveCandidate", (base,), {"_growth": _growth}, register=False)


def polyak_variant(coef: float, target: float, beta: float = 0.9, kinds: str = "sign",
                   adam_target: float | None = None, gain: float | None = None) -> type:
    """The library's adaptive pulse with its Polyak bound ``eta <= scope * coef * ema(f) / ema(|g|_1)``
    (``EmoPulseAdaptive.POLYAK``) on other kinds or with another share: on the sign kinds
    (``"sign"``, and ``"lion"`` since EmoCats has its own kind), plus ``"adam"`` with
    ``kinds="sign+adam"``. ``target`` is the sign kinds' cosine target (the library's +0.01 for
    ``"sign"``, or -0.01: grow by default and let the bound hold the step); ``adam_target`` and
    ``gain`` override the Adam kind's target and the gain. The library's ``rule_kind="lion"`` is
    ``polyak_variant(0.2, -0.01)`` on EmoCats. (Until stop 17's library change this candidate
    kept its own copy of the bound, with the L1 summed in Python floats and the cap divided by
    the scope; every recorded run used scope 1, and EmoCats' digits seed 100 gives the same held-out
    loss to the last digit either way.)"""
    from emoq.pulse import EmoPulseAdaptive

    bounded = set(kinds.split("+")) | {"lion"}
    attrs: dict[str, Any] = {
        "TARGET": {**EmoPulseAdaptive.TARGET, "sign": target, "lion": target,
                   **({"adam": adam_target} if adam_target is not None else {})},
        "POLYAK": dict.fromkeys(bounded, coef), "AVERAGE": beta}
    if gain is not None:
        attrs["GAIN"] = gain
    return type("PolyakCandidate", (EmoPulseAdaptive,), attrs, register=False)


def anchor_variant(beta: float, target: float | None = None, polyak: float | None = None) -> type:
    """The library's adaptive pulse measuring its cosine against a moving anchor instead of the
    start point: ``cos(g, a - x)`` with ``a <- beta * a + (1 - beta) * x`` on the probe's subset
    (``a`` starts at ``x0``; window ~1/(1-beta) steps). The start point's displacement grows with
    the whole path, so late in a run its cosine with the gradient says little about the current
    scale; a recent anchor asks whether the last ~1/(1-beta) steps overshoot. ``target``
    overrides every kind's target; ``polyak`` the lion kind's bound share."""
    from emoq import probe as library_probe
    from emoq.pulse import RULE_KINDS, EmoPulseAdaptive

    def measure(self: Any, params: list, state: dict) -> tuple[float, float, float, float]:
        out = library_probe.distance_probe(params, state)
        with torch.no_grad():
            for p in params:  # move the anchor (the probe's x0) toward x, after the sums
                a = state[p].get(library_probe.STATE_NAME)
                if a is not None:
                    a.mul_(beta).add_(library_probe._subset(p).float(), alpha=1 - beta)
        return out

    attrs: dict[str, Any] = {"measure": measure}
    if target is not None:
        attrs["TARGET"] = dict.fromkeys(RULE_KINDS, target)
    if polyak is not None:
        attrs["POLYAK"] = {"lion": polyak}
    return type("AnchorCandidate", (EmoPulseAdaptive,), attrs, register=False)


def twophase_variant(hold: float, beta: float = 0.9, eta0: float | None = None) -> type:
    """The library's adaptive pulse, Adam kind: grows on ``cos - TARGET`` (-0.01) until the first
    overshoot (an EMA_beta of the cosine under the target), then holds on ``cos - hold``: the
    start point's cosine tells step sizes apart early in a run (charLM, seed 102, first 30 steps:
    -0.009 at eta 6e-3, -0.018 at 1.2e-2) and hardly later (-0.002 at every eta from 6e-3 to 2e-2),
    so the first crossing is the scale, and the later drift is stopped by a stricter target."""
    from emoq.pulse import EmoPulseAdaptive

    def _growth(self: Any, cos: float) -> float:
        target = self.TARGET[self.rule_kind]
        avg = getattr(self, "cand_avg", None)
        self.cand_avg = cos if avg is None else beta * avg + (1 - beta) * cos
        if self.cand_avg < target:
            self.cand_crossed = True
        return self.GAIN * (cos - (hold if getattr(self, "cand_crossed", False) else target))

    attrs: dict[str, Any] = {"_growth": _growth}
    if eta0 is not None:
        attrs["ETA0"] = {**EmoPulseAdaptive.ETA0, "adam": eta0}
    return type("TwoPhaseCandidate", (EmoPulseAdaptive,), attrs, register=False)


def decaying_gain_variant(gain0: float, tau: float, eta0: float | None = None) -> type:
    """The library's adaptive pulse with a gain that decays like a stochastic-approximation step,
    ``GAIN_t = gain0 / sqrt(1 + t / tau)`` (``t`` the pulse's step count): fast to the cosine's
    early equilibrium, slower drift later, where the start point's cosine separates step sizes less."""
    from emoq.pulse import EmoPulseAdaptive

    def _growth(self: Any, cos: float) -> float:
        return gain0 / math.sqrt(1.0 + self.steps / tau) * (cos - self.TARGET[self.rule_kind])

    attrs: dict[str, Any] = {"_growth": _growth}
    if eta0 is not None:
        attrs["ETA0"] = {**EmoPulseAdaptive.ETA0, "adam": eta0}
    return type("DecayingGainCandidate", (EmoPulseAdaptive,), attrs, register=False)


def install(opt: Any, spec: str) -> None:
    """Replace ``opt``'s pulse by the candidate ``spec`` = ``name[,key=value...]``."""
    name, *pairs = spec.split(",")
    kw = {k: float(v) for k, v in (pair.split("=") for pair in pairs)}
    if name == "adaptive":  # the library class, constants overridden
        # the defaults every recorded spec ran with: the raw cosine, GAIN 1, target 0, start 1e-4,
        # the same for every family (the library's start and target depend on the rule kind)
        kw = {"normalize": 0.0, "gain": 1.0, "eta0": 1e-4, **kw}
        cls = adaptive_variant(**{k: v for k, v in kw.items() if k not in ("normalize", "target")})
        cls = raw_cosine(cls, kw.get("target", 0.0), bool(kw["normalize"]))
        opt._pulse = cls(opt._pulse.initial_scope, opt.noise_floor, opt.stop_thresholds)
        return
    if name == "polyak":  # the library's adaptive pulse plus a Polyak bound for sign rules
        cls = polyak_variant(kw.get("c", 0.1), kw.get("target", 0.01), kw.get("beta", 0.9),
                             "sign+adam" if kw.get("adam", 0.0) else "sign", kw.get("atarget"), kw.get("gain"))
        opt._pulse = cls(opt._pulse.initial_scope, opt.noise_floor, opt.stop_thresholds, rule_kind=opt.rule_kind)
        return
    if name == "twophase":  # the library's adaptive pulse, a stricter target after the first overshoot
        cls = twophase_variant(kw.get("hold", 0.0), kw.get("beta", 0.9), kw.get("eta0"))
        opt._pulse = cls(opt._pulse.initial_scope, opt.noise_floor, opt.stop_thresholds, rule_kind=opt.rule_kind)
        return
    if name == "decay":  # the library's adaptive pulse, gain decaying as 1/sqrt(1 + t/tau)
        cls = decaying_gain_variant(kw.get("gain", 1.0), kw.get("tau", 1e30), kw.get("eta0"))
        opt._pulse = cls(opt._pulse.initial_scope, opt.noise_floor, opt.stop_thresholds, rule_kind=opt.rule_kind)
        return
    if name == "anchor":  # the library's adaptive pulse, cosine against a moving anchor
        cls = anchor_variant(kw.get("beta", 0.95), kw.get("target"), kw.get("c"))
        opt._pulse = cls(opt._pulse.initial_scope, opt.noise_floor, opt.stop_thresholds, rule_kind=opt.rule_kind)
        return
    if "stride" in kw:
        kw["stride"] = int(kw["stride"])
    cand = CANDIDATES[name](opt._pulse.initial_scope, opt.noise_floor, opt.stop_thresholds)
    cand.attach(opt, **kw)
    opt._pulse = cand
