"""Where the pulse state lives in a state dict, and torch's distributed state-dict API in one process.

torch.distributed.checkpoint.state_dict (what accelerate and the HF Trainer use under FSDP2)
keeps only ``state`` and ``param_groups`` and initialises an optimizer with a fake step; the
multi-process side is in tests/test_core_distributed.py.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import emoq
from emoq.distributed import export_unit, shard_rows
from emoq.states import FP8, LOWBIT

FAMILIES = [emoq.EmoSens, emoq.EmoAiry, emoq.EmoCats, emoq.EmoTion]


@pytest.fixture(autouse=True)
def no_compile(monkeypatch):
    monkeypatch.setenv("EMOQ_COMPILE", "0")


def make(cls, precision="fp32", seed=0, **kw):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    return net, cls(net.parameters(), state_precision=precision, **kw)


def run(net, opt, steps, start=0):
    g = torch.Generator().manual_seed(start)
    for _ in range(steps):
        x, y = torch.randn(16, 64, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step(loss=loss)
    return [p.detach().clone() for p in net.parameters()], opt.pulse


def test_pulse_state_rides_in_every_param_group():
    net, _ = make(emoq.EmoSens)
    opt = emoq.EmoSens([{"params": net[0].parameters()}, {"params": net[2].parameters(), "weight_decay": 0.0}])
    run(net, opt, 3)
    opt.record_loss(0.5)
    sd = opt.state_dict()
    assert "emo" not in sd  # a top-level entry would be dropped by get_optimizer_state_dict
    records = [g["emo"] for g in sd["param_groups"]]
    assert records[0] == records[1] and records[0]["pulse"] == opt.emo_pulse.state_dict()
    assert records[0]["recorded_count"] == 1 and float(records[0]["recorded_sum"]) == 0.5
    assert records[0]["skipped_steps"] == 0
    assert records[0] is not records[1]  # independent copies
    before = copy.deepcopy(sd)
    net2, _ = make(emoq.EmoSens, seed=1)
    opt2 = emoq.EmoSens([{"params": net2[0].parameters()}, {"params": net2[2].parameters(), "weight_decay": 0.0}])
    opt2.load_state_dict(sd)
    assert str(sd) == str(before)  # the caller's dict is not modified
    assert opt2.pulse == opt.pulse and all(g["emo"] is None for g in opt2.param_groups)


def _as_emoq_01(sd):
    """The format of emoq 0.1: the pulse in a top-level "emo" entry, low-bit states with Python
    precision/shape/sign and fp8 codes as float8."""
    sd = copy.deepcopy(sd)
    record = sd["param_groups"][0]["emo"]
    for g in sd["param_groups"]:
        del g["emo"]
    sd["emo"] = dict(record, format=1)
    for st_ in sd["state"].values():
        for name, v in st_.items():
            if isinstance(v, dict):
                prec = LOWBIT[int(v["precision"])]
                codes = v["codes"].view(FP8) if prec == "fp8" else v["codes"]
                st_[name] = {"precision": prec, "signed": bool(v["signed"]), "shape": v["shape"].tolist(),
                             "codes": codes, "scale": v["scale"]}
    return sd


@pytest.mark.parametrize("precision", ["fp32", "8bit", "4bit", "fp8"])
def test_emoq_01_checkpoints_still_load(precision):
    net, opt = make(emoq.EmoSens, precision)
    run(net, opt, 3)
    old = _as_emoq_01(opt.state_dict())
    model_sd = copy.deepcopy(net.state_dict())
    want = run(net, opt, 3, start=7)
    net2, opt2 = make(emoq.EmoSens, precision, seed=1)
    net2.load_state_dict(model_sd)
    opt2.load_state_dict(old)
    got = run(net2, opt2, 3, start=7)
    assert got[1] == want[1] and all(torch.equal(a, b) for a, b in zip(got[0], want[0]))


@pytest.mark.parametrize("cls", FAMILIES)
@pytest.mark.parametrize("precision", ["fp32", "8bit", "fp8"])
@pytest.mark.parametrize("options", ["default", "full", "flatten"])
def test_torch_state_dict_api_resumes_exactly(cls, precision, options):
    opts = {"default": None, "full": StateDictOptions(full_state_dict=True, cpu_offload=True),
            "flatten": StateDictOptions(flatten_optimizer_state_dict=True)}[options]
    net, opt = make(cls, precision)
    run(net, opt, 3)
    osd = copy.deepcopy(get_optimizer_state_dict(net, opt, options=opts))  # like torch.save: states alias
    model_sd = copy.deepcopy(net.state_dict())
    want = run(net, opt, 3, start=7)
    net2, opt2 = make(cls, precision, seed=1)
    net2.load_state_dict(model_sd)
    set_optimizer_state_dict(net2, opt2, osd, options=opts)
    got = run(net2, opt2, 3, start=7)
    assert got[1] == want[1] and all(torch.equal(a, b) for a, b in zip(got[0], want[0]))


@pytest.mark.parametrize("cls", FAMILIES)
def test_state_initialisation_step_is_a_no_op(cls):
    # set/get_optimizer_state_dict call step() with zero grads and lr 0 on an optimizer without
    # state; it must allocate states and nothing else (the weights decay, the shadow and the
    # bf16 compensation would otherwise move; the pulse would count a step that never happened)
    net, opt = make(cls, "8bit", use_shadow=True)
    net[2].to(torch.bfloat16)  # a bf16 layer: compensation state
    opt.record_loss(0.7)  # a micro-batch recorded before the checkpoint
    params = [p.detach().clone() for p in net.parameters()]
    lrs = [g["lr"] for g in opt.param_groups]
    get_optimizer_state_dict(net, opt)
    assert all(opt.state[p] for p in net.parameters())  # shadow at least, for every parameter
    assert all(torch.equal(a, b) for a, b in zip(params, net.parameters()))
    assert opt.pulse is None and opt.emo_pulse.steps == 0 and opt.skipped_steps == 0
    assert [g["lr"] for g in opt.param_groups] == lrs and all(p.grad is None for p in net.parameters())
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # consumes the recorded loss
    assert opt.last_loss == pytest.approx(0.7) and opt.emo_pulse.steps == 1


def test_zero_lr_is_not_a_loss():
    # only the exact initialisation call (no loss, every lr 0, all-zero gradients) is recognised
    net, opt = make(emoq.EmoSens)
    for g in opt.param_groups:
        g["lr"] = 0.0
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="got no loss"):
        opt.step()
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.param_groups[0]["lr"] = 1.0
    with pytest.raises(RuntimeError, match="got no loss"):
        opt.step()


@given(rows=st.integers(1, 600), row=st.integers(1, 1100), world=st.integers(1, 9),
       block=st.sampled_from([128, 256]))
def test_row_aligned_units_split_like_dtensor(rows, row, world, block):
    # A low-bit state split by rows is exported as DTensor codes/scales of shape (units, ...):
    # correct only if splitting the units like Shard(0) gives each rank exactly its own rows'
    # units. emoq quantizes a sharded state only when every shard is non-empty and whole units.
    chunks = shard_rows(rows, world)
    assert sum(chunks) == rows and list(chunks) == [len(c) for c in torch.arange(rows).chunk(world)] + [0] * (
        world - len(torch.arange(rows).chunk(world)))
    unit = export_unit(row, block)
    if unit is None or any(c == 0 or c % unit for c in chunks):
        return  # fp32 states on every rank
    assert (row * unit) % block == 0  # a unit is whole blocks: shard blocks are the unsharded blocks
    assert shard_rows(rows // unit, world) == tuple(c // unit for c in chunks)


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_a_bad_state_dict_changes_nothing():
    net, opt = make(emoq.EmoSens, "8bit")
    run(net, opt, 2)
    good = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(good)
    bad["state"][2]["m"] = torch.zeros(3, 3)  # the wrong shape for net[2].weight (4 x 128)
    with pytest.raises(ValueError, match="has shape"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["emo"]["pulse"].pop("hist")
    with pytest.raises(ValueError, match="missing"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["param_groups"].append(dict(bad["param_groups"][0]))
    with pytest.raises(ValueError, match="param group"):
        opt.load_state_dict(bad)
    assert same(opt.state_dict(), good)
