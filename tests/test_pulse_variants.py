"""pulse= variants (emoq/pulse.py): v3.9 against its plain reference, the state_dict contract,
bit-exact resume of every variant, construction errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import emoq
from emoq.pulse import EmoPulse, EmoPulseV39
from tests.conftest import make_net, train
from tests.reference import RefPulseV39
from tests.test_core_pulse import SEQUENCES, losses
from tests.test_core_rules import FAMILIES, run_pair

VARIANTS = EmoPulse.names()


def test_variants_are_registered():
    assert VARIANTS[:3] == ["v3.8", "v3.9", "adaptive"]
    for name in VARIANTS:
        pulse = EmoPulse(pulse=name)
        assert isinstance(pulse, EmoPulse) and pulse.name == name


# ---------------------------------------------------------------- v3.9 against its reference
@pytest.mark.parametrize("name", SEQUENCES)
@pytest.mark.parametrize("scope", [1.0, 0.01, 30.0])
def test_v39_matches_plain_reference(name, scope):
    pulse, ref = EmoPulse(scope, pulse="v3.9"), RefPulseV39(scope)
    for x in SEQUENCES[name]:
        assert pulse.update(x) == ref.update(x)
        assert (pulse.should_stop, pulse.scalar, pulse.trust) == (ref.should_stop, ref.scalar, ref.trust)
        assert (pulse.c, pulse.hist, pulse.noise, pulse.d) == (ref.c, ref.hist, ref.noise, ref.d)


@settings(max_examples=200, deadline=None)
@given(st.lists(losses, min_size=1, max_size=60), st.floats(min_value=1e-3, max_value=1e3))
def test_v39_fuzzed_against_reference_and_bounded(seq, scope):
    pulse, ref = EmoPulseV39(scope), RefPulseV39(scope)
    for x in seq:
        eta = pulse.update(x)
        assert eta == ref.update(x) and pulse.should_stop == ref.should_stop
        assert math.isfinite(eta) and 1e-8 <= eta <= scope * 3e-3
        assert -1.0 <= pulse.c <= 1.0


def test_v39_constant_loss_closed_form():
    # Constant loss L: scalar = 0 so c = 0 and eta = 1e-4 * scope (hist stays 1, as in v3.8).
    # d - noise = 1 - 1.98 * 0.97^k reaches 0.3 at k = 35; the stop signal also needs bm = L <= 0.04.
    for loss, stops in ((0.03, True), (0.5, False)):
        pulse = EmoPulse(7.0, pulse="v3.9")
        for k in range(1, 60):
            assert pulse.update(loss) == pytest.approx(7e-4, rel=1e-15)
            assert pulse.should_stop == (stops and k >= 35), k
            assert pulse.scope == 7.0  # v3.9 never resets the scope


def test_v39_floor_and_clamps():
    pulse = EmoPulse(2.0, noise_floor=1e-8, pulse="v3.9")
    assert pulse.noise_floor == 1e-10  # v3.9: one floor for every family
    for x in [10.0] + [10.0 * 0.5 ** k for k in range(1, 40)]:  # fast progress: c -> 1, eta capped
        eta = pulse.update(x)
    assert eta == 2.0 * 3e-3
    for x in [1.0 * 2 ** k for k in range(40)]:  # loss blows up: c -> -1, eta at the 1e-8 floor or above
        eta = pulse.update(x)
        assert 1e-8 <= eta <= 6e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_v39_optimizer_matches_reference_300_steps(family, batch):
    worst_p, worst_eta, final_loss = run_pair(family, batch, 300, pulse="v3.9", lr=0.3)
    assert worst_p < 1e-4, worst_p
    assert worst_eta < 1e-6, worst_eta
    assert math.isfinite(final_loss)


# ---------------------------------------------------------------- state_dict contract
@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_is_flat_plain_scalars_naming_the_variant(name):
    pulse = EmoPulse(pulse=name)
    for x in (3.0, 2.0, 2.5, 1.0):
        pulse.update(x, (0.5, 1.0, 1.0, 1.0))  # the probe: the adaptive pulse's statistics, ignored by the others
    sd = pulse.state_dict()
    assert sd["pulse"] == name
    assert all(v is None or type(v) in (float, int, bool, str) for v in sd.values()), sd
    assert [k for k, v in sd.items() if type(v) is str] == ["pulse"]


@pytest.mark.parametrize("saved", VARIANTS)
@pytest.mark.parametrize("target", VARIANTS)
def test_loading_another_variant_raises_and_changes_nothing(saved, target):
    if saved == target:
        return
    a, b = EmoPulse(pulse=saved), EmoPulse(pulse=target)
    a.update(1.0, (0.5, 1.0, 1.0, 1.0))
    b.update(2.0, (0.5, 1.0, 1.0, 1.0))
    before = b.state_dict()
    with pytest.raises(ValueError, match=f"{saved!r} pulse state"):
        b.load_state_dict(a.state_dict())
    assert b.state_dict() == before


def test_v38_loads_a_state_saved_before_variants_existed():
    pulse = EmoPulse()
    pulse.update(1.0)
    old = {k: v for k, v in pulse.state_dict().items() if k != "pulse"}
    fresh = EmoPulse()
    fresh.load_state_dict(old)
    assert fresh.state_dict() == pulse.state_dict()
    with pytest.raises(ValueError, match="'v3.8' pulse state"):
        EmoPulse(pulse="v3.9").load_state_dict(old)


def test_corrupted_state_raises_and_changes_nothing():
    pulse = EmoPulse(pulse="v3.9")
    pulse.update(1.0)
    before = pulse.state_dict()
    bad = dict(before, hist="many")
    with pytest.raises(ValueError, match="hist"):
        pulse.load_state_dict(bad)
    with pytest.raises(KeyError, match="'c'"):
        pulse.load_state_dict({k: v for k, v in before.items() if k != "c"})
    assert pulse.state_dict() == before


@pytest.mark.parametrize("name", VARIANTS)
@settings(max_examples=40, deadline=None)
@given(seq=st.lists(st.floats(min_value=0.0, max_value=100.0), min_size=2, max_size=40), data=st.data())
def test_every_variant_resumes_bit_exactly(name, seq, data):
    cut = data.draw(st.integers(min_value=1, max_value=len(seq) - 1))
    def probe(x):  # the adaptive pulse's statistics (v3.8 and v3.9 ignore them)
        return (math.sin(x), 1.0 + x, 2.0, 3.0 + x)

    full = EmoPulse(pulse=name)
    want = [full.update(x, probe(x)) for x in seq]
    first = EmoPulse(pulse=name)
    for x in seq[:cut]:
        first.update(x, probe(x))
    resumed = EmoPulse(pulse=name)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.update(x, probe(x)) for x in seq[cut:]] == want[cut:]
    assert resumed.state_dict() == full.state_dict()


# ---------------------------------------------------------------- construction
@pytest.mark.parametrize("bad", ["v3.7", "", None, 3.9, "ADAPTIVE", ["v3.9"]])
def test_unknown_variant_raises(bad):
    p = torch.nn.Parameter(torch.ones(2))
    error = ValueError if isinstance(bad, str) else TypeError  # a name that is not a str is a TypeError
    if bad is not None:
        with pytest.raises(error, match="pulse must be one of"):
            EmoPulse(pulse=bad)
        with pytest.raises(error, match="pulse must be one of"):
            emoq.EmoPulseScheduler(torch.optim.SGD([p], lr=0.1), pulse=bad)
    with pytest.raises(error, match="pulse must be one of"):
        emoq.EmoSens([p], pulse=bad)


def test_scheduler_checkpoint_of_another_variant_names_the_fix():
    p = torch.nn.Parameter(torch.ones(2))
    saved = emoq.EmoPulseScheduler(torch.optim.SGD([p], lr=0.1), pulse="v3.9").state_dict()
    sched = emoq.EmoPulseScheduler(torch.optim.SGD([p], lr=0.1))
    before = sched.state_dict()
    with pytest.raises(ValueError, match=r"EmoPulseScheduler\) with pulse='v3.9'"):
        sched.load_state_dict(saved)
    assert sched.state_dict() == before


def test_variant_class_refuses_another_name():
    with pytest.raises(ValueError, match="not 'v3.8'"):
        EmoPulseV39(pulse="v3.8")


@pytest.mark.parametrize("name", VARIANTS)
def test_optimizer_checkpoint_refuses_another_variant(name, batch):
    other = next(v for v in VARIANTS if v != name)
    net = make_net()
    opt = emoq.EmoCats(net.parameters(), pulse=name)
    train(net, opt, batch, 3)
    sd = opt.state_dict()
    fresh = emoq.EmoCats(make_net().parameters(), pulse=other)
    with pytest.raises(ValueError, match=f"pulse={name!r}"):
        fresh.load_state_dict(sd)
