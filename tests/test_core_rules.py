"""Each family against the plain SPEC.md reference (tests/reference.py)."""

import pytest
import torch
import torch.nn.functional as F

import emoq
from tests.conftest import make_net
from tests.reference import RefEmo

FAMILIES = {"sens": emoq.EmoSens, "airy": emoq.EmoAiry, "cats": emoq.EmoCats, "tion": emoq.EmoTion}


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_pair(family, batch, steps, naive=False, device="cpu", same_loss=False, **kw):
    """Train two copies of the same net, one with emoq and one with the reference, on the same
    batch (on ``device``); return the worst relative parameter error and relative pulse error
    seen. ``same_loss``: emoq's pulse is fed the reference's loss (tests/test_cuda.py)."""
    x, y = (t.to(device) for t in batch)
    net, ref_net = make_net().to(device), make_net().to(device)
    opt = FAMILIES[family](net.parameters(), **kw)
    kw.pop("fused", None)
    ref = RefEmo(family, ref_net.parameters(), naive=naive, **kw)
    worst_p = worst_eta = 0.0
    for _ in range(steps):
        for model in (net, ref_net):
            model.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        ref_loss = F.cross_entropy(ref_net(x), y)
        ref_loss.backward()
        opt.step(loss=ref_loss.item() if same_loss else loss)
        ref.step(ref_loss.item())
        worst_eta = max(worst_eta, abs(opt.pulse - ref.eta) / ref.eta)
    for p, q in zip(net.parameters(), ref_net.parameters()):
        worst_p = max(worst_p, rel_err(p.detach(), q.detach()))
    return worst_p, worst_eta, loss.item()


@pytest.mark.parametrize("family", FAMILIES)
def test_300_steps_reference_path_is_exact(family, batch):
    # fused=False runs each rule eagerly, op for op as tests/reference.py: bit-identical.
    worst_p, worst_eta, final_loss = run_pair(family, batch, 300, fused=False)
    assert worst_p == 0.0, worst_p
    assert worst_eta == 0.0, worst_eta
    assert final_loss < 2.0  # it trains: log(10) = 2.30 at start


@pytest.mark.compiled
@pytest.mark.parametrize("family", FAMILIES)
def test_300_steps_default_path_matches_reference(family, batch):
    # The default (compiled) path: within the core issue's bound, 1e-4 relative parameter error and
    # 1e-6 relative pulse error. Measured: 0.0 for all four families on x86-64 AVX2 (see
    # docs/precision.md; EmoTion's column sums are added in another order when compiled).
    worst_p, worst_eta, final_loss = run_pair(family, batch, 300)
    assert worst_p < 1e-4, worst_p
    assert worst_eta < 1e-6, worst_eta
    assert final_loss < 2.0


@pytest.mark.parametrize("family", FAMILIES)
def test_early_steps_match_naive_arithmetic(family, batch):
    # The same maths as plain two-rounding arithmetic: equal to float rounding while training has
    # not yet amplified rounding differences (SPEC.md, "Rounding matters for the sign rules").
    worst_p, worst_eta, _ = run_pair(family, batch, 20, naive=True)
    assert worst_p < 1e-6, worst_p
    assert worst_eta < 1e-9, worst_eta


@pytest.mark.parametrize("family", FAMILIES)
def test_shadow_matches_reference(family, batch):
    worst_p, worst_eta, _ = run_pair(family, batch, 60, use_shadow=True)
    assert worst_p < 1e-4, worst_p
    assert worst_eta < 1e-6, worst_eta


@pytest.mark.parametrize("family", FAMILIES)
def test_hyperparameters_reach_the_rule(family, batch):
    kw = dict(lr=2.5, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    worst_p, worst_eta, _ = run_pair(family, batch, 40, **kw)
    assert worst_p < 1e-4, worst_p
    assert worst_eta < 1e-6, worst_eta


@pytest.mark.parametrize("shape,expect", [((64,), False), ((16, 32), False), ((64, 64), True),
                                          ((32, 16, 3, 3), True), ((4, 2, 3, 3), False), ((10, 64), False)])
def test_factored_rule(shape, expect):
    assert emoq.optim.base.is_factored(torch.empty(shape)) is expect


@pytest.mark.parametrize("family,shape,names", [
    ("sens", (64, 64), {"m", "v"}), ("sens", (5,), {"m", "v"}),
    ("cats", (64, 64), {"m"}), ("cats", (5,), {"m"}),
    ("airy", (64, 64), {"row", "col"}), ("airy", (8, 16), set()), ("airy", (32, 16, 3, 3), {"row", "col"}),
    ("tion", (64, 64), {"row", "col"}), ("tion", (8, 16), set()), ("tion", (32, 16, 3, 3), {"row", "col"}),
])
def test_which_states_exist(family, shape, names):
    p = torch.nn.Parameter(torch.randn(shape))
    opt = FAMILIES[family]([p])
    p.grad = torch.randn(shape)
    opt.step(loss=1.0)
    assert set(opt.state[p]) == names
    if family == "tion" and names:
        assert opt.state[p]["row"].shape == (shape[0],)
        assert opt.state[p]["col"].shape == (p.numel() // shape[0],)
    if family == "airy" and names:
        assert opt.state[p]["row"].shape == (shape[0],) + (1,) * (len(shape) - 1)
        assert opt.state[p]["col"].shape == (1,) + shape[1:]


def test_airy_direction_is_sign_of_gradient():
    # SPEC.md: every denominator is positive, so EmoAiry moves by -eta*sign(g) (plus decay).
    p = torch.nn.Parameter(torch.randn(64, 64))
    start = p.detach().clone()
    opt = emoq.EmoAiry([p], weight_decay=0.0)
    p.grad = torch.randn(64, 64)
    opt.step(loss=1.0)
    assert torch.equal(p.detach(), start - opt.pulse * torch.sign(p.grad))


def test_params_without_grad_are_skipped():
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = emoq.EmoSens([a, b])
    a.grad = torch.ones(4)
    opt.step(loss=1.0)
    assert torch.equal(b.detach(), torch.ones(4)) and b not in opt.state
    assert not torch.equal(a.detach(), torch.ones(4))


def test_bf16_params_are_updated_in_fp32_and_rounded():
    # A bf16 parameter gets the fp32 update of its bf16 value, rounded to nearest once.
    torch.manual_seed(0)
    p16 = torch.nn.Parameter(torch.randn(32, 32).bfloat16())
    p32 = torch.nn.Parameter(p16.detach().float())
    g = torch.randn(32, 32).bfloat16()
    o16, o32 = emoq.EmoSens([p16]), emoq.EmoSens([p32])
    p16.grad, p32.grad = g, g.float()
    o16.step(loss=1.0)
    o32.step(loss=1.0)
    assert p16.dtype == torch.bfloat16 and o16.state[p16]["m"].dtype == torch.float32
    assert torch.equal(p16.detach(), p32.detach().bfloat16())
