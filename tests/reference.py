"""A plain Emo v3.8 reference written from SPEC.md alone, for the tests.

No in-place tricks, no storage policy, no base class: one function per SPEC rule, fp32 (or
whatever dtype the tensors have), evaluated in the order the page writes it.
"""

from __future__ import annotations

import math

import torch


class RefPulse:
    """SPEC.md "emoPulse", steps 1-9, as plain statements."""

    def __init__(self, lr=1.0, floor=1e-10, a=1e-6, b=1e-7):
        self.s = self.m = self.l = None
        self.noise, self.d, self.hist, self.scope = 1.0, 0.02, 1.0, lr
        self.floor, self.a, self.b = floor, a, b
        self.scalar = self.trust = 0.0
        self.should_stop = False

    def core(self, L):
        """Steps 1-6; returns (scalar, trust, N, D, bm) of this step."""
        if self.s is None:
            self.s = self.m = self.l = L
        self.s = 0.3 * L + 0.7 * self.s
        self.m = 0.05 * L + 0.95 * self.m
        self.l = 0.01 * L + 0.99 * self.l
        bl, bm = max(self.l, 1e-5), max(self.m, 1e-5)
        delta = self.l - self.s
        xl, xm = delta / bl, delta / bm
        if abs(xl) < 0.05:
            scalar = math.tanh(xl)
        elif abs(xm) * bm < abs(xl) * bl:
            scalar = math.tanh(xm)
        else:
            scalar = math.tanh(xl)
        trust = math.copysign(1 - abs(scalar), scalar)
        self.noise = 0.97 * self.noise + 0.03 * abs(scalar)
        self.d = 0.97 * self.d + 0.03 * abs(trust)
        N = abs(scalar - trust) + 0.1
        D = abs(max(self.noise, self.floor) - self.d) + 0.1
        r = (D / N) ** 2
        if r >= self.hist and trust >= 0.5:
            self.hist = min(r, 1.5 * self.hist)
        elif -0.5 <= trust <= 0.5:
            self.hist = 0.8 * r
        self.scalar, self.trust = scalar, trust
        return scalar, trust, N, D, bm

    def update(self, L):
        scalar, _, N, D, _ = self.core(L)
        eta = min(max(self.hist * self.scope * 1e-4, 1e-6), 3e-3)
        self.should_stop = abs(scalar) <= self.a and abs(N - D) <= self.b
        if self.should_stop:
            self.scope = 1.0
        return eta


class RefPulseV39(RefPulse):
    """SPEC.md "The v3.9 pulse" as plain statements: steps 1-6 of v3.8 with the 1e-10 floor,
    the chain factor c (it reads only this step's scalar, so it can follow step 6), then
    emoChain's step size and stop signal."""

    def __init__(self, lr=1.0):
        super().__init__(lr, floor=1e-10)
        self.c = 0.0

    def update(self, L):
        scalar, _, _, _, bm = self.core(L)
        self.c = 0.7 * self.c + 0.3 * scalar
        eta = self.hist * self.scope * max(100 ** self.c, 1e-2) * 1e-4
        eta = max(min(eta, self.scope * 3e-3), 1e-8)
        self.should_stop = (self.d - self.noise >= 0.3) and (bm <= 0.04)
        return eta


def sqrt(x):
    """The correctly rounded square root (IEEE 754). ATen's CPU float32 ``torch.sqrt`` (MKL VML)
    is 1 ulp off for ~17 % of inputs; the float64 root rounded once is exact for every float32."""
    return torch.sqrt(x.double()).to(x.dtype)


def factored(p):
    return p.dim() >= 2 and (p.shape[0] + p.shape[1]) / p.numel() < 0.05


class RefEmo:
    """family in {"sens", "airy", "cats", "tion"}; ``step(loss)`` updates ``params`` by reassigning
    ``.data``.

    ``naive=False`` (default) writes every ``a + c*b`` of SPEC.md as one rounding,
    ``torch.add(a, b, alpha=c)`` (likewise addcmul/addcdiv), the order SPEC.md prescribes for the
    sign blends. ``naive=True`` writes the same maths as plain Python arithmetic (two roundings):
    it agrees to ~1e-7 per step, but training amplifies such rounding differences (SPEC.md,
    "Rounding matters"), so long comparisons use the default.
    """

    FLOORS = {"sens": 1e-10, "airy": 1e-8, "cats": 1e-10, "tion": 1e-10}
    STOPS = {"sens": (1e-6, 1e-7), "airy": (1e-6, 1e-7), "cats": (5e-6, 5e-7), "tion": (5e-6, 5e-7)}

    def __init__(self, family, params, lr=1.0, betas=(0.9, 0.995), eps=1e-8, weight_decay=0.01,
                 use_shadow=False, naive=False, pulse="v3.8"):
        self.naive = naive
        self.family = family
        self.params = list(params)
        self.b1, self.b2 = betas
        self.eps, self.wd, self.use_shadow = eps, weight_decay, use_shadow
        self.pulse = RefPulse(lr, self.FLOORS[family], *self.STOPS[family]) if pulse == "v3.8" else RefPulseV39(lr)
        self.state = {}
        self.eta = None

    @torch.no_grad()
    def step(self, loss):
        eta = self.pulse.update(float(loss))
        self.eta = eta
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            st = self.state.setdefault(i, {})
            if self.use_shadow:
                if "shadow" not in st:
                    st["shadow"] = p.data.clone()
                scalar, trust = self.pulse.scalar, abs(self.pulse.trust)
                ratio = 1 - abs(scalar) if abs(scalar) > 0.625 else 0
                if ratio > 0:
                    p.data = (1 - ratio) * p.data + trust * st["shadow"]
                else:
                    st["shadow"] = st["shadow"] + 0.1 * trust * (p.data - st["shadow"])
            getattr(self, "_" + self.family)(p, p.grad, st, eta)

    def axpy(self, a, b, c):
        """a + c*b"""
        return a + c * b if self.naive else torch.add(a, b, alpha=c)

    def _sens(self, p, g, st, eta):
        m = st.get("m", torch.zeros_like(p))
        v = st.get("v", torch.zeros_like(p))
        m = self.axpy(self.b1 * m, g, 1 - self.b1)
        if self.naive:
            v = self.b2 * v + (1 - self.b2) * (g * g)
        else:
            v = torch.addcmul(self.b2 * v, g, g, value=1 - self.b2)
        st["m"], st["v"] = m, v
        x = p.data
        if self.wd != 0:
            x = self.axpy(x, x, -self.wd * eta)
        denom = sqrt(v) + self.eps
        p.data = x - eta * (m / denom) if self.naive else torch.addcdiv(x, m, denom, value=-eta)

    def _airy(self, p, g, st, eta):
        if factored(p):
            r = (g * g).mean(dim=tuple(range(1, g.dim())), keepdim=True) + self.eps
            c = (g * g).mean(dim=0, keepdim=True) + self.eps
            R = st.get("R", torch.zeros_like(r))
            C = st.get("C", torch.zeros_like(c))
            R = self.axpy(self.b1 * R, sqrt(r), 1 - self.b1)
            C = self.axpy(self.b1 * C, sqrt(c), 1 - self.b1)
            st["R"], st["C"] = R, C
            u = g / (sqrt(R * C) + self.eps)
        else:
            u = g / (g.abs().mean() + self.eps)
        x = self.axpy(p.data, p.data, -self.wd * eta)
        p.data = self.axpy(x, torch.sign(u), -eta)

    def _cats(self, p, g, st, eta):
        m = st.get("m", torch.zeros_like(p))
        x = p.data * (1 - eta * self.wd)
        u = torch.sign(self.axpy(g * (1 - self.b1), m, self.b1))
        p.data = self.axpy(x, u, -eta)
        st["m"] = self.axpy(self.b2 * m, g, 1 - self.b2)

    def _tion(self, p, g, st, eta):
        if factored(p):
            G = g.reshape(p.shape[0], -1)
            row = st.get("row", torch.zeros(G.shape[0], dtype=g.dtype, device=g.device))
            col = st.get("col", torch.zeros(G.shape[1], dtype=g.dtype, device=g.device))
            u = torch.sign(self.axpy(self.b1 * torch.outer(row, col), G, 1 - self.b1)).reshape(p.shape)
            st["row"] = self.axpy(self.b2 * row, G.mean(dim=1), 1 - self.b2)
            st["col"] = self.axpy(self.b2 * col, G.mean(dim=0), 1 - self.b2)
        else:
            u = torch.sign(g)
        x = self.axpy(p.data, p.data, -self.wd * eta)
        p.data = self.axpy(x, u, -eta)
