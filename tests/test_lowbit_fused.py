"""The fused (dequantize -> rule -> requantize) kernels: compiled vs eager, vs the reference rule,
and the loud fallback when compilation fails. Compiles only a few small cases (a few s each)."""

import warnings

import pytest
import torch

import emoq
from emoq import fused

SHAPE = (64, 256)  # 16384 elements: above the default low-bit threshold


def run(cls, steps, seed=0, **kw):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(SHAPE))
    opt = cls([p], **kw)
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(steps):
        p.grad = torch.randn(SHAPE, generator=g)
        opt.step(loss=2.0 / (1 + 0.1 * i))
    return p.detach().clone(), opt


@pytest.mark.parametrize("cls,precision", [(emoq.EmoSens, "8bit"), (emoq.EmoCats, "4bit")])
def test_compiled_kernel_matches_eager_kernel(cls, precision, monkeypatch):
    # Same formulas; compiled code may contract to FMA, so parameters agree to fp32 rounding
    # accumulated over 5 steps, not bit for bit.
    p_c, o_c = run(cls, 5, state_precision=precision)
    assert o_c._kernels is not None and o_c._kernels.compile
    monkeypatch.setenv("EMOQ_COMPILE", "0")
    p_e, o_e = run(cls, 5, state_precision=precision)
    assert not o_e._kernels.compile
    torch.testing.assert_close(p_c, p_e, rtol=1e-5, atol=1e-6)


def test_fused_fp32_close_to_reference_rule():
    # fused=True runs EmoSens' fp32 step compiled; the eager default is the reference-exact path.
    p_f, _ = run(emoq.EmoSens, 20, fused=True)
    p_r, o_r = run(emoq.EmoSens, 20)
    assert o_r._kernels is None  # fp32 default never touches the fused kernels
    torch.testing.assert_close(p_f, p_r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [emoq.EmoSens, emoq.EmoCats])
@pytest.mark.parametrize("precision", ["8bit", "4bit", "fp8", "bf16"])
def test_fused_kernel_and_eager_rule_agree(cls, precision, monkeypatch):
    # fused=False runs the SPEC-order rule on dequantized states; the fused kernel runs the
    # out-of-place formulas. Same maths: within fp32 rounding after 3 steps (fused run eagerly).
    monkeypatch.setenv("EMOQ_COMPILE", "0")
    p_f, o_f = run(cls, 3, state_precision=precision, fused=True)
    p_r, o_r = run(cls, 3, state_precision=precision, fused=False)
    assert o_r._kernels is None and o_f._kernels is not None
    torch.testing.assert_close(p_f, p_r, rtol=1e-5, atol=1e-6)


def test_compile_failure_warns_loudly_once_and_keeps_results(monkeypatch):
    def broken_compile(fn, **kw):
        def compiled(*args, **kwargs):
            raise RuntimeError("no C++ compiler")
        return compiled

    monkeypatch.setattr(fused.torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="torch.compile of the fused EmoSens step failed") as rec:
        p_b, _ = run(emoq.EmoSens, 4, state_precision="8bit")
    assert sum("torch.compile" in str(w.message) for w in rec) == 1
    monkeypatch.setenv("EMOQ_COMPILE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p_e, _ = run(emoq.EmoSens, 4, state_precision="8bit")
    assert torch.equal(p_b, p_e)  # the fallback is the same kernel run eagerly


@pytest.mark.parametrize("value,want", [("0", False), ("off", False), ("1", True), ("", True)])
def test_compile_switch(value, want, monkeypatch):
    monkeypatch.setenv("EMOQ_COMPILE", value)
    assert fused.compile_enabled() is want


def test_subclass_with_its_own_rule_never_takes_the_fused_path(monkeypatch):
    monkeypatch.setenv("EMOQ_COMPILE", "0")
    calls = []

    class MySens(emoq.EmoSens):
        def _rule(self, p, g, states, group, lr):
            calls.append(1)
            super()._rule(p, g, states, group, lr)

    run(MySens, 2, state_precision="8bit")
    assert len(calls) == 2
    assert run(emoq.EmoSens8bit, 1)[1]._family == "EmoSens"
