"""The default compiled path (emoq.kernels): equal to the eager reference path, stacks of small
tensors, the overflow check, compile failure. Shapes are few and shared so that compiled kernels
are reused across tests (each new shape costs seconds of torch.compile)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import emoq
from emoq import kernels
from emoq.optim import base
from emoq.optim.base import SQUARES_LIMIT, grads_in_range
from emoq.optim.sens import emosens_rule
from tests.conftest import make_net

pytestmark = pytest.mark.compiled

FAMILIES = [emoq.EmoSens, emoq.EmoAiry, emoq.EmoCats, emoq.EmoTion]
STACK = [(8, 64)] * 6 + [(8, 32)]  # six same-shape small tensors (one stack) and one alone


def make_params(shapes=STACK, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype)) for s in shapes]


def train(params, opt, steps, seed=1, skip_grad=None):
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        for k, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g).to(p.dtype)
            p.grad = None if (skip_grad is not None and skip_grad == (i, k)) else grad
        opt.step(loss=2.0 / (1 + 0.1 * i))


def both_paths(cls, steps=3, shapes=STACK, dtype=torch.float32, skip_grad=None, **kw):
    fast, ref = make_params(shapes, dtype), make_params(shapes, dtype)
    o_fast, o_ref = cls(fast, **kw), cls(ref, fused=False, **kw)
    train(fast, o_fast, steps, skip_grad=skip_grad)
    train(ref, o_ref, steps, skip_grad=skip_grad)
    return fast, ref, o_fast, o_ref


@pytest.mark.parametrize("cls", FAMILIES)
def test_stacked_steps_equal_the_reference_path(cls):
    # Element-wise arithmetic rounds the same compiled and eager (emoq.arith), so the default path
    # gives the reference path's parameters bit for bit (EmoAiry's mean |g| may differ in its
    # last bit, which never changes sign(u)).
    fast, ref, o_fast, _ = both_paths(cls)
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))
    units = next(iter(o_fast._unit_cache.values()))[2]  # (params, dtypes, units) of the one group
    assert sorted(len(u.params) for u in units) == [1, 6]  # one stack of six, one alone



def storage_of(t):
    return t.untyped_storage().data_ptr()


def test_stack_members_live_in_one_buffer_and_follow_replaced_members():
    # A stack's members move into one buffer the optimizer keeps (each .data a view of it): the step
    # updates them in place, no copies. A member whose data is replaced between steps is read and
    # moved in again; the gradients' stacking buffer is kept. Results equal the reference path's.
    fast, ref = make_params(), make_params()
    o_fast, o_ref = emoq.EmoSens(fast), emoq.EmoSens(ref, fused=False)
    train(fast, o_fast, 2)
    train(ref, o_ref, 2)
    (unit,) = [u for u in next(iter(o_fast._unit_cache.values()))[2] if u.stacked]
    assert set(unit._bufs) == {"g"}
    g_ptr = unit._bufs["g"][0].data_ptr()
    home = unit.home.buf
    assert {storage_of(p) for p in fast[:6]} == {home.data_ptr()}
    assert storage_of(fast[6]) != home.data_ptr()  # alone: stays where it is
    assert len({storage_of(p) for p in ref}) == len(ref)  # the reference path moves nothing
    for params in (fast, ref):
        with torch.no_grad():
            params[2].data = params[2].detach().clone() * 2  # a new tensor behind the same Parameter
    train(fast, o_fast, 2, seed=3)
    train(ref, o_ref, 2, seed=3)
    assert unit._bufs["g"][0].data_ptr() == g_ptr and unit.home.buf is home
    assert {storage_of(p) for p in fast[:6]} == {home.data_ptr()}
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))


def test_stack_member_with_an_alias_stays_where_it_is_and_the_alias_sees_the_updates():
    # torch's optimizers update a parameter in place, so `p.detach()`, `p.data` or a kept
    # model.state_dict() keep showing the trained values: a member whose storage anything else holds
    # is never moved (copied in and back each step instead), the others are.
    fast, ref = make_params(), make_params()
    alias = fast[1].detach()
    kept = {"w3": fast[3].data}
    o_fast, o_ref = emoq.EmoSens(fast), emoq.EmoSens(ref, fused=False)
    train(fast, o_fast, 3)
    train(ref, o_ref, 3)
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))
    assert torch.equal(alias, ref[1]) and torch.equal(kept["w3"], ref[3])
    home = next(u for u in next(iter(o_fast._unit_cache.values()))[2] if u.stacked).home.buf.data_ptr()
    assert storage_of(fast[1]) == storage_of(alias) != home
    assert storage_of(fast[3]) == storage_of(kept["w3"]) != home
    assert {storage_of(p) for i, p in enumerate(fast[:6]) if i not in (1, 3)} == {home}


def test_gradients_coming_and_going_keep_one_home_per_moved_member_and_equal_the_reference():
    # When a different subset of a stack has gradients each step (conditional computation), each
    # subset is a new stack; its members already live in an earlier stack's buffer and are copied in
    # and back. Buffers nobody moved into are not kept (they would pile up, one per subset).
    shapes = [(8, 64)] * 6
    fast, ref = make_params(shapes), make_params(shapes)
    o_fast, o_ref = emoq.EmoSens(fast), emoq.EmoSens(ref, fused=False)
    rng = torch.Generator().manual_seed(7)
    for step in range(12):
        keep = torch.rand(6, generator=rng) < 0.6
        keep[step % 6] = True  # at least one member steps
        g = torch.Generator().manual_seed(100 + step)
        grads = [torch.randn(s, generator=g) for s in shapes]
        for params, opt in ((fast, o_fast), (ref, o_ref)):
            for p, grad, k in zip(params, grads, keep.tolist()):
                p.grad = grad.clone() if k else None
            opt.step(loss=1.0 / (1 + step))
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))
    living = {storage_of(p) for p in fast}
    assert len(o_fast._homes) <= len(living) <= 6
    assert {h.buf.data_ptr() for h in o_fast._homes.values()} <= living


def test_only_a_plain_tensor_alone_in_its_storage_may_move():
    def param(make):
        p = torch.nn.Parameter(make())  # the argument is freed here: p alone holds its storage
        return p

    whole = torch.randn(4, 8)
    assert base.movable(param(lambda: torch.randn(8, 8)))
    assert not base.movable(param(lambda: whole[1:3]))  # a view of a larger tensor (offset)
    assert not base.movable(param(lambda: whole[:2]))  # a view of a larger tensor (no offset)
    assert not base.movable(param(lambda: torch.randn(8, 8).t()))  # not contiguous
    assert not base.movable(param(lambda: torch.randn(8, 8, device="meta")))
    p = param(lambda: torch.randn(8, 8))
    alias = p.detach()
    assert not base.movable(p)  # another tensor holds its storage
    del alias
    assert base.movable(p)


def test_stack_member_moved_in_keeps_autograds_in_place_check():
    # A graph that saved a parameter, then a step, then backward: torch's optimizers bump the
    # parameter's version (an in-place update) and backward refuses; so does a member updated
    # through its buffer.
    for cls in (torch.optim.AdamW, emoq.EmoSens):
        params = make_params()
        opt = cls(params)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step(loss=1.0) if cls is emoq.EmoSens else opt.step()
        y = (params[0] * params[0]).sum()
        opt.step(loss=1.0) if cls is emoq.EmoSens else opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


def test_stack_members_moved_in_save_and_load_like_any_parameter(tmp_path):
    # model.state_dict() of moved members: torch.save / safetensors round trips give the values, and
    # each saved member holds only its own bytes with safetensors.
    from safetensors.torch import load_file, save_file

    net = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
    opt = emoq.EmoSens(net.parameters())
    for _ in range(2):
        net(torch.randn(4, 16)).square().mean().backward()
        opt.step(loss=1.0)
        opt.zero_grad()
    weights = [m.weight for m in net]
    assert len({storage_of(w) for w in weights}) == 1  # moved into one buffer
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.save(net.state_dict(), tmp_path / "a.pt")
    save_file(net.state_dict(), tmp_path / "a.safetensors")
    for loaded in (torch.load(tmp_path / "a.pt"), load_file(tmp_path / "a.safetensors")):
        assert sd.keys() == loaded.keys() and all(torch.equal(sd[k], loaded[k]) for k in sd)
    fresh = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
    fresh.load_state_dict(torch.load(tmp_path / "a.pt"))
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), net.parameters()))
    net.load_state_dict({k: torch.zeros_like(v) for k, v in sd.items()})  # copies into the buffer
    assert all(not w.any() for w in weights) and len({storage_of(w) for w in weights}) == 1


def test_stack_states_are_views_of_one_buffer_and_resume_exactly():
    fast = make_params()
    opt = emoq.EmoSens(fast)
    train(fast, opt, 2)
    ptrs = {opt.state[p]["m"].untyped_storage().data_ptr() for p in fast[:6]}
    assert len(ptrs) == 1  # one stacked buffer
    sd = opt.state_dict()
    assert all(sd["state"][i]["m"].shape == (8, 64) for i in range(6))
    want = make_params()
    o_want = emoq.EmoSens(want)
    train(want, o_want, 4)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in fast]
    o2 = emoq.EmoSens(resumed)
    o2.load_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # replay steps 0-1's generator draws, then steps 2-3
        for p in resumed:
            torch.randn(p.shape, generator=g)
    for i in range(2, 4):
        for p in resumed:
            p.grad = torch.randn(p.shape, generator=g)
        o2.step(loss=2.0 / (1 + 0.1 * i))
    assert all(torch.equal(a, b) for a, b in zip(resumed, want))


def test_stack_member_without_gradient():
    fast, ref, _, _ = both_paths(emoq.EmoCats, steps=3, skip_grad=(1, 2))
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))


@pytest.mark.parametrize("cls,precision", [(emoq.EmoSens, "8bit"), (emoq.EmoCats, "4bit"), (emoq.EmoSens, "4bit")])
def test_lowbit_stacks_equal_the_reference_path(cls, precision):
    # Dequantize -> rule -> quantize compiled, stacked: the same codes as eagerly, one by one
    # (4-bit signed states: the same stochastic rounding, numbered within each parameter, with
    # the step count reaching the compiled call as a tensor).
    fast, ref, o_fast, o_ref = both_paths(cls, state_precision=precision, min_lowbit_size=0)
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))
    units = next(iter(o_fast._unit_cache.values()))[2]  # (params, dtypes, units) of the one group
    assert sorted(len(u.params) for u in units) == [1, 6]  # stacked compiled vs one by one eagerly
    with torch._dynamo.config.patch(error_on_recompile=True):  # a new step count compiles nothing
        train(fast, o_fast, 2, seed=2)
        train(ref, o_ref, 2, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))
    for a, b in zip(fast, ref):
        for name in o_ref.state[b]:
            sa, sb = o_fast.state[a][name], o_ref.state[b][name]
            assert torch.equal(sa.codes, sb.codes) and torch.equal(sa.scale, sb.scale)


@pytest.mark.parametrize("mode", ["error_feedback", "error_feedback8", "none"])
def test_bf16_weights_compensation_compiled_equals_eager(mode):
    # The compiled step keeps bf16 roundings (emulate_precision_casts): without it, inductor folds
    # x.to(bf16).float() into x and error feedback silently keeps a zero residual.
    fast, ref, o_fast, o_ref = both_paths(emoq.EmoSens, dtype=torch.bfloat16, compensation=mode)
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))
    if mode != "none":
        assert any(o_fast.state[p]["residual"].abs().max() > 0 for p in fast)


def test_casts_round_probe_and_its_eager_fallback(monkeypatch):
    # This torch keeps bf16/fp16 roundings compiled (emulate_precision_casts). Without that option
    # inductor folds x.to(bf16).float() into x — as torch 2.11 did on CPU even with it (seen on a
    # lent GPU machine): the probe notices, warns, and bf16 weights are stepped eagerly — the
    # reference path's results, not silently uncompensated ones. fp32 weights still compile.
    import copy

    assert kernels.compiled_casts_round(torch.bfloat16, torch.device("cpu"))
    assert kernels.compiled_casts_round(torch.float16, torch.device("cpu"))
    folding = copy.deepcopy(kernels.COMPILE_OPTIONS)
    folding["options"]["emulate_precision_casts"] = False
    monkeypatch.setattr(kernels, "COMPILE_OPTIONS", folding)
    monkeypatch.setattr(kernels, "_CASTS_ROUND", {})
    monkeypatch.setattr(kernels, "_COMPILED", {})  # a compiled step shows as a new entry
    with pytest.warns(RuntimeWarning, match="drops the rounding of casts"):
        assert not kernels.compiled_casts_round(torch.bfloat16, torch.device("cpu"))
    fast, ref, o_fast, _ = both_paths(emoq.EmoSens, dtype=torch.bfloat16, compensation="error_feedback")
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))
    assert not any(k[0] in ("step", "step2") for k in kernels._COMPILED)
    fp32 = make_params()
    train(fp32, emoq.EmoSens(fp32), 1)
    assert any(k[0] == "step" for k in kernels._COMPILED)


def test_stochastic_rounding_compiled_is_unbiased():
    # Compiled code computes bf16 ops in fp32; the other neighbour is found on the bit pattern.
    from emoq.compensate import stochastic_round

    x = torch.full((100_000,), 1.0 + 0.1 * 2.0 ** -7)
    fn = torch.compile(lambda t: stochastic_round(t, torch.bfloat16), **kernels.COMPILE_OPTIONS)
    up = (fn(x).float() > 1.0).float().mean().item()
    assert abs(up - 0.1) < 0.006


def test_compiled_default_is_bit_identical_on_the_core_net(batch):
    # 20 steps of the conv+MLP net of tests/test_core_rules.py (its compiled kernels are reused):
    # the default path and fused=False agree bit for bit for every family on x86-64 AVX2, where
    # this was measured (elsewhere ATen's CPU kernels may round otherwise; the bound of
    # test_300_steps_default_path_matches_reference still holds).
    if torch.backends.cpu.get_cpu_capability() != "AVX2":
        pytest.skip("measured on AVX2 only")
    x, y = batch
    for cls in FAMILIES:
        nets = [make_net(), make_net()]
        opts = [cls(nets[0].parameters()), cls(nets[1].parameters(), fused=False)]
        for _ in range(20):
            for net, opt in zip(nets, opts):
                net.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                opt.step(loss=loss)
        assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters())), cls.__name__


def test_subclass_rule_is_used_by_both_paths():
    def rule(p, g, states, stats, h, extent, decay):
        p, states = emosens_rule(p, g, states, stats, h, extent, decay)
        return p - h.lr, states  # a visible change: one extra -lr

    class Shifted(emoq.EmoSens):
        pass

    Shifted.rule = staticmethod(rule)
    fast, ref, _, _ = both_paths(Shifted, steps=2)
    base, _, _, _ = both_paths(emoq.EmoSens, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))
    assert not torch.equal(fast[0], base[0])


def test_a_non_finite_stacked_gradient_skips_the_whole_step():
    params = make_params()
    opt = emoq.EmoSens(params)
    train(params, opt, 1)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(p.shape)
    params[3].grad[0, 5] = float("nan")
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step(loss=1.0)
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_overflow_limit_is_per_gradient_not_per_stack():
    # Two stacked gradients each with a sum of squares of 0.6 * limit: the stack's joint norm is over
    # the limit, each gradient is within it, so the step runs; 1.2 * limit in one skips.
    params = make_params(shapes=[(8, 64)] * 2)
    opt = emoq.EmoCats(params)
    for scale, skipped in ((0.6, 0), (1.2, 1)):
        step_each_gradient_at(params, opt, scale)
        assert opt.skipped_steps == skipped


def step_each_gradient_at(params, opt, scale):
    """One step with every gradient constant and its sum of squares ``scale`` x SQUARES_LIMIT."""
    for p in params:
        p.grad = torch.full(p.shape, math.sqrt(scale * SQUARES_LIMIT / p.numel()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(loss=1.0)



@pytest.mark.parametrize("cls", [emoq.EmoSens, emoq.EmoCats])
def test_dot_range_check_skips_every_bad_gradient_and_keeps_the_per_gradient_limit(cls, monkeypatch):
    # DOT_MIN lowered so the shared small shapes take the torch.dot path (a stack of 6 x 512 and
    # one 256-element tensor alone); the spy proves that path ran.
    monkeypatch.setattr(base, "DOT_MIN", 256)
    calls = []
    real = base.sum_of_squares
    monkeypatch.setattr(base, "sum_of_squares", lambda g: calls.append(g.numel()) or real(g))
    params = make_params()
    opt = cls(params)
    train(params, opt, 1)
    assert sorted(calls) == [256, 6 * 512]
    for k, bad in ((0, float("nan")), (3, float("inf")), (6, -float("inf"))):  # stack members and the lone one
        before = [p.detach().clone() for p in params]
        states = {i: {n: v.clone() for n, v in opt.state[p].items()} for i, p in enumerate(params)}
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape)
            if i == k:
                p.grad.view(-1)[p.numel() // 2 + 1] = bad
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(loss=1.0)
        assert all(torch.equal(a, b) for a, b in zip(params, before))
        assert all(torch.equal(opt.state[p][n], v) for i, p in enumerate(params) for n, v in states[i].items())
    assert opt.skipped_steps == 3
    # each stacked gradient at 0.6 x the limit: the stack's joint sum is over it, each one within: steps
    for scale, skipped in ((0.6, 3), (1.2, 4)):
        step_each_gradient_at(params, opt, scale)
        assert opt.skipped_steps == skipped


def test_dot_range_check_only_where_it_applies():
    big = torch.zeros(base.DOT_MIN)
    assert base.dot_checked(big)
    assert not base.dot_checked(torch.zeros(base.DOT_MIN - 1))
    assert not base.dot_checked(big.double())
    assert not base.dot_checked(big.view(256, -1).t())  # not contiguous: the multi-tensor norm
    # a non-contiguous gradient of a parameter that would qualify is still range-checked
    p = torch.nn.Parameter(torch.zeros(256, base.DOT_MIN // 256))
    opt = emoq.EmoCats([p], fused=False)
    g = torch.zeros(p.shape[1], p.shape[0])
    g[1, 2] = float("nan")
    p.grad = g.t()
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(loss=1.0)
    assert opt.skipped_steps == 1 and not p.detach().any()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5000), st.floats(1e-30, 1e15), st.integers(0, 2**31 - 1),
       st.sampled_from([None, float("nan"), float("inf"), -float("inf")]))
def test_sum_of_squares_matches_float64_and_propagates_non_finite(n, scale, seed, bad):
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    exact = g.double().square().sum().item()
    if bad is not None:
        g[seed % n] = bad
    got = base.sum_of_squares(g).item()
    if bad is not None:
        assert not math.isfinite(got)
    elif exact < SQUARES_LIMIT:  # no overflow: fp32 accumulation within n ulps of the float64 sum
        assert math.isclose(got, exact, rel_tol=n * 2.0 ** -23, abs_tol=1e-45 * n)


def test_grads_in_range():
    ok = torch.tensor(3.0)
    assert grads_in_range([ok], [torch.tensor([1.0, 2.0])])
    assert not grads_in_range([torch.tensor(float("nan"))], [])
    assert not grads_in_range([], [torch.tensor([1.0, float("inf")])])
    assert not grads_in_range([], [torch.tensor(SQUARES_LIMIT * 1.01)])
    assert grads_in_range([], [])


def test_compile_failure_warns_loudly_once_and_runs_the_reference_path(monkeypatch):
    def broken_compile(fn, **kw):
        def compiled(*args, **kwargs):
            raise RuntimeError("no C++ compiler")
        return compiled

    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels.torch, "compile", broken_compile)
    fast = make_params()
    with pytest.warns(RuntimeWarning, match="torch.compile of .* failed") as rec:
        opt = emoq.EmoSens(fast)
        train(fast, opt, 3)
    assert sum(str(w.message).startswith("emoq: torch.compile") for w in rec) == 1
    ref = make_params()
    train(ref, emoq.EmoSens(ref, fused=False), 3)
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))



def _lowbit_state_values(opt, params):
    return [(name, v.dequantize() if hasattr(v, "dequantize") else v) for p in params
            for name, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("precision", ["8bit", "4bit", "fp8"])
@pytest.mark.parametrize("cls", FAMILIES)
def test_two_phase_lowbit_step_equals_one_compiled_call(cls, precision, monkeypatch):
    # Low-bit steps of 2-4 M elements run as rule -> kept scratch -> quantize (two compiled calls,
    # SCRATCH_MIN/MAX, lowered here to the test's sizes); with SCRATCH_MAX = 0 the same step is one
    # call: parameters and states bit for bit equal, stacks included; the scratch buffers are
    # allocated once and reused.
    monkeypatch.setattr(kernels, "SCRATCH_MIN", 1)  # the test's small states take the two-call path

    def run(limit):
        monkeypatch.setattr(kernels, "SCRATCH_MAX", limit)
        params = make_params()
        opt = cls(params, state_precision=precision, min_lowbit_size=0)
        train(params, opt, 2)
        ptrs = {k: b.data_ptr() for k, b in opt._runner._scratch.items()}
        train(params, opt, 2, seed=3)
        assert ptrs == {k: b.data_ptr() for k, b in opt._runner._scratch.items()}
        return params, opt

    two, o_two = run(kernels.SCRATCH_MAX)
    one, o_one = run(0)
    from emoq.states import is_lowbit

    lowbit = any(is_lowbit(v) for p in two for v in o_two.state[p].values())  # EmoAiry, EmoTion: none here
    assert lowbit == (cls in (emoq.EmoSens, emoq.EmoCats))
    assert bool(o_two._runner._scratch) == lowbit and not o_one._runner._scratch
    assert all(torch.equal(a, b) for a, b in zip(two, one))
    for (n1, a), (n2, b) in zip(_lowbit_state_values(o_two, two), _lowbit_state_values(o_one, one)):
        assert n1 == n2 and torch.equal(a, b), n1


@pytest.mark.parametrize("failing", [0, 1])
def test_two_phase_compile_failure_never_leaves_a_step_half_done(failing, monkeypatch):
    # The first compiled call failing: nothing written, the whole step eager. The second failing
    # (the parameter already written): the states are quantized from scratch eagerly. Either way
    # the result is the reference path's, and the failure warns once.
    real = torch.compile
    made = []

    def compile_failing(fn, **kw):
        made.append(fn.__name__)
        if fn.__name__ == ("emoq_step_to_scratch", "emoq_store_lowbit")[failing]:
            def broken(*args, **kwargs):
                raise RuntimeError("no C++ compiler")
            return broken
        return real(fn, **kw)

    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels, "SCRATCH_MIN", 1)
    monkeypatch.setattr(kernels.torch, "compile", compile_failing)
    fast = make_params()
    with pytest.warns(RuntimeWarning, match="torch.compile of .* failed") as rec:
        opt = emoq.EmoSens(fast, state_precision="8bit", min_lowbit_size=0)
        train(fast, opt, 3)
    assert sum(str(w.message).startswith("emoq: torch.compile") for w in rec) == 1
    assert "emoq_step_to_scratch" in made
    ref = make_params()
    o_ref = emoq.EmoSens(ref, fused=False, state_precision="8bit", min_lowbit_size=0)
    train(ref, o_ref, 3)
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))
    for (n1, a), (n2, b) in zip(_lowbit_state_values(opt, fast), _lowbit_state_values(o_ref, ref)):
        assert n1 == n2 and torch.equal(a, b), n1

OOM = {"cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                                   "allocate memory: you tried to allocate 67108864 bytes. Error code 12"),
       "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB"),
       "mps": lambda: RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB, other allocations: 1.00 GB)"),
       "python": lambda: MemoryError()}


@pytest.mark.parametrize("where", ["emoq_step", "emoq_stats", "emoq_step_to_scratch", "emoq_store_lowbit"])
@pytest.mark.parametrize("kind", sorted(OOM))
def test_memory_running_out_in_a_compiled_call_is_raised_and_compiling_stays_on(where, kind, monkeypatch):
    # Memory that runs out while a compiled call runs is not a compile failure: no "compile failed"
    # warning, no switch to the (slower, hungrier) eager path for good. The call that needs the
    # memory raises (the step puts its pulse back); once memory is there the next step is compiled
    # and equals the reference path's. The second call of a two-phase step runs after the
    # parameter was written: it finishes eagerly, this once.
    real = torch.compile
    short = [False]

    def compile_oom(fn, **kw):
        compiled = real(fn, **kw)
        if fn.__name__ != where:
            return compiled

        def call(*args, **kwargs):
            if short[0]:
                raise OOM[kind]()
            return compiled(*args, **kwargs)
        return call

    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels.torch, "compile", compile_oom)
    cls, precision = {"emoq_step": (emoq.EmoSens, "fp32"), "emoq_stats": (emoq.EmoTion, "fp32")}.get(
        where, (emoq.EmoSens, "8bit"))
    if precision == "8bit":
        monkeypatch.setattr(kernels, "SCRATCH_MIN", 1)
    shapes = [(64, 64)] * 2 + [(128, 64)] if where == "emoq_stats" else STACK  # factored: EmoTion's statistics
    fast, ref = make_params(shapes), make_params(shapes)
    opt = cls(fast, state_precision=precision, min_lowbit_size=0)
    o_ref = cls(ref, fused=False, state_precision=precision, min_lowbit_size=0)
    train(fast, opt, 1)
    train(ref, o_ref, 1)
    pulse, short[0] = opt.emo_pulse.state_dict(), True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "torch.compile ... failed" warning
        if where == "emoq_store_lowbit":
            train(fast, opt, 1, seed=2)  # finished eagerly
            train(ref, o_ref, 1, seed=2)
        else:
            with pytest.raises(type(OOM[kind]())):
                train(fast, opt, 1, seed=2)
            assert opt.emo_pulse.state_dict() == pulse
    assert opt._runner.compiling
    short[0] = False
    train(fast, opt, 2, seed=3)
    train(ref, o_ref, 2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))


@pytest.mark.parametrize("value,want", [("0", False), ("off", False), ("1", True), ("", True)])
def test_compile_switch(value, want, monkeypatch):
    monkeypatch.setenv("EMOQ_COMPILE", value)
    assert kernels.compile_enabled() is want
    assert emoq.EmoSens(make_params(shapes=[(2,)]))._runner.compile is want
    assert emoq.EmoSens(make_params(shapes=[(2,)]), fused=False)._runner.compile is False


@pytest.mark.parametrize("precision", ["8bit", "fp8", "4bit"])
@pytest.mark.parametrize("cls", [emoq.EmoSens, emoq.EmoCats])
def test_large_parameters_stepped_in_pieces_equal_whole_steps(cls, precision, monkeypatch):
    # An element-wise rule with low-bit states steps a large parameter in block-aligned pieces
    # (emoq.optim.base.CHUNK, here 768 elements): bit for bit the whole step, at most two piece
    # sizes compiled. 4-bit signed states round stochastically (the dither numbers elements within
    # the parameter): such a parameter is stepped whole.
    from emoq.optim import base

    def run(chunk):
        monkeypatch.setattr(base, "CHUNK", chunk)
        monkeypatch.setattr(kernels, "_COMPILED", {})
        params = make_params([(40, 64)])
        opt = cls(params, state_precision=precision, min_lowbit_size=0)
        train(params, opt, 3)
        shapes = {k[3].shape for k in kernels._COMPILED if k[0] in ("step", "step2")}
        return params, opt, shapes

    whole, o_whole, whole_shapes = run(1 << 30)
    pieces, o_pieces, piece_shapes = run(768)
    assert whole_shapes == {(40, 64)}
    assert all(torch.equal(a, b) for a, b in zip(whole, pieces))
    for (n1, a), (n2, b) in zip(_lowbit_state_values(o_whole, whole), _lowbit_state_values(o_pieces, pieces)):
        assert n1 == n2 and torch.equal(a, b), n1
    stochastic = precision == "4bit"  # EmoSens' m and EmoCats' m are signed
    assert piece_shapes == ({(40, 64)} if stochastic else {(768,), (256,)})


def _train_special(params, opt, steps=4):
    """Gradients with whole blocks of zeros, tiny and huge values (8-bit scales at their 1e-12 floor,
    subnormal squares, squares near 1e30)."""
    g = torch.Generator().manual_seed(5)
    for i in range(steps):
        grad = torch.randn(params[0].shape, generator=g)
        grad[:4] = 0.0
        grad[4:8] *= 1e-22
        grad[8:12] *= 1e15
        params[0].grad = grad
        opt.step(loss=2.0 / (1 + 0.1 * i))


@pytest.mark.parametrize("cls", [emoq.EmoSens, emoq.EmoCats])
def test_two_call_pieces_equal_the_reference_on_extreme_gradients(cls, monkeypatch):
    # The 8-bit pieces of a large parameter (CHUNK lowered to 768 elements) take the two-call step
    # (rule -> fp32 scratch -> block-peak quantization): parameters and states bit for bit those of
    # the reference path with all-zero blocks, subnormal squares and squares near 1e30.
    monkeypatch.setattr(base, "CHUNK", 768)
    monkeypatch.setattr(kernels, "SCRATCH_MIN", 1)

    def run(fused):
        params = make_params([(40, 64)])
        opt = cls(params, fused=fused, state_precision="8bit", min_lowbit_size=0)
        _train_special(params, opt, 4)
        return params, opt

    two, o_two = run(True)
    ref, o_ref = run(False)
    assert o_two._runner._scratch
    assert all(torch.equal(a, b) for a, b in zip(two, ref))
    for (n1, a), (n2, b) in zip(_lowbit_state_values(o_two, two), _lowbit_state_values(o_ref, ref)):
        assert n1 == n2 and torch.equal(a, b), n1
    assert float(o_two.state[two[0]]["m"].scale.min()) == float(torch.tensor(1e-12))  # the zero blocks
