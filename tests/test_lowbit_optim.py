"""Every family x state precision: step, resume, portability, small-tensor fallback, aliases.

The steps run eagerly here (EMOQ_COMPILE=0, set by tests/conftest.py: same functions, no
compile time); tests/test_kernels.py covers the compiled path.
"""

import io

import pytest
import torch

import emoq
from emoq.states import BLOCK_SIZE, is_lowbit, rounds_stochastically, state_bytes
from tests.conftest import make_net, train

FAMILIES = [emoq.EmoSens, emoq.EmoAiry, emoq.EmoCats, emoq.EmoTion]
PRECISIONS = ["bf16", "8bit", "4bit", "fp8"]


def params_of(net):
    return [p.detach().clone() for p in net.parameters()]


def save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True), len(buf.getvalue())


@pytest.mark.parametrize("cls", FAMILIES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_first_step_matches_fp32(cls, precision, batch):
    # States are quantized *after* the step uses them: from zero states, the first update is the
    # fp32 update (sign rules exactly; EmoSens/EmoCats through the fused formulas, within fp32
    # rounding), and each stored state is the fp32 state rounded by the storage.
    net32, netq = make_net(), make_net()
    o32, oq = cls(net32.parameters()), cls(netq.parameters(), state_precision=precision, min_lowbit_size=0)
    train(net32, o32, batch, 1)
    train(netq, oq, batch, 1)
    for a, b in zip(params_of(net32), params_of(netq)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    n_lowbit = 0
    for p32, pq in zip(net32.parameters(), netq.parameters()):
        for name, s in oq.state[pq].items():
            ref = o32.state[p32][name]
            got = oq._storage.load(s)
            n_lowbit += is_lowbit(s)
            if precision == "bf16":
                assert torch.equal(got, ref.bfloat16().float())
            elif is_lowbit(s):  # coarse envelope: one nearest rounding is at most 1/8 of the block
                # max, a stochastic one (signed 4-bit) at most one gap of the map (0.225 of it);
                # an all-zero block (dead units) reads as the zero-free floor under torchao's
                # 1e-12 minimum scale, hence the 1e-12 absolute slack
                block = BLOCK_SIZE[precision]
                r = ref.reshape(-1, block) if s.signed else ref.sqrt().reshape(-1, block)
                o = got.reshape(-1, block) if s.signed else got.sqrt().reshape(-1, block)
                bound = 0.25 if rounds_stochastically(precision, s.signed) else 0.125
                assert bool(((o - r).abs() <= bound * r.abs().amax(1, keepdim=True) + 1e-12).all())
            else:
                assert torch.equal(got, ref)
    assert precision == "bf16" or n_lowbit > 0


@pytest.mark.parametrize("cls", FAMILIES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_training_tracks_fp32(cls, precision, batch):
    # 40 steps on the test net: the loss drop with low-bit states is at least half the fp32
    # drop (a broken state -- zeros, wrong sign, sqrt mix-up -- stalls or diverges; the quality
    # targets proper are measured by bench/precision.py on 600 digits steps).
    net32, netq = make_net(), make_net()
    l32 = train(net32, cls(net32.parameters()), batch, 40)
    lq = train(netq, cls(netq.parameters(), state_precision=precision, min_lowbit_size=0), batch, 40)
    drop32 = sum(l32[:4]) / 4 - sum(l32[-4:]) / 4
    dropq = sum(lq[:4]) / 4 - sum(lq[-4:]) / 4
    assert drop32 > 0 and dropq > 0.5 * drop32, (drop32, dropq)
    assert all(torch.isfinite(p).all() for p in netq.parameters())


@pytest.mark.parametrize("cls", FAMILIES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_resume_is_exact(cls, precision, batch):
    kw = dict(state_precision=precision, min_lowbit_size=0)
    net = make_net()
    opt = cls(net.parameters(), **kw)
    train(net, opt, batch, 8)
    want = params_of(net)

    net = make_net()
    opt = cls(net.parameters(), **kw)
    train(net, opt, batch, 4)
    ckpt, _ = save_load({"model": net.state_dict(), "optim": opt.state_dict()})
    net2 = make_net(seed=5)
    net2.load_state_dict(ckpt["model"])
    opt2 = cls(net2.parameters(), **kw)
    opt2.load_state_dict(ckpt["optim"])
    for p, p2 in zip(net.parameters(), net2.parameters()):
        for name in opt.state[p]:
            assert type(opt.state[p][name]) is type(opt2.state[p2][name])
    train(net2, opt2, batch, 4, start=4)
    assert all(torch.equal(a, b) for a, b in zip(params_of(net2), want))


@pytest.mark.parametrize("cls", FAMILIES)
@pytest.mark.parametrize("src,dst", [("8bit", "fp32"), ("fp32", "8bit"), ("4bit", "8bit"), ("fp8", "bf16"),
                                     ("8bit", "4bit")])
def test_checkpoint_portable_across_precisions(cls, src, dst, batch):
    # Documented bound (docs/precision.md): loading into fp32 gives the saved dequantized values
    # exactly; loading into a low-bit precision rounds them once more (tests/test_lowbit_states.py
    # checks that rounding against each map's half gap). Training then continues.
    net = make_net()
    opt = cls(net.parameters(), state_precision=src, min_lowbit_size=0)
    train(net, opt, batch, 3)
    sd, _ = save_load(opt.state_dict())
    opt2 = cls(net.parameters(), state_precision=dst, min_lowbit_size=0)
    opt2.load_state_dict(sd)
    for p in net.parameters():
        for name, s in opt.state[p].items():
            s2 = opt2.state[p][name]
            if dst == "fp32":
                assert s2.dtype == torch.float32 and not is_lowbit(s2)
                assert torch.equal(s2, opt._storage.load(s))
            elif dst in ("8bit", "4bit") and s2.numel() % BLOCK_SIZE[dst] == 0:
                assert is_lowbit(s2)
    assert opt2.pulse == opt.pulse
    train(net, opt2, batch, 2, start=3)
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("cls", FAMILIES)
@pytest.mark.parametrize("precision", ["8bit", "4bit", "fp8"])
def test_small_tensors_keep_fp32_states(cls, precision, batch):
    net = make_net()
    opt = cls(net.parameters(), state_precision=precision)  # default min_lowbit_size=4096
    train(net, opt, batch, 2)
    for p in net.parameters():
        for s in opt.state[p].values():
            big = s.numel() >= 4096 and s.numel() % BLOCK_SIZE[precision] == 0
            assert is_lowbit(s) == big
            if not big:
                assert s.dtype == torch.float32
    # everything below the threshold: identical to the fp32 optimizer, bit for bit
    net_a, net_b = make_net(), make_net()
    train(net_a, cls(net_a.parameters()), batch, 5)
    train(net_b, cls(net_b.parameters(), state_precision=precision, min_lowbit_size=10**9), batch, 5)
    assert all(torch.equal(a, b) for a, b in zip(params_of(net_a), params_of(net_b)))


def test_lora_matrices_are_below_the_default_threshold():
    # A LoRA r=4 matrix of a 576-wide model (SmolLM2-135M) has 2304 elements: fp32 states.
    opt = emoq.EmoSens8bit([torch.nn.Parameter(torch.zeros(4, 576))])
    opt.param_groups[0]["params"][0].grad = torch.ones(4, 576)
    opt.step(loss=1.0)
    assert all(not is_lowbit(s) for s in opt.state[opt.param_groups[0]["params"][0]].values())


@pytest.mark.parametrize("name,base,precision", [
    ("EmoSens8bit", emoq.EmoSens, "8bit"), ("EmoAiry8bit", emoq.EmoAiry, "8bit"),
    ("EmoCats8bit", emoq.EmoCats, "8bit"), ("EmoTion8bit", emoq.EmoTion, "8bit"),
    ("EmoSens4bit", emoq.EmoSens, "4bit"), ("EmoCats4bit", emoq.EmoCats, "4bit"),
    ("EmoAiry4bit", emoq.EmoAiry, "4bit"), ("EmoTion4bit", emoq.EmoTion, "4bit"),
    ("EmoSensFp8", emoq.EmoSens, "fp8"), ("EmoCatsFp8", emoq.EmoCats, "fp8"),
    ("EmoAiryFp8", emoq.EmoAiry, "fp8"), ("EmoTionFp8", emoq.EmoTion, "fp8"),
    ("EmoSensBf16", emoq.EmoSens, "bf16"), ("EmoCatsBf16", emoq.EmoCats, "bf16"),
    ("EmoAiryBf16", emoq.EmoAiry, "bf16"), ("EmoTionBf16", emoq.EmoTion, "bf16"),
])
def test_aliases(name, base, precision):
    cls = getattr(emoq, name)
    assert cls is getattr(emoq.optim, name) and cls.__name__ == name and name in emoq.__all__
    p = torch.nn.Parameter(torch.zeros(8))
    opt = cls([p], weight_decay=0.0)
    assert isinstance(opt, base) and opt.state_precision == precision
    assert cls([p], state_precision=precision).state_precision == precision
    with pytest.raises(ValueError, match="state_precision"):
        cls([p], state_precision="fp32")


def test_invalid_new_arguments():
    p = torch.nn.Parameter(torch.zeros(8))
    with pytest.raises(ValueError, match="compensation"):
        emoq.EmoSens([p], compensation="kahan-ish")
    with pytest.raises(ValueError, match="min_lowbit_size"):
        emoq.EmoSens([p], state_precision="8bit", min_lowbit_size=-5)
    with pytest.raises(ValueError, match="fused"):
        emoq.EmoSens([p], fused="yes")


@pytest.mark.parametrize("cls,precision,limit", [
    (emoq.EmoSens, "8bit", 2.05), (emoq.EmoCats, "8bit", 1.03), (emoq.EmoSens, "4bit", 1.07),
    (emoq.EmoSens, "fp8", 2.05), (emoq.EmoSens, "bf16", 4.01), (emoq.EmoAiry, "8bit", 0.01),
    (emoq.EmoTion, "8bit", 0.01)])
def test_state_bytes_per_param(cls, precision, limit):
    # The memory targets, on a 1024x1024 weight (bench/memory.py measures 4096x4096).
    p = torch.nn.Parameter(torch.zeros(1024, 1024))
    opt = cls([p], state_precision=precision)
    p.grad = torch.randn(1024, 1024)
    opt.step(loss=1.0)
    total = sum(state_bytes(s) for s in opt.state[p].values())
    assert total / p.numel() <= limit


@pytest.mark.parametrize("cls", [emoq.EmoSens8bit, emoq.EmoCats4bit, emoq.EmoTionFp8])
def test_resume_with_shadow_and_lowbit_states(cls, batch):
    net = make_net()
    opt = cls(net.parameters(), use_shadow=True, min_lowbit_size=0)
    train(net, opt, batch, 6)
    want = params_of(net)
    net = make_net()
    opt = cls(net.parameters(), use_shadow=True, min_lowbit_size=0)
    train(net, opt, batch, 3)
    ckpt, _ = save_load({"model": net.state_dict(), "optim": opt.state_dict()})
    net2 = make_net(seed=7)
    net2.load_state_dict(ckpt["model"])
    opt2 = cls(net2.parameters(), use_shadow=True, min_lowbit_size=0)
    opt2.load_state_dict(ckpt["optim"])
    train(net2, opt2, batch, 3, start=3)
    assert all(torch.equal(a, b) for a, b in zip(params_of(net2), want))
