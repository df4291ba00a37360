"""pulse="adaptive" with a recheck: the ratio against a plain computation, the veto against a
plain reference, refusals that change nothing, failures after the update, resume, two gloo ranks."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import emoq
from emoq.optim.base import grad_dot_params, recheck_ratio
from emoq.pulse import EmoPulseAdaptive
from tests.conftest import make_net, resume_from_bytes
from tests.dist_workers import free_port, spawn
from tests.test_pulse_adaptive import _data, _net

A = EmoPulseAdaptive


def params_of(net):
    return [p.detach().clone() for p in net.parameters()]


def slice_of(batch, i):
    x, y = batch
    return x[(i % 4) * 8:(i % 4) * 8 + 8], y[(i % 4) * 8:(i % 4) * 8 + 8]


def train_rechecked(net, opt, batch, steps, start=0):
    """``tests.conftest.train`` with ``recheck=`` the same slice's loss after the update."""
    for i in range(start, start + steps):
        x, y = slice_of(batch, i)
        net.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step(loss=loss, recheck=lambda x=x, y=y: F.cross_entropy(net(x), y))


# ---------------------------------------------------------------- the ratio
def test_ratio_and_its_average_against_a_plain_computation(batch):
    net = make_net()
    opt = emoq.EmoSens(net.parameters(), pulse="adaptive")
    want_avg = None
    for i in range(4):
        x, y = slice_of(batch, i)
        net.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        x0 = [p.detach().double().clone() for p in net.parameters()]
        grads = [p.grad.double().clone() for p in net.parameters()]
        opt.step(loss=loss, recheck=lambda x=x, y=y: F.cross_entropy(net(x), y))
        with torch.no_grad():
            after = F.cross_entropy(net(x), y).item()
        predicted = sum(float((g * (a - p.detach().double())).sum()) for g, a, p in zip(grads, x0, net.parameters()))
        ratio = max(-1.0, min(1.0, (loss.item() - after) / predicted))
        want_avg = ratio if want_avg is None else 0.9 * want_avg + 0.1 * ratio
        assert predicted > 0
        assert opt.emo_pulse.ratio_avg == pytest.approx(want_avg, rel=1e-6, abs=1e-9)


def test_a_linear_loss_gives_ratio_one():
    # f(x) = <a, x>: the decrease is exactly what the gradient predicts, at any step size
    p = torch.nn.Parameter(torch.randn(300))
    a = torch.randn(300)
    opt = emoq.EmoSens([p], pulse="adaptive", lr=10.0)
    for _ in range(3):
        opt.zero_grad()
        loss = (a * p).sum()
        loss.backward()
        opt.step(loss=loss, recheck=lambda: (a * p).sum())
        assert opt.emo_pulse.ratio_avg == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("after,predicted,want", [
    (0.5, 1.0, 0.5), (0.0, 0.5, 1.0), (3.0, 0.5, -1.0),  # clamped to [-1, 1]
    (0.9, 0.0, -1.0), (0.9, -1e-3, -1.0),  # no decrease predicted
    (math.inf, 1.0, -1.0), (math.nan, 1.0, -1.0), (0.5, math.inf, -1.0), (0.5, 1e-320, 1.0)])
def test_ratio_edges(after, predicted, want):
    assert recheck_ratio(1.0, after, predicted) == want


def test_grad_dot_params_in_chunks_equals_float64(monkeypatch):
    import emoq.optim.base as base

    monkeypatch.setattr(base, "RECHECK_CHUNK", 7)
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(*s)) for s in [(30, 5), (1,), (0,), (17,)]]
    for p in ps[:3]:
        p.grad = torch.randn_like(p)  # ps[3] has none: left out
    want = sum(float(p.grad.double().reshape(-1) @ p.detach().double().reshape(-1)) for p in ps[:3])
    assert grad_dot_params(ps) == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------- the veto
def reference_adam(steps, scope=1.0):
    """The Adam kind's eta from the docstring, plainly, with the veto; ``steps`` =
    (loss, cosine, ratio recorded after the step or None)."""
    s = m = None
    log_eta = log_peak = math.log(1e-3)
    avg, out = None, []
    for loss, cos, ratio in steps:
        s, m = (loss, loss) if s is None else (s, m)
        s, m = 0.3 * loss + 0.7 * s, 0.05 * loss + 0.95 * m
        rise = max(0.0, (s - m) / max(abs(m), 1e-12))
        last = log_eta
        log_eta += max(-0.3, min(0.3, (cos + 0.01) - 3.0 * min(rise, 1.0)))
        floor = min(max(math.log(1e-8 / scope), log_peak + math.log(0.01)), last + 0.3)
        log_eta = max(floor, min(math.log(0.1), log_eta))
        if avg is not None and avg < 0.65:
            log_eta = min(log_eta, last)
        log_peak = max(log_peak, log_eta)
        out.append(scope * math.exp(log_eta))
        if ratio is not None:
            r = max(-1.0, min(1.0, ratio))
            avg = r if avg is None else 0.9 * avg + 0.1 * r
    return out


def test_veto_against_its_plain_reference():
    n = 200
    cosines = [0.05] * 60 + [-0.02] * 20 + [0.1] * 120
    losses = [1.0 + 0.01 * math.sin(i) for i in range(n)]
    ratios = [0.9] * 30 + [0.2] * 30 + [None] * 10 + [3.0] * 40 + [-5.0] * 5 + [0.8] * 85
    pulse = A(0.5)
    got, avg_before = [], []
    for loss, cos, r in zip(losses, cosines, ratios):
        avg_before.append(pulse.ratio_avg)
        got.append(pulse.update(loss, (cos, 1.0, 1.0, 1.0)))
        if r is not None:
            pulse.record_ratio(r)
    want = reference_adam(zip(losses, cosines, ratios), 0.5)
    assert got == pytest.approx(want, rel=1e-12)
    vetoed = [i for i, a in enumerate(avg_before) if a is not None and a < A.VETO]
    assert len([i for i in vetoed if i < 60]) >= 20 and all(got[i] <= got[i - 1] for i in vetoed)
    assert got[20] > got[19]  # a positive cosine and no veto: growth
    assert any(got[i] > got[i - 1] for i in range(80, 120) if i not in vetoed)  # the average back over 0.65: growth


probes = st.tuples(st.floats(-1, 1), st.floats(0, 1e3), st.floats(0, 1e3), st.floats(0, 1e3))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e3), probes, st.floats(-1e6, 1e6)), min_size=1, max_size=60))
def test_eta_never_grows_under_the_veto_and_is_otherwise_unchanged(seq):
    pulse, free = A(1.0), A(1.0)
    for loss, probe, ratio in seq:
        state = pulse.state_dict()
        free.load_state_dict({**state, "ratio_avg": None})
        eta, unvetoed = pulse.update(loss, probe), free.update(loss, probe)
        assert math.isfinite(eta) and 1e-8 <= eta <= A.ETA_MAX
        if state["ratio_avg"] is not None and state["ratio_avg"] < A.VETO:
            assert eta <= unvetoed and (state["eta"] is None or eta <= max(state["eta"], unvetoed))
        else:
            assert eta == unvetoed
        pulse.record_ratio(ratio)
        assert -1.0 <= pulse.ratio_avg <= 1.0


def test_without_recheck_nothing_changes(batch):
    from tests.conftest import train

    nets = [make_net(), make_net()]
    opts = [emoq.EmoSens(n.parameters(), pulse="adaptive") for n in nets]
    train(nets[0], opts[0], batch, 6)
    for i in range(6):  # recheck_next with no step to give it to is harmless; ratio stays None
        x, y = slice_of(batch, i)
        nets[1].zero_grad()
        loss = F.cross_entropy(nets[1](x), y)
        loss.backward()
        opts[1].step(loss=loss)
    assert opts[0].emo_pulse.state_dict() == opts[1].emo_pulse.state_dict()
    assert opts[0].emo_pulse.ratio_avg is None


# ---------------------------------------------------------------- refusals and failures
def _one_backward(net, batch):
    x, y = slice_of(batch, 0)
    net.zero_grad()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    return loss


@pytest.mark.parametrize("cls,pulse,recheck,error", [
    (emoq.EmoSens8bit, "adaptive", 3.0, TypeError), (emoq.EmoSens8bit, "v3.8", lambda: 1.0, ValueError),
    (emoq.EmoSens8bit, "v3.9", lambda: 1.0, ValueError),
    # sign steps: measured worse with it on the charLM (bench/README.md "Stop 22")
    (emoq.EmoAiry8bit, "adaptive", lambda: 1.0, ValueError), (emoq.EmoCats8bit, "adaptive", lambda: 1.0, ValueError),
    (emoq.EmoTion, "adaptive", lambda: 1.0, ValueError)])
def test_a_bad_recheck_is_refused_before_anything_changes(batch, cls, pulse, recheck, error):
    net = make_net()
    opt = cls(net.parameters(), pulse=pulse, **({} if cls is emoq.EmoTion else {"min_lowbit_size": 0}))
    loss = _one_backward(net, batch)
    opt.step(loss=loss)
    before, sd = params_of(net), opt.state_dict()
    loss = _one_backward(net, batch)
    with pytest.raises(error, match="recheck"):
        opt.step(loss=loss, recheck=recheck)
    with pytest.raises(error, match="recheck"):
        opt.recheck_next(recheck)
    assert all(torch.equal(a, b) for a, b in zip(params_of(net), before))
    assert str(opt.state_dict()) == str(sd)


def test_recheck_next_is_consumed_once_and_not_with_recheck_too(batch):
    net = make_net()
    opt = emoq.EmoSens(net.parameters(), pulse="adaptive")
    calls = []
    opt.recheck_next(lambda: calls.append(1) or 1.0)
    opt.step(loss=_one_backward(net, batch))
    opt.step(loss=_one_backward(net, batch))
    assert calls == [1]
    opt.recheck_next(lambda: 1.0)
    before = params_of(net)
    with pytest.raises(RuntimeError, match="recheck= and a recheck_next"):
        opt.step(loss=_one_backward(net, batch), recheck=lambda: 1.0)
    assert all(torch.equal(a, b) for a, b in zip(params_of(net), before))


def test_a_skipped_step_does_not_call_recheck(batch):
    net = make_net()
    opt = emoq.EmoSens(net.parameters(), pulse="adaptive")
    _one_backward(net, batch)
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step(loss=float("nan"), recheck=lambda: pytest.fail("called"))
    assert opt.skipped_steps == 1 and opt.emo_pulse.ratio_avg is None


@pytest.mark.parametrize("bad", [RuntimeError("oom"), KeyboardInterrupt(), "a string", torch.ones(3)])
def test_a_failing_recheck_keeps_the_update_and_records_no_ratio(batch, bad):
    net = make_net()
    opt = emoq.EmoSens(net.parameters(), pulse="adaptive")
    before = params_of(net)

    def recheck():
        if isinstance(bad, BaseException):
            raise bad
        return bad

    with pytest.raises(type(bad) if isinstance(bad, BaseException) else (TypeError, ValueError)) as info:
        opt.step(loss=_one_backward(net, batch), recheck=recheck)
    assert any("the update was applied" in n for n in getattr(info.value, "__notes__", []))
    assert opt.emo_pulse.steps == 1 and opt.emo_pulse.ratio_avg is None
    assert not all(torch.equal(a, b) for a, b in zip(params_of(net), before))
    opt.step(loss=_one_backward(net, batch))  # the optimizer goes on
    assert opt.emo_pulse.steps == 2


def test_a_step_that_moves_no_parameter_does_not_recheck():
    # nothing was predicted, so no ratio: a -1 here would veto growth for nothing (hostile pass)
    z = torch.nn.Parameter(torch.zeros(0, 3))
    z.grad = torch.zeros(0, 3)
    p = torch.nn.Parameter(torch.randn(4))  # no gradient
    opt = emoq.EmoSens([z, p], pulse="adaptive")
    opt.step(loss=1.0, recheck=lambda: pytest.fail("called"))
    assert opt.emo_pulse.steps == 1 and opt.emo_pulse.ratio_avg is None


def test_a_recheck_that_steps_again_is_refused(batch):
    net = make_net()
    opt = emoq.EmoSens(net.parameters(), pulse="adaptive")
    with pytest.raises(RuntimeError, match="called from its own recheck"):
        opt.step(loss=_one_backward(net, batch), recheck=lambda: opt.step(loss=1.0))
    assert opt.emo_pulse.steps == 1 and opt.emo_pulse.ratio_avg is None
    opt.step(loss=_one_backward(net, batch), recheck=lambda: 1.0)  # and the flag is down again
    assert opt.emo_pulse.steps == 2 and opt.emo_pulse.ratio_avg is not None


@pytest.mark.parametrize("after", [float("nan"), float("inf"), torch.tensor(float("nan"))])
def test_a_non_finite_recheck_counts_as_no_decrease(batch, after):
    net = make_net()
    opt = emoq.EmoSens(net.parameters(), pulse="adaptive")
    opt.step(loss=_one_backward(net, batch), recheck=lambda: after)
    assert opt.emo_pulse.ratio_avg == -1.0


# ---------------------------------------------------------------- state
@pytest.mark.parametrize("precision", ["fp32", "8bit"])
def test_resumes_bit_exactly_with_recheck(batch, precision):
    kw = dict(state_precision=precision, min_lowbit_size=0, pulse="adaptive")
    net = make_net()
    opt = emoq.EmoSens(net.parameters(), **kw)
    train_rechecked(net, opt, batch, 10)
    want, want_sd = params_of(net), opt.emo_pulse.state_dict()
    assert want_sd["ratio_avg"] is not None

    net = make_net()
    opt = emoq.EmoSens(net.parameters(), **kw)
    train_rechecked(net, opt, batch, 4)
    net2, opt2 = resume_from_bytes(net, opt, lambda ps: emoq.EmoSens(ps, **kw), seed=7)
    train_rechecked(net2, opt2, batch, 6, start=4)
    assert opt2.emo_pulse.state_dict() == want_sd
    assert all(torch.equal(a, b) for a, b in zip(params_of(net2), want))


def test_a_checkpoint_from_before_the_recheck_loads_and_a_bad_average_is_refused():
    pulse = A()
    pulse.update(1.0, (0.1, 1.0, 1.0, 1.0))
    old = pulse.state_dict()
    del old["ratio_avg"]
    fresh = A()
    fresh.load_state_dict(old)
    assert fresh.ratio_avg is None and fresh.steps == 1
    for bad in (1.5, -2.0, math.nan, "0.5", True):
        with pytest.raises(ValueError, match="ratio_avg"):
            fresh.load_state_dict({**old, "ratio_avg": bad})
    assert fresh.ratio_avg is None and fresh.state_dict() == {**old, "ratio_avg": None}
    for bad in (math.nan, math.inf, "x", True):
        with pytest.raises(ValueError, match="finite float"):
            fresh.record_ratio(bad)
    assert fresh.ratio_avg is None
    for other in (emoq.EmoPulse(), A(rule_kind="sign"), A(rule_kind="lion")):
        with pytest.raises(ValueError, match="does not read a recheck"):
            other.record_ratio(0.5)


# ---------------------------------------------------------------- two gloo ranks
def _run(model, net, rank, world):
    opt = emoq.EmoSens(model.parameters(), pulse="adaptive")
    pulses, ratios = [], []
    for step in range(10):
        x, y = _data(step)
        x, y = x[rank * 16 // world:(rank + 1) * 16 // world], y[rank * 16 // world:(rank + 1) * 16 // world]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss, recheck=lambda x=x, y=y: F.cross_entropy(model(x), y))
        pulses.append(opt.pulse)
        ratios.append(opt.emo_pulse.ratio_avg)
    return {"pulses": pulses, "ratios": ratios, "params": params_of(net)}


def _worker(rank, world, port, out_dir):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = _net()
        out = _run(torch.nn.parallel.DistributedDataParallel(net), net, rank, world)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_recheck_the_whole_batch(tmp_path):
    # each rank rechecks its half; the mean over ranks is the whole batch's loss after the step,
    # so both ranks and one process on the whole batch record the same ratios
    spawn(_worker, (2, free_port(), str(tmp_path)))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["pulses"] == r1["pulses"] and r0["ratios"] == r1["ratios"]
    assert all(torch.equal(u, v) for u, v in zip(r0["params"], r1["params"]))
    net = _net()
    one = _run(net, net, 0, 1)
    assert one["ratios"] == pytest.approx(r0["ratios"], rel=1e-4, abs=1e-6)
    assert one["pulses"] == pytest.approx(r0["pulses"], rel=1e-5)
