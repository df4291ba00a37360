"""The step plan (emoq.optim.base: ``_plan``): a param group whose parameters and gradients look as
they did at the last step reuses that step's units after one pass of checks. Reusing it must give
the same steps and the same refusals as planning afresh. Shapes are those of tests/test_kernels.py
(their compiled kernels are shared within a pytest process)."""

import warnings

import pytest
import torch

import emoq
from tests.test_kernels import STACK, make_params, train

pytestmark = pytest.mark.compiled


def snapshot(params, opt):
    return ([p.detach().clone() for p in params],
            {i: {n: v.clone() for n, v in opt.state[p].items()} for i, p in enumerate(params)},
            opt.emo_pulse.state_dict(), opt.skipped_steps)


def assert_unchanged(params, opt, snap):
    values, states, pulse, skipped = snap
    assert all(torch.equal(a, b) for a, b in zip(params, values))
    assert all(torch.equal(opt.state[p][n], v) for i, p in enumerate(params) for n, v in states[i].items())
    assert opt.emo_pulse.state_dict() == pulse
    assert opt.skipped_steps == skipped


def test_the_plan_is_reused_while_parameters_and_gradients_look_the_same():
    params = make_params()
    opt = emoq.EmoSens(params)
    train(params, opt, 2)
    (cached,) = opt._unit_cache.values()
    train(params, opt, 1, seed=2)
    assert next(iter(opt._unit_cache.values()))[2] is cached[2]  # the same units, not regrouped
    params[0].grad = None  # a member without a gradient: regrouped
    opt.step(loss=1.0)
    assert sorted(len(u.params) for u in next(iter(opt._unit_cache.values()))[2]) == [1, 5]


@pytest.mark.parametrize("cls", [emoq.EmoSens, emoq.EmoCats])
def test_reused_plans_step_bit_identically_to_fresh_plans_and_the_reference(cls):
    # Gradients come and go and the group's list is edited between steps: the optimizer that
    # reuses its plans, one that plans every step afresh and the reference path agree bit for bit.
    runs = []
    for kw, fresh in (({}, False), ({}, True), ({"fused": False}, False)):
        params = make_params()
        opt = cls(params[:-1], **kw)
        g = torch.Generator().manual_seed(5)
        for i in range(6):
            if i == 3:
                opt.param_groups[0]["params"].append(params[-1])  # the lone (8, 32) one joins
            for k, p in enumerate(params):
                p.grad = None if (i, k) in ((1, 2), (2, 2), (4, 0)) else torch.randn(p.shape, generator=g)
            if fresh:
                opt._unit_cache.clear()
            opt.step(loss=2.0 / (1 + 0.1 * i))
        runs.append(params)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_a_non_finite_gradient_inside_a_reused_stack_refuses_the_whole_step():
    params, ref = make_params(), make_params()
    opt, o_ref = emoq.EmoSens(params), emoq.EmoSens(ref, fused=False)
    train(params, opt, 2)
    train(ref, o_ref, 2)
    snap = snapshot(params, opt)
    g = torch.Generator().manual_seed(9)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    for bad in (float("nan"), float("inf")):
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        params[3].grad[4, 17] = bad  # the middle of the stack of six
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(loss=1.0)
        assert_unchanged(params, opt, snap[:3] + (snap[3] + (1 if bad != bad else 2),))
    for p, q, grad in zip(params, ref, grads):  # then a good step: the same as the reference's
        p.grad, q.grad = grad.clone(), grad.clone()
    opt.step(loss=1.0)
    o_ref.step(loss=1.0)
    assert all(torch.equal(a, b) for a, b in zip(params, ref))


@pytest.mark.parametrize("case", ["shape", "sparse", "data_shape"])
def test_a_reused_plan_raises_what_a_fresh_one_raises_and_changes_nothing(case):
    params = make_params()
    opt = emoq.EmoSens(params)
    train(params, opt, 2)
    snap = snapshot(params, opt)
    for p in params:
        p.grad = torch.randn(p.shape)
    if case == "shape":  # a gradient of another shape (torch checks assignments, not .data)
        params[2].grad.data = torch.randn(64, 8)
        match = "a gradient of shape"
    elif case == "sparse":
        params[2].grad = torch.randn(STACK[2]).to_sparse()
        match = "sparse"
    else:  # p.data replaced by a tensor of another shape after its states were made
        params[2].data = torch.zeros(4, 64)
        params[2].grad = torch.zeros(4, 64)
        match = "shape changed"
    with pytest.raises(RuntimeError, match=match):
        opt.step(loss=1.0)
    if case == "data_shape":
        params[2].data = snap[0][2].clone()
    assert_unchanged(params, opt, snap)
