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


def _replace(opt, p, how):
    if how == "in place":
        for value in opt.state[p].values():
            value.zero_()
    elif how == "assigned":
        opt.state[p]["m"], opt.state[p]["v"] = torch.zeros_like(p), torch.zeros_like(p)
    elif how == "emptied":
        opt.state[p] = {}
    else:
        del opt.state[p]


def _reset_run(mode, where):
    """Two steps, a reset of a stack member's and the lone parameter's states (between steps, or by
    the closure of the third step), two more steps: the parameters and the saved states."""
    params = make_params()
    opt = emoq.EmoSens(params)
    train(params, opt, 2)
    resets = (params[0], params[-1])
    if where == "between steps":
        for p in resets:
            _replace(opt, p, mode)
        train(params, opt, 2, seed=3)
    else:
        g = torch.Generator().manual_seed(3)
        grads = [torch.randn(p.shape, generator=g) for p in params]

        def closure():
            for p, grad in zip(params, grads):
                p.grad = grad
            for p in resets:
                _replace(opt, p, mode)
            return torch.tensor(1.5)

        opt.step(closure)
        train(params, opt, 1, seed=4)
    return params, opt.state_dict()["state"]


@pytest.mark.parametrize("where", ["between steps", "inside the closure"])
@pytest.mark.parametrize("how", ["assigned", "emptied", "deleted"])
def test_a_state_replaced_between_steps_is_used_like_an_in_place_change(how, where):
    # The step keeps views of the states between steps: an assigned state (ReLoRA-style resets)
    # was ignored while state_dict() saved it, and one written by the closure (after the step
    # began) was forgotten with the step's own writes. A stack member and the lone parameter,
    # reset by assignment / an emptied or deleted state (fresh zeros), step as zeroing them in place does.
    (a, sa), (b, sb) = _reset_run("in place", where), _reset_run(how, where)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][n], sb[i][n]) for i in sa for n in sa[i])


def test_a_replaced_lowbit_state_is_quantized_as_a_loaded_one_is():
    from emoq.states import precision_of

    runs = []
    for via in ("load_state_dict", "assignment"):
        params = make_params()
        opt = emoq.EmoSens(params, state_precision="8bit", min_lowbit_size=0)
        train(params, opt, 2)
        if via == "assignment":
            opt.state[params[0]]["m"] = torch.full_like(params[0], 0.01)
        else:
            saved = opt.state_dict()
            saved["state"][0]["m"] = torch.full_like(params[0], 0.01)
            opt.load_state_dict(saved)
        train(params, opt, 2, seed=3)
        assert precision_of(opt.state[params[0]]["m"]) == "8bit"
        runs.append(params)
    assert all(torch.equal(x, y) for x, y in zip(*runs))


@pytest.mark.parametrize("bad, match", [(torch.zeros(3), r"state 'm' of parameter 0 \(shape \(8, 64\)\) has shape"),
                                        (torch.full((8, 64), float("nan")), "NaN"),
                                        ("not a tensor", "state 'm' of parameter 0")])
def test_an_invalid_replaced_state_is_refused_before_anything_changes(bad, match):
    params = make_params()
    opt = emoq.EmoSens(params)
    train(params, opt, 2)
    opt.state[params[0]]["m"] = bad
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params], opt.emo_pulse.state_dict(), opt.state[params[1]]["m"].clone()
    with pytest.raises(ValueError, match="written since the last step") as err:
        opt.step(loss=1.0)
    assert err.match(match)
    assert all(torch.equal(a, b) for a, b in zip(params, before[0]))
    assert opt.emo_pulse.state_dict() == before[1] and torch.equal(opt.state[params[1]]["m"], before[2])
    assert opt.state[params[0]]["m"] is bad
    opt.state[params[0]]["m"] = torch.zeros_like(params[0])  # mended: it steps
    opt.step(loss=1.0)
    assert not torch.equal(params[0], before[0][0])


def test_a_state_replaced_by_a_non_dict_is_refused():
    params = make_params()
    opt = emoq.EmoSens(params)
    train(params, opt, 1)
    opt.state[params[2]] = [1, 2]
    with pytest.raises(ValueError, match=r"state of parameter 2 .* replaced by a list"):
        opt.step(loss=1.0)


def test_a_replaced_state_container_starts_every_parameter_afresh_or_is_refused():
    from collections import defaultdict

    runs = []
    for replace in (False, True):
        params = make_params()
        opt = emoq.EmoSens(params)
        train(params, opt, 2)
        if replace:
            opt.state = defaultdict(dict)
        else:
            for p in params:
                _replace(opt, p, "in place")
        train(params, opt, 2, seed=3)
        runs.append(params)
    assert all(torch.equal(x, y) for x, y in zip(*runs))
    opt.state = None
    with pytest.raises(TypeError, match="must be a dict"):
        opt.step(loss=1.0)


@pytest.mark.parametrize("precision", ["fp32", "8bit", "4bit"])
def test_the_state_container_deep_copies_as_plain_dicts_with_low_bit_states(precision):
    # copy.deepcopy(opt.state) (as of torch's plain defaultdict) failed on low-bit states, which
    # torchao implements no aten.clone for; a copy is plain containers whose tensors are independent.
    import copy

    from emoq.states import parts, precision_of

    w = torch.nn.Parameter(torch.randn(256, 256))
    opt = emoq.EmoSens([w], state_precision=precision)
    w.grad = torch.randn_like(w)
    opt.step(loss=1.0)
    for copied in (copy.deepcopy(opt.state), {w: copy.deepcopy(opt.state[w])}):
        key = next(iter(copied))
        assert type(copied) in (dict, type(copy.deepcopy(torch.optim.AdamW([w]).state)))
        assert type(copied[key]) is dict and copied[key].keys() == opt.state[w].keys()
        m, m0 = copied[key]["m"], opt.state[w]["m"]
        assert precision_of(m) == precision_of(m0) == precision
        a, b = (parts(m)[0], parts(m0)[0]) if precision != "fp32" else (m, m0)
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
