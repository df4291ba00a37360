import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings

torch.set_num_threads(min(2, os.cpu_count() or 1))

# The README's test command (CI) draws the same examples on every run and writes no example database
# into the checkout; HYPOTHESIS_PROFILE=explore draws fresh examples (and keeps hypothesis' database).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class ConvMLP(torch.nn.Module):
    """Small net with every branch of the rules: a factored 4-D conv weight, a factored and an
    unfactored linear weight, and 1-D biases."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 32, 3, padding=1)  # (32,16,3,3): factored
        self.fc1 = torch.nn.Linear(512, 64)  # (64,512): factored
        self.fc2 = torch.nn.Linear(64, 10)  # (10,64): not factored

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.nn.functional.avg_pool2d(x, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(autouse=True)
def compile_only_where_marked(request, monkeypatch):
    """Tests run emoq's eager reference path (EMOQ_COMPILE=0: the same rule functions, no compile
    time) unless marked ``compiled``; tests/test_core_rules.py and tests/test_kernels.py run the
    default compiled path and compare it with the reference."""
    if request.node.get_closest_marker("compiled") is None:
        monkeypatch.setenv("EMOQ_COMPILE", "0")


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, 8, 8, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    return x, y


def make_net(seed=0):
    torch.manual_seed(seed)
    return ConvMLP()


def train(net, opt, batch, steps, start=0):
    """``steps`` updates on rotating 8-example slices of ``batch``; returns the losses."""
    x, y = batch
    losses = []
    for i in range(start, start + steps):
        xi, yi = x[(i % 4) * 8:(i % 4) * 8 + 8], y[(i % 4) * 8:(i % 4) * 8 + 8]
        net.zero_grad()
        loss = F.cross_entropy(net(xi), yi)
        loss.backward()
        opt.step(loss=loss)
        losses.append(loss.item())
    return losses


def _as_bytes(t):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def same_tree(a, b):
    """Deep equality of nested dicts/lists/tensors/scalars, bit for bit (NaN equals NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and type(a) is type(b)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(_as_bytes(a), _as_bytes(b)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return type(a) is type(b) and a == b


def emo_record(sd):
    """The pulse record of an emoq state dict (every param group carries the same copy)."""
    return sd["param_groups"][0]["emo"]


def share_record(sd):
    """Make every param group carry group 0's record (after editing it), or none if it was removed."""
    for group in sd["param_groups"][1:]:
        if "emo" in sd["param_groups"][0]:
            group["emo"] = sd["param_groups"][0]["emo"]
        else:
            group.pop("emo", None)
    return sd


def snapshot(opt):
    """Everything an optimizer step or load may change: its state dict, its parameters and their grads."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {"sd": copy.deepcopy(opt.state_dict()), "params": [p.detach().clone() for p in params],
            "counters": (opt.skipped_steps, opt.pulse, opt.last_loss, len(opt.param_groups))}


def resume_from_bytes(net, opt, make, seed):
    """Save ``net`` and ``opt`` through ``torch.save`` / ``torch.load(weights_only=True)`` and load
    them into a fresh net (built with ``seed``) and ``make(params)``: ``(net2, opt2)``."""
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    net2 = make_net(seed=seed)
    net2.load_state_dict(ckpt["model"])
    opt2 = make(net2.parameters())
    opt2.load_state_dict(ckpt["optim"])
    return net2, opt2
