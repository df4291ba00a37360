"""emoPulse (SPEC.md steps 1-9): closed forms, exact arithmetic, the quirk, fuzzing, state."""

import math

import mpmath
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import emoq
from emoq.pulse import ETA_MAX, ETA_MIN, EmoPulse


def exact_pulse(losses, scope=1.0, floor=1e-10, stop=(1e-6, 1e-7)):
    """SPEC.md in 50-digit arithmetic. The step-2 branch test is a float64 rounding accident (in
    exact arithmetic both sides are equal), so it is decided on float64 EMAs kept alongside."""
    mp = mpmath.mp
    mp.dps = 50
    s = m = l = None
    noise, d, hist = mp.mpf(1), mp.mpf("0.02"), mp.mpf(1)
    out = []
    fs = fm = fl = None
    for loss in losses:
        L = mp.mpf(loss)
        if s is None:
            s = m = l = L
            fs = fm = fl = float(loss)
        fs, fm, fl = 0.3 * loss + 0.7 * fs, 0.05 * loss + 0.95 * fm, 0.01 * loss + 0.99 * fl
        fbl, fbm, fdelta = max(fl, 1e-5), max(fm, 1e-5), fl - fs
        s = mp.mpf("0.3") * L + mp.mpf("0.7") * s
        m = mp.mpf("0.05") * L + mp.mpf("0.95") * m
        l = mp.mpf("0.01") * L + mp.mpf("0.99") * l
        bl, bm = max(l, mp.mpf("1e-5")), max(m, mp.mpf("1e-5"))
        delta = l - s
        xl, xm = delta / bl, delta / bm
        if abs(xl) < mp.mpf("0.05"):
            scalar = mp.tanh(xl)
        elif abs(fdelta / fbm) * fbm < abs(fdelta / fbl) * fbl:
            scalar = mp.tanh(xm)
        else:
            scalar = mp.tanh(xl)
        trust = (1 - abs(scalar)) * (1 if scalar >= 0 else -1)
        noise = mp.mpf("0.97") * noise + mp.mpf("0.03") * abs(scalar)
        d = mp.mpf("0.97") * d + mp.mpf("0.03") * abs(trust)
        N = abs(scalar - trust) + mp.mpf("0.1")
        D = abs(max(noise, mp.mpf(floor)) - d) + mp.mpf("0.1")
        r = (D / N) ** 2
        if r >= hist and trust >= mp.mpf("0.5"):
            hist = min(r, mp.mpf("1.5") * hist)
        elif mp.mpf("-0.5") <= trust <= mp.mpf("0.5"):
            hist = mp.mpf("0.8") * r
        eta = min(max(hist * scope * mp.mpf("1e-4"), mp.mpf("1e-6")), mp.mpf("3e-3"))
        if abs(scalar) <= stop[0] and abs(N - D) <= stop[1]:
            scope = 1.0
        out.append(float(eta))
    return out


SEQUENCES = {
    "jump_up": [1.0, 2.0, 2.0, 1.5],
    "geometric_decay": [0.97 ** k for k in range(60)],  # slow steady progress: hist grows by 1.5x
    "plateau_then_drop": [3.0] * 10 + [1.0] * 10,
    "noisy": [2.0 + 0.3 * math.sin(1.7 * k) for k in range(50)],
    "negative_losses": [-1.0 - 0.1 * k for k in range(30)],  # log-likelihood style
    "near_zero": [1e-7 * (k % 3) for k in range(30)],
}


@pytest.mark.parametrize("name", SEQUENCES)
def test_pulse_matches_exact_arithmetic(name):
    losses = SEQUENCES[name]
    pulse = EmoPulse()
    got = [pulse.update(x) for x in losses]
    want = exact_pulse(losses)
    for step, (a, b) in enumerate(zip(got, want)):
        assert a == pytest.approx(b, rel=1e-9), (name, step)


def test_constant_loss_closed_form():
    # Constant loss L: s = m = l = L, delta = 0, scalar = 0, trust = +1, so
    # noise_k = 0.97^k, d_k = 1 - 0.98*0.97^k, r < 1 = hist forever and eta = 1e-4 * scope.
    # The stop signal |N - D| = 1.98*0.97^k <= 1e-7 first holds at k = ceil(log(1.98e7)/-log(0.97)).
    pulse = EmoPulse(scope=2.0)
    k_stop = math.ceil(math.log(1.98e7) / -math.log(0.97))
    for k in range(1, k_stop + 3):
        eta = pulse.update(0.7)
        assert pulse.noise == pytest.approx(0.97 ** k, rel=1e-9)
        assert pulse.d == pytest.approx(1 - 0.98 * 0.97 ** k, rel=1e-9)
        assert pulse.hist == 1.0
        if k < k_stop:
            assert not pulse.should_stop and eta == pytest.approx(2e-4, rel=1e-15)
        elif k == k_stop:
            # the signal fires on this step; eta was computed before the scope reset
            assert pulse.should_stop and eta == pytest.approx(2e-4, rel=1e-15) and pulse.scope == 1.0
        else:
            assert pulse.should_stop and eta == pytest.approx(1e-4, rel=1e-15)


def test_first_steps_by_hand():
    # loss 1 then 2. Step 1: scalar 0, trust +1, noise .97, d .0494, N 1.1, D 1.0206,
    # r = (1.0206/1.1)^2 < hist = 1 and trust >= .5 -> hist stays 1: eta = 1e-4.
    pulse = EmoPulse()
    assert pulse.update(1.0) == pytest.approx(1e-4, rel=1e-15)
    assert (pulse.noise, pulse.d) == (pytest.approx(0.97), pytest.approx(0.0494))
    # Step 2: s = 1.3, m = 1.05, l = 1.01, delta = -.29, xl = -.29/1.01, scalar = tanh(xl),
    # trust = -(1 - |scalar|) < -0.5 -> hist unchanged: eta = 1e-4.
    assert pulse.update(2.0) == pytest.approx(1e-4, rel=1e-15)
    scalar = math.tanh(-0.29 / 1.01)
    assert pulse.scalar == pytest.approx(scalar, rel=1e-12)
    assert pulse.trust == pytest.approx(-(1 - abs(scalar)), rel=1e-12)


def test_quirk_branch_is_taken_on_a_rounding_accident():
    # For these two losses |xm|*bm < |xl|*bl holds in float64 although both equal |delta|:
    # SPEC.md says to evaluate it as written, so the scalar is tanh(xm), not tanh(xl).
    a, b = 2.6788738728803985, 8.069775487428922
    pulse = EmoPulse()
    pulse.update(a)
    pulse.update(b)
    s = 0.3 * b + 0.7 * (0.3 * a + 0.7 * a)
    m = 0.05 * b + 0.95 * (0.05 * a + 0.95 * a)
    l_ = 0.01 * b + 0.99 * (0.01 * a + 0.99 * a)
    xm = (l_ - s) / m
    xl = (l_ - s) / l_
    assert abs(xm) * m < abs(xl) * l_
    assert pulse.scalar == math.tanh(xm) and math.tanh(xm) != math.tanh(xl)


losses = st.one_of(
    st.floats(min_value=0.0, max_value=10.0),
    st.floats(min_value=1e-30, max_value=1e-3),
    st.floats(min_value=1e3, max_value=1e300),
    st.just(0.0),
    st.floats(min_value=-1e6, max_value=0.0),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(losses, min_size=1, max_size=80), st.floats(min_value=1e-3, max_value=1e3))
def test_eta_stays_finite_and_bounded(seq, scope):
    pulse = EmoPulse(scope=scope)
    for x in seq:
        eta = pulse.update(x)
        assert math.isfinite(eta) and ETA_MIN <= eta <= ETA_MAX
        assert math.isfinite(pulse.hist) and pulse.hist >= 0
        assert 0 <= pulse.noise <= 1 and 0 <= pulse.d <= 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=100.0), min_size=2, max_size=40), st.data())
def test_state_dict_resumes_exactly(seq, data):
    cut = data.draw(st.integers(min_value=1, max_value=len(seq) - 1))
    full = EmoPulse()
    want = [full.update(x) for x in seq]
    first = EmoPulse()
    for x in seq[:cut]:
        first.update(x)
    resumed = EmoPulse()
    resumed.load_state_dict(first.state_dict())
    assert [resumed.update(x) for x in seq[cut:]] == want[cut:]
    assert resumed.state_dict() == full.state_dict()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_loss_is_refused(bad):
    with pytest.raises(ValueError, match="non-finite"):
        EmoPulse().update(bad)


@pytest.mark.parametrize("scope", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scope(scope):
    with pytest.raises(ValueError, match="scope"):
        EmoPulse(scope=scope)


def test_family_constants():
    # SPEC.md step 5 floor and step 9 thresholds per family
    assert emoq.EmoAiry.noise_floor == 1e-8
    assert emoq.EmoSens.noise_floor == emoq.EmoCats.noise_floor == emoq.EmoTion.noise_floor == 1e-10
    assert emoq.EmoSens.stop_thresholds == emoq.EmoAiry.stop_thresholds == (1e-6, 1e-7)
    assert emoq.EmoCats.stop_thresholds == emoq.EmoTion.stop_thresholds == (5e-6, 5e-7)
