"""Loss intake, NaN guard, validation, param groups, resume, scheduler (DESIGN.md public API)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import emoq
from tests.conftest import make_net, resume_from_bytes, train

FAMILIES = [emoq.EmoSens, emoq.EmoAiry, emoq.EmoCats, emoq.EmoTion]


def params_of(net):
    return [p.detach().clone() for p in net.parameters()]


# ---------------------------------------------------------------- loss intake
def test_no_loss_raises_naming_the_three_ways():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = emoq.EmoSens([p])
    with pytest.raises(RuntimeError) as err:
        opt.step()
    msg = str(err.value)
    assert "step(closure)" in msg and "loss=" in msg and "record_loss" in msg
    assert torch.equal(p.detach(), torch.ones(3)) and opt.pulse is None


@pytest.mark.parametrize("cls", FAMILIES)
def test_three_intake_ways_give_identical_steps(cls, batch):
    x, y = batch
    results = []
    for how in ("closure", "loss", "record"):
        net = make_net()
        opt = cls(net.parameters())
        for _ in range(5):
            def closure(net=net):
                net.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                return loss
            if how == "closure":
                returned = opt.step(closure)
                assert isinstance(returned, torch.Tensor)
            else:
                loss = closure()
                if how == "loss":
                    opt.step(loss=loss)
                else:
                    opt.record_loss(loss)
                    opt.step()
        results.append((params_of(net), opt.pulse))
    for params, pulse in results[1:]:
        assert pulse == results[0][1]
        assert all(torch.equal(a, b) for a, b in zip(params, results[0][0]))


def test_record_loss_uses_the_mean_of_micro_batches():
    p = torch.nn.Parameter(torch.ones(3))
    a, b = emoq.EmoSens([p]), emoq.EmoPulse()
    for micro in ([1.0, 3.0], [torch.tensor(2.0), 4.0, torch.tensor([6.0])]):
        for x in micro:
            a.record_loss(x)
        p.grad = torch.ones(3)
        a.step()
        mean = sum(float(x) for x in micro) / len(micro)
        assert a.last_loss == mean
        assert a.pulse == b.update(mean)


def test_float_and_tensor_losses_are_accepted():
    p = torch.nn.Parameter(torch.ones(3))
    opt = emoq.EmoCats([p])
    for loss in (1.0, 2, torch.tensor(1.5), torch.tensor([1.5]), torch.tensor(1.0, dtype=torch.bfloat16)):
        p.grad = torch.ones(3)
        opt.step(loss=loss)
    assert opt.emo_pulse.steps == 5


@pytest.mark.parametrize("bad", [torch.ones(2), "1.0", True, None])
def test_bad_loss_types(bad):
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = emoq.EmoSens([p])
    if bad is None:
        with pytest.raises(RuntimeError, match="closure returned None"):
            opt.step(lambda: None)
        return
    with pytest.raises((TypeError, ValueError)):
        opt.step(loss=bad)


def test_two_sources_are_refused():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = emoq.EmoSens([p])
    opt.record_loss(1.0)
    with pytest.raises(RuntimeError, match="more than one source"):
        opt.step(loss=1.0)
    with pytest.raises(RuntimeError, match="more than one source"):
        opt.step(lambda: torch.tensor(1.0), loss=1.0)


def test_closure_runs_with_grad_enabled():
    # v3.8 ran the closure inside no_grad, so a closure calling backward() failed there.
    p = torch.nn.Parameter(torch.ones(3))
    opt = emoq.EmoSens([p])

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0
    assert opt.last_loss == 3.0


def test_pulse_runs_once_per_step_whatever_the_group_count():
    ps = [torch.nn.Parameter(torch.ones(4)) for _ in range(3)]
    opt = emoq.EmoSens([{"params": [ps[0]]}, {"params": [ps[1]], "weight_decay": 0.0}, {"params": [ps[2]]}])
    ref = emoq.EmoPulse()
    for i in range(4):
        for p in ps:
            p.grad = torch.ones(4)
        opt.step(loss=1.0 / (i + 1))
        eta = ref.update(1.0 / (i + 1))
        assert opt.pulse == eta
        assert [g["lr"] for g in opt.param_groups] == [eta] * 3
    assert opt.emo_pulse.steps == 4


# ---------------------------------------------------------------- NaN guard
@pytest.mark.parametrize("cls", FAMILIES)
@pytest.mark.parametrize("where", ["loss_nan", "loss_inf", "grad_nan", "grad_inf"])
def test_non_finite_skips_the_whole_step(cls, where):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(8))]
    opt = cls(ps, use_shadow=True)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step(loss=1.0)
    before = ([p.detach().clone() for p in ps], {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in ps},
              opt.emo_pulse.state_dict(), [g["lr"] for g in opt.param_groups])
    loss = 1.0
    for p in ps:
        p.grad = torch.randn_like(p)
    if where == "loss_nan":
        loss = float("nan")
    elif where == "loss_inf":
        loss = torch.tensor(float("inf"))
    else:
        ps[1].grad[3] = float("nan") if where == "grad_nan" else -float("inf")
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step(loss=loss)
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, p.detach()) for a, p in zip(before[0], ps))
    for p in ps:
        assert all(torch.equal(before[1][id(p)][k], v) for k, v in opt.state[p].items())
    assert opt.emo_pulse.state_dict() == before[2]
    assert [g["lr"] for g in opt.param_groups] == before[3]
    # warned once: a second skip is counted silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(loss=float("nan"))
    assert opt.skipped_steps == 2
    # and training goes on
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step(loss=0.9)
    assert opt.emo_pulse.steps == 2


def test_non_finite_micro_batch_skips_and_clears_the_record():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = emoq.EmoSens([p])
    opt.record_loss(1.0)
    opt.record_loss(float("nan"))
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert opt.skipped_steps == 1
    with pytest.raises(RuntimeError, match="got no loss"):
        opt.step()


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("kw,match", [
    (dict(lr=0.0), "lr"), (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr=float("inf")), "lr"),
    (dict(betas=(1.0, 0.9)), r"betas\[0\]"), (dict(betas=(0.9, -0.1)), r"betas\[1\]"), (dict(betas=(0.9,)), "pair"),
    (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"), (dict(weight_decay=float("nan")), "weight"),
    (dict(state_precision="int3"), "state_precision"),
])
@pytest.mark.parametrize("cls", FAMILIES)
def test_invalid_hyperparameters_raise(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.nn.Parameter(torch.ones(2))], **kw)


def test_group_hyperparameters_are_validated_and_lr_is_one_per_optimizer():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="betas"):
        emoq.EmoSens([{"params": [p], "betas": (0.9, 1.5)}])
    with pytest.raises(ValueError, match="own lr"):
        emoq.EmoSens([{"params": [p], "lr": 1e-3}])
    emoq.EmoSens([{"params": [p], "lr": 2.0}], lr=2.0)  # same as the optimizer's: fine
    opt = emoq.EmoSens([p])
    p.grad = torch.ones(2)
    opt.step(loss=1.0)
    opt.add_param_group({"params": [q]})
    assert opt.param_groups[1]["lr"] == opt.pulse  # a late group also shows the real step size


def test_sparse_and_complex_raise():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = emoq.EmoSens(emb.parameters())
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(loss=1.0)
    with pytest.raises(ValueError, match="complex"):
        emoq.EmoSens([torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))])


# ---------------------------------------------------------------- resume
@pytest.mark.parametrize("cls", FAMILIES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("use_shadow", [False, True])
def test_resume_is_exact(cls, precision, use_shadow, batch):
    kw = dict(state_precision=precision, use_shadow=use_shadow, lr=1.5)
    net = make_net()
    opt = cls(net.parameters(), **kw)
    train(net, opt, batch, 30)
    want_params, want_pulse = params_of(net), opt.pulse

    net = make_net()
    opt = cls(net.parameters(), **kw)
    train(net, opt, batch, 12)
    net2, opt2 = resume_from_bytes(net, opt, lambda ps: cls(ps, **kw), seed=123)
    for st in opt2.state.values():
        for name, value in st.items():
            want = torch.float32 if name == "shadow" or precision == "fp32" else torch.bfloat16
            assert value.dtype == want
    train(net2, opt2, batch, 18, start=12)
    assert opt2.pulse == want_pulse
    assert all(torch.equal(a, b) for a, b in zip(params_of(net2), want_params))


def test_state_dict_carries_pulse_and_skips():
    p = torch.nn.Parameter(torch.ones(3))
    opt = emoq.EmoSens([p])
    p.grad = torch.ones(3)
    opt.step(loss=2.0)
    with pytest.warns(RuntimeWarning):
        opt.step(loss=math.nan)
    opt.record_loss(1.0)
    sd = opt.state_dict()
    emo = sd["param_groups"][0]["emo"]
    assert emo["pulse"] == opt.emo_pulse.state_dict()
    assert emo["skipped_steps"] == 1
    assert emo["recorded_count"] == 1 and emo["recorded_sum"].item() == 1.0
    fresh = emoq.EmoSens([torch.nn.Parameter(torch.ones(3))])
    fresh.load_state_dict(sd)
    assert fresh.pulse == opt.pulse and fresh.skipped_steps == 1
    fresh.param_groups[0]["params"][0].grad = torch.ones(3)
    fresh.step()  # uses the recorded micro-batch loss


def test_loading_a_non_emoq_state_dict_fails_loudly():
    p = torch.nn.Parameter(torch.ones(3))
    sd = torch.optim.AdamW([p]).state_dict()
    with pytest.raises(KeyError, match="not an emoq state_dict"):
        emoq.EmoSens([p]).load_state_dict(sd)


def test_bf16_states_round_to_nearest():
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt32, opt16 = emoq.EmoSens([p.detach().clone().requires_grad_()]), emoq.EmoSens([p], state_precision="bf16")
    g = torch.randn(64, 64)
    q = opt32.param_groups[0]["params"][0]
    q.grad, p.grad = g.clone(), g.clone()
    opt32.step(loss=1.0)
    opt16.step(loss=1.0)
    for name in ("m", "v"):
        assert opt16.state[p][name].dtype == torch.bfloat16
        assert torch.equal(opt16.state[p][name], opt32.state[q][name].bfloat16())
    assert torch.equal(p.detach(), q.detach())  # first step: state rounding has not fed back yet


# ---------------------------------------------------------------- scheduler
def test_scheduler_drives_any_optimizer(batch):
    x, y = batch
    net = make_net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = emoq.EmoPulseScheduler(sgd, scope=50.0)
    ref = emoq.EmoPulse(scope=50.0)
    for _ in range(20):
        sgd.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        eta = sched.step(loss)
        assert eta == ref.update(loss.item())
        assert sched.get_last_lr() == [eta]
        sgd.step()
    with pytest.warns(RuntimeWarning):
        assert sched.step(float("nan")) is None
    assert sched.skipped_steps == 1 and sched.get_last_lr() == [eta]
    again = emoq.EmoPulseScheduler(torch.optim.SGD(make_net().parameters(), lr=1.0), scope=50.0)
    again.load_state_dict(sched.state_dict())
    assert again.step(0.5) == sched.step(0.5)


def test_scheduler_rejects_non_optimizers():
    with pytest.raises(TypeError):
        emoq.EmoPulseScheduler(object())
