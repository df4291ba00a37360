"""Fuzz (hypothesis): random hyper-parameters, shapes, dtypes, precisions, gradients, losses and
state-dict corruptions. Every outcome is one of: a clear exception with the optimizer, its
parameters and its pulse exactly as before; a skipped step (same, plus one skip counted); or a
step that is finite everywhere and, on the reference-exact fp32 path, equal to tests/reference.py.
Never a half-applied or non-finite step."""

import copy
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import emoq
from emoq.optim.base import SQUARES_LIMIT, grad_limit
from tests.conftest import emo_record, same_tree, share_record, snapshot
from tests.reference import RefEmo

FAMILIES = {"sens": emoq.EmoSens, "airy": emoq.EmoAiry, "cats": emoq.EmoCats, "tion": emoq.EmoTion}
PRECISIONS = ["fp32", "bf16", "8bit", "4bit", "fp8"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# zero-size, one element, 1-D, 2-D/3-D/4-D, factored and not, multiples of the low-bit blocks
SHAPES = [(0, 5), (3, 0, 2), (1,), (5,), (7, 13), (2, 3, 4), (2, 3, 2, 2), (16, 16), (2, 128), (4, 8, 8),
          (8, 4, 4, 2), (64, 64)]
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_LOADS = settings(FUZZ, max_examples=40)


@pytest.fixture(autouse=True, scope="module")
def eager_kernels():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMOQ_COMPILE", "0")  # the fused formulas without compile time
        yield


@st.composite
def optimizers(draw):
    family = draw(st.sampled_from(sorted(FAMILIES)))
    cls = FAMILIES[family]
    dtype = draw(st.sampled_from(DTYPES[:1] * 2 + DTYPES))
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3))
    eps_low = 0.0 if cls.eps_in_denominator is False else 1e-30
    kw = dict(
        lr=draw(st.floats(0.05, 20.0)),
        betas=(draw(st.floats(0.0, 0.999)), draw(st.floats(0.0, 0.9999))),
        eps=draw(st.one_of(st.just(eps_low), st.floats(max(eps_low, 1e-12), 1e-2))) if eps_low == 0 else
        draw(st.floats(1e-30, 1e-2)),
        weight_decay=draw(st.sampled_from([0.0, 0.01, 0.5])),
        use_shadow=draw(st.booleans()),
        state_precision=draw(st.sampled_from(PRECISIONS[:1] * 2 + PRECISIONS)),
        compensation=draw(st.sampled_from(["none", "stochastic", "error_feedback", "error_feedback8"])),
        min_lowbit_size=0,
    )
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    return family, cls, params, kw, gen


@st.composite
def gradients(draw, params, gen):
    grads = []
    for p in params:
        kind = draw(st.sampled_from(["none"] + ["normal"] * 5 + ["tiny", "huge", "spike", "zeros", "nonfinite"]))
        if kind == "none":
            grads.append(None)
            continue
        g = torch.randn(p.shape, generator=gen)
        if kind == "tiny":
            g *= 1e-30
        elif kind == "huge" and p.numel():  # around the overflow limit, either side
            g *= grad_limit(p.numel()) * draw(st.sampled_from([0.3, 0.99, 1.5, 1e3]))
        elif kind == "spike" and p.numel():
            g.view(-1)[draw(st.integers(0, p.numel() - 1))] = draw(st.sampled_from([1e20, -3e38, 1e5]))
        elif kind == "zeros":
            g.zero_()
        elif kind == "nonfinite" and p.numel():
            g.view(-1)[0] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        grads.append(g.to(p.dtype))  # fp16 saturates to inf above 65504: a non-finite gradient
    return grads


def grads_acceptable(params, grads):
    """The engine's rule (emoq.optim.base.grads_in_range): every gradient finite, with a sum of
    squares within SQUARES_LIMIT. ``None`` where a sum lies within 1e-4 of the limit (the engine
    sums in fp32: either side). Entries above ``grad_limit`` alone do not make a step skip."""
    verdict = True
    for p, g in zip(params, grads):
        if g is None or p.numel() == 0:
            continue
        if not bool(torch.isfinite(g).all()):
            return False
        squares = float(g.double().square().sum())
        if squares > SQUARES_LIMIT * (1 + 1e-4):
            return False
        if squares > SQUARES_LIMIT * (1 - 1e-4):
            verdict = None
    return verdict


def assert_finite(opt):
    for group in opt.param_groups:
        for p in group["params"]:
            assert bool(torch.isfinite(p).all()), "non-finite weight"
            for name, s in opt.state[p].items():
                value = s if name in ("shadow", "residual") else opt._storage.load(s)
                assert bool(torch.isfinite(value.float()).all()), f"non-finite state {name}"


@FUZZ
@given(data=st.data())
def test_fuzz_steps_are_all_or_nothing_and_finite(data):
    family, cls, params, kw, gen = data.draw(optimizers())
    opt = cls(params, **kw)
    exact = kw["state_precision"] == "fp32" and all(p.dtype == torch.float32 for p in params)
    if exact:  # the reference-exact path: tests/reference.py in lockstep
        ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        ref = RefEmo(family, ref_params, lr=kw["lr"], betas=kw["betas"], eps=kw["eps"],
                     weight_decay=kw["weight_decay"], use_shadow=kw["use_shadow"])
    for _ in range(data.draw(st.integers(1, 3))):
        grads = data.draw(gradients(params, gen))
        for p, g in zip(params, grads):
            p.grad = g
        loss = data.draw(st.sampled_from([math.nan, math.inf, 1e300, -1e300]) if data.draw(st.integers(0, 9)) == 0
                         else st.floats(-1e3, 1e6))
        hostile = data.draw(st.sampled_from(["none"] * 9 + ["bad_betas", "two_sources", "bad_loss_type"]))
        before = snapshot(opt)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                if hostile == "bad_betas":
                    opt.param_groups[0]["betas"] = (1.5, 0.9)
                    try:
                        opt.step(loss=loss)
                    finally:
                        opt.param_groups[0]["betas"] = kw["betas"]
                elif hostile == "two_sources":
                    opt.record_loss(1.0)
                    try:
                        opt.step(loss=loss)
                    finally:
                        opt.discard_recorded_losses()
                elif hostile == "bad_loss_type":
                    opt.step(loss=[loss])
                else:
                    opt.step(loss=loss)
        except (ValueError, TypeError, RuntimeError) as err:
            assert hostile != "none", f"unexpected exception {err!r}"
            event("refused, nothing changed")
            after = snapshot(opt)
            assert same_tree(before["sd"], after["sd"]) and before["counters"] == after["counters"]
            assert all(torch.equal(a, b) for a, b in zip(before["params"], after["params"]))
            continue
        assert hostile == "none", "a hostile step did not raise"
        finite_loss = math.isfinite(loss)
        verdict = grads_acceptable(params, grads) if finite_loss else False
        if verdict is None:  # on the limit: the engine's fp32 sum decides
            event("gradient on the limit")
            verdict = snapshot(opt)["counters"][0] == before["counters"][0]
        if not verdict:  # skipped as a whole, and counted
            event("skipped")
            after = snapshot(opt)
            assert after["counters"][0] == before["counters"][0] + 1
            assert same_tree(before["sd"]["state"], after["sd"]["state"])
            assert emo_record(before["sd"])["pulse"] == emo_record(after["sd"])["pulse"]
            assert all(torch.equal(a, b) for a, b in zip(before["params"], after["params"]))
            continue
        assert_finite(opt)
        event("applied, compared with the reference" if exact else "applied, finite")
        if exact:
            for rp, g, p in zip(ref_params, grads, params):
                rp.grad = None if g is None or p.numel() == 0 else g.clone()
            ref.step(loss)
            assert opt.pulse == ref.eta
            for p, rp in zip(params, ref_params):
                assert torch.equal(p.detach(), rp.detach()), "differs from the reference"


# ---------------------------------------------------------------- state-dict corruptions
def _states(sd):
    return [(pid, name) for pid, st_ in sd["state"].items() for name in st_]


def _droppable(sd):
    """States whose removal is a corruption: dropping a param's only state leaves {}, which is a
    legitimate "not started yet" (a param whose state was only looked at)."""
    return [(pid, n) for pid, n in _states(sd) if n != "residual"
            and len([m for m in sd["state"][pid] if m != "residual"]) > 1]


def _tensor_of(value):
    return value["scale"] if isinstance(value, dict) else value


CORRUPTIONS = {
    "drop_state": lambda sd, d: (lambda s: sd["state"][s[0]].pop(s[1]))(d.draw(st.sampled_from(_droppable(sd)))),
    "extra_state": lambda sd, d: sd["state"][d.draw(st.sampled_from(sorted(sd["state"])))].__setitem__(
        "bogus", torch.zeros(1)),
    "wrong_shape": lambda sd, d: (lambda s: sd["state"][s[0]].__setitem__(s[1], torch.zeros(3, 1, 7)))(
        d.draw(st.sampled_from(_states(sd)))),
    "nan_in_state": lambda sd, d: (lambda s: _tensor_of(sd["state"][s[0]][s[1]]).view(-1).__setitem__(
        0, math.nan))(d.draw(st.sampled_from([s for s in _states(sd) if _tensor_of(sd["state"][s[0]][s[1]]).numel()
                                              and s[1] != "residual"]))),
    "other_family": lambda sd, d: emo_record(sd).__setitem__("family", d.draw(st.sampled_from(
        [f for f in ("EmoSens", "EmoAiry", "EmoCats", "EmoTion") if f != emo_record(sd)["family"]]))),
    "flip_shadow": lambda sd, d: emo_record(sd).__setitem__("use_shadow", not emo_record(sd)["use_shadow"]),
    "pulse_value": lambda sd, d: emo_record(sd)["pulse"].__setitem__(d.draw(st.sampled_from(
        ["hist", "noise", "d", "scope", "short", "eta"])), d.draw(st.sampled_from([math.nan, math.inf, "1.0"]))),
    "pulse_steps": lambda sd, d: emo_record(sd)["pulse"].__setitem__("steps", d.draw(st.sampled_from([-1, 1.5, None]))),
    # the variant's name may be absent (states saved before pulse= existed are v3.8); any other field may not
    "pulse_missing": lambda sd, d: emo_record(sd)["pulse"].pop(d.draw(st.sampled_from(
        sorted(set(emo_record(sd)["pulse"]) - {"pulse"})))),
    "pulse_variant": lambda sd, d: emo_record(sd)["pulse"].__setitem__("pulse", d.draw(st.sampled_from(
        ["v3.9", "adaptive", "v4", None, 3.8]))),
    "skipped": lambda sd, d: emo_record(sd).__setitem__("skipped_steps", d.draw(st.sampled_from([-1, "x", 1.5]))),
    "recorded": lambda sd, d: emo_record(sd).__setitem__("recorded_count", 3),
    "drop_group_param": lambda sd, d: sd["param_groups"][0]["params"].pop(),
    "bad_betas": lambda sd, d: sd["param_groups"][0].__setitem__("betas", (1.0, 0.5)),
    "unknown_pid": lambda sd, d: sd["state"].__setitem__(10**6, {}),
    "no_emo": lambda sd, d: sd["param_groups"][0].pop("emo"),
    "format": lambda sd, d: emo_record(sd).__setitem__("format", 99),
}


@FUZZ_LOADS
@given(data=st.data())
def test_fuzz_state_dict_corruptions_are_refused_and_change_nothing(data):
    family, cls, params, kw, gen = data.draw(optimizers())
    kw["compensation"] = "error_feedback"  # deterministic, so the resumed step can be compared bit for bit
    params = [p for p in params if p.numel()] or [torch.nn.Parameter(torch.randn(7, 13))]
    saved = cls(params, **kw)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        saved.step(loss=1.0)
    sd = saved.state_dict()
    targets = [torch.nn.Parameter(torch.randn(p.shape, generator=gen).to(p.dtype)) for p in params]
    target = cls(targets, **kw)
    for p in targets:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    target.step(loss=2.0)
    before = snapshot(target)
    for name in sorted(CORRUPTIONS):  # every corruption that applies to this state dict
        if name == "drop_state" and not _droppable(sd) or name in ("wrong_shape", "extra_state") and not _states(sd):
            continue
        if name == "nan_in_state" and not [s for s in _states(sd) if s[1] != "residual"
                                           and _tensor_of(sd["state"][s[0]][s[1]]).numel()]:
            continue
        bad = copy.deepcopy(sd)
        CORRUPTIONS[name](bad, data)
        share_record(bad)  # the record is in every param group: corrupt every copy alike
        event(f"corruption {name}")
        with pytest.raises((ValueError, KeyError)):
            target.load_state_dict(bad)
        after = snapshot(target)
        assert same_tree(before["sd"], after["sd"]) and before["counters"] == after["counters"], name
        assert all(torch.equal(a, b) for a, b in zip(before["params"], after["params"])), name
    # the uncorrupted state dict loads, and the next step is the saved optimizer's, bit for bit
    for t, p in zip(targets, params):
        t.data.copy_(p.data)
    target.load_state_dict(sd)
    for t, p in zip(targets, params):
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        t.grad = p.grad.clone()
    saved.step(loss=0.5)
    target.step(loss=0.5)
    assert all(torch.equal(t, p) for t, p in zip(targets, params))
    assert same_tree(saved.state_dict()["state"], target.state_dict()["state"])
