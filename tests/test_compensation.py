"""Quantization compensation for bf16/fp16 parameters (emoq.compensate)."""

import io

import pytest
import torch

import emoq
from emoq.compensate import COMPENSATIONS, DEFAULT_COMPENSATION, stochastic_round, ulp


def test_default_and_validation():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    assert emoq.EmoSens([p]).compensation == DEFAULT_COMPENSATION == "error_feedback"
    for mode in COMPENSATIONS:
        assert emoq.EmoCats([p], compensation=mode).compensation == mode
    with pytest.raises(ValueError, match="compensation must be one of"):
        emoq.EmoSens([p], compensation="kahan")


def test_ulp_of_bf16_and_fp16():
    for dtype, bits in ((torch.bfloat16, 7), (torch.float16, 10)):
        q = torch.tensor([1.0, 1.5, 2.0, -3.0, 0.01], dtype=dtype)
        nxt = torch.nextafter(q, torch.full_like(q, float("inf")))
        want = (nxt.float() - q.float()).abs()
        want[3] = (torch.nextafter(q[3:4], torch.full_like(q[3:4], -float("inf"))).float() - q[3].float()).abs()
        torch.testing.assert_close(ulp(q), want)
        assert float(ulp(torch.tensor([1.0], dtype=dtype))) == 2.0 ** -bits


def test_stochastic_rounding_is_unbiased():
    # x one tenth of an ulp above 1.0: rounds up with probability 0.1 (binomial, n=200k: 0.1 +- 0.002)
    x = torch.full((200_000,), 1.0 + 0.1 * 2.0 ** -7)
    g = torch.Generator().manual_seed(0)
    r = stochastic_round(x, torch.bfloat16, generator=g).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    assert abs((r == 1.0 + 2.0 ** -7).float().mean().item() - 0.1) < 0.004
    exact = torch.tensor([1.0, 2.5, -0.375])
    assert torch.equal(stochastic_round(exact, torch.bfloat16).float(), exact)


def tiny_updates(mode, dtype=torch.bfloat16, steps=200):
    # Updates of ~1e-4 relative on weights ~1: below half a bf16 ulp (2^-8 = 3.9e-3).
    torch.manual_seed(0)
    w0 = torch.empty(4096).uniform_(1.0, 1.9)
    p = torch.nn.Parameter(w0.to(dtype))
    ref = torch.nn.Parameter(p.detach().float().clone())
    opt = emoq.EmoCats([p], compensation=mode, weight_decay=0.0)
    opt_ref = emoq.EmoCats([ref], weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grad = torch.randn(4096, generator=g) + 0.5
        p.grad, ref.grad = grad.to(dtype), grad.to(dtype).float()
        opt.step(loss=1.0)
        opt_ref.step(loss=1.0)
    return p, ref, opt, w0.to(dtype)


def test_without_compensation_small_updates_vanish():
    p, ref, _, start = tiny_updates("none")
    assert torch.equal(p.detach(), start)  # every update rounded away
    assert (ref.detach() - start.float()).abs().mean() > 1e-2  # fp32 weights moved


def master(p, opt, mode):
    x = p.detach().float()
    if mode == "error_feedback":
        return x + opt.state[p]["residual"].float()
    if mode == "error_feedback8":
        return x + opt.state[p]["residual"].float() * ulp(p.detach()) / 254
    return x


@pytest.mark.parametrize("mode,per_step", [("error_feedback", 2.0 ** -9 * 2.0 ** -8),
                                           ("error_feedback8", 2.0 ** -7 / 508)])
def test_error_feedback_tracks_fp32_weights(mode, per_step):
    # p + residual follows the fp32 trajectory up to the residual's own rounding, at most
    # per_step each step (bf16 residual: 2^-9 relative of |residual| <= half an ulp = 2^-8 on
    # [1, 2); int8: half of 1/254 ulp), so after 200 steps within 200 * per_step even if every
    # rounding went the same way; p itself is within half an ulp more.
    p, ref, opt, start = tiny_updates(mode)
    assert (ref.detach() - start.float()).abs().mean() > 1e-2  # the fp32 run moved ~2 ulps
    err = (master(p, opt, mode) - ref.detach()).abs()
    assert err.max().item() <= 200 * per_step, err.max().item()
    assert (p.detach().float() - ref.detach()).abs().max().item() <= 200 * per_step + 2.0 ** -8
    assert opt.state[p]["residual"].dtype == (torch.int8 if mode == "error_feedback8" else torch.bfloat16)


def test_stochastic_rounding_is_unbiased_over_training():
    # Round-to-nearest drops every update (mean error = the whole movement, +0.018 here);
    # stochastic rounding is unbiased: the mean signed error over 4096 weights is ~0, within
    # 6 standard errors (each weight's error is a random walk of std < ulp/2 * sqrt(200) / ...,
    # measured 0.01 mean |error|, so the mean of 4096 has std ~ 0.01 / 64 = 1.6e-4).
    p, ref, _, start = tiny_updates("stochastic")
    bias = (p.detach().float() - ref.detach()).mean().item()
    moved = (ref.detach() - start.float()).mean().abs().item()
    assert abs(bias) < 1e-3 < moved
    p0, ref0, _, _ = tiny_updates("none")
    assert abs((p0.detach().float() - ref0.detach()).mean().item()) > 0.9 * moved


def test_error_feedback_fp16():
    # fp16 on [1, 2): ulp 2^-10; residual in fp16 (11 bits of |residual| <= 2^-11).
    p, ref, opt, _ = tiny_updates("error_feedback", dtype=torch.float16)
    err = (master(p, opt, "error_feedback") - ref.detach()).abs().max().item()
    assert err <= 200 * 2.0 ** -11 * 2.0 ** -11, err


def test_fp32_params_are_never_compensated():
    p = torch.nn.Parameter(torch.ones(8))
    opt = emoq.EmoSens([p], compensation="error_feedback")
    p.grad = torch.ones(8)
    opt.step(loss=1.0)
    assert "residual" not in opt.state[p]


@pytest.mark.parametrize("mode", ["error_feedback", "error_feedback8"])
def test_residual_is_saved_and_resumed(mode):
    def make():
        torch.manual_seed(0)
        return torch.nn.Parameter(torch.randn(64, 64).to(torch.bfloat16))

    def steps(p, opt, n, start):
        g = torch.Generator().manual_seed(start)
        for _ in range(n):
            p.grad = torch.randn(64, 64, generator=g).to(torch.bfloat16)
            opt.step(loss=1.0)

    p = make()
    opt = emoq.EmoSens([p], compensation=mode)
    steps(p, opt, 3, 0)
    buf = io.BytesIO()
    torch.save({"p": p.detach(), "opt": opt.state_dict()}, buf)
    steps(p, opt, 3, 1)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    p2 = torch.nn.Parameter(ck["p"].clone())
    opt2 = emoq.EmoSens([p2], compensation=mode)
    opt2.load_state_dict(ck["opt"])
    assert torch.equal(opt2.state[p2]["residual"], ck["opt"]["state"][0]["residual"])
    steps(p2, opt2, 3, 1)
    assert torch.equal(p2.detach(), p.detach())


def test_compensation_with_lowbit_states():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 256).to(torch.bfloat16))
    opt = emoq.EmoSens8bit([p], compensation="error_feedback")
    for i in range(3):
        p.grad = torch.randn(64, 256).to(torch.bfloat16)
        opt.step(loss=1.0 / (i + 1))
    assert set(opt.state[p]) == {"m", "v", "residual"} and p.dtype == torch.bfloat16
