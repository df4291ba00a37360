"""The rules and states on a CUDA device (skipped where there is none; CI has none).

The same checks as on CPU where they are exact (the reference path op for op, resume, the
stochastic-rounding codes), and the compiled path against its documented bound.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import emoq
from emoq.kernels import StateLayout, store_state
from emoq.states import StateStorage, parts
from tests.conftest import make_net
from tests.test_core_rules import FAMILIES, run_pair

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"


@pytest.fixture(autouse=True)
def deterministic_cudnn(monkeypatch):
    # two nets that must get bit-identical gradients: no atomics in the conv backward
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


def cuda_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 16, 8, 8, generator=g).to(DEV), torch.randint(0, 10, (32,), generator=g).to(DEV)


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_path_is_exact_on_cuda(family):
    worst_p, worst_eta, final_loss = run_pair(family, cuda_batch(), 100, device=DEV, fused=False)
    assert worst_p == 0.0 and worst_eta == 0.0, (worst_p, worst_eta)
    assert final_loss < 2.0


@pytest.mark.compiled
@pytest.mark.parametrize("family", FAMILIES)
def test_default_path_within_its_bound_on_cuda(family):
    # The bound the compiled path promises on CPU (tests/test_core_rules.py, docs/precision.md),
    # for the rule's arithmetic: both pulses get the same loss. On CUDA the compiled forms round
    # otherwise than ATen's CUDA kernels in the last bit (measured on an H200, EmoSens v3.8: 3e-8
    # relative after one step, 6e-8 after 50); fed each net's own loss, v3.8's pulse took a
    # branch at step ~55 on one side only (eta 1.0e-4 vs 1.5e-4) and the runs parted (2 % after
    # 100 steps): the pulse is discontinuous in the loss, not the rule inexact.
    worst_p, worst_eta, final_loss = run_pair(family, cuda_batch(), 100, device=DEV, same_loss=True)
    assert worst_p < 1e-4 and worst_eta < 1e-6, (worst_p, worst_eta)
    assert final_loss < 2.0


def train(opt, net, steps, x, y):
    for _ in range(steps):
        net.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step(loss=loss)
    return loss.item()


@pytest.mark.compiled
@pytest.mark.parametrize("precision", ["bf16", "8bit", "4bit", "fp8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lowbit_states_train_and_resume_exactly_on_cuda(family, precision):
    # states live on the GPU; 10 steps, a state_dict round trip (deep copy), 5 more: the resumed
    # run equals the uninterrupted one bit for bit; the loss falls.
    x, y = cuda_batch()
    net = make_net().to(DEV)
    opt = FAMILIES[family](net.parameters(), state_precision=precision, min_lowbit_size=0)
    start = F.cross_entropy(net(x), y).item()
    train(opt, net, 10, x, y)
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                assert v.device.type == "cuda"
    net2 = copy.deepcopy(net)
    opt2 = FAMILIES[family](net2.parameters(), state_precision=precision, min_lowbit_size=0)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    end = train(opt, net, 5, x, y)
    train(opt2, net2, 5, x, y)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))
    assert end < start


def test_stochastic_rounding_codes_equal_cpu():
    # the dither is integer arithmetic on the element index and step: the same codes on both devices
    x = torch.randn(64 * 128, generator=torch.Generator().manual_seed(0)) * torch.logspace(-6, 0, 64 * 128)
    codes = []
    for device in ("cpu", DEV):
        storage = StateStorage("4bit", min_lowbit_size=0)
        state = storage.zeros(x.shape, signed=True, device=device)
        store_state(StateLayout("4bit", True, tuple(x.shape)), storage.kernel_args(state), x.to(device), 7, 0)
        codes.append(parts(state)[0].cpu())
    assert torch.equal(codes[0], codes[1])


def test_cpu_checkpoint_loads_on_cuda_and_continues_like_cpu():
    # a state_dict written on CPU (8-bit states) resumes on the GPU; the eager path on both
    # devices: the next step moves the weights by the same amount up to fp32 rounding.
    x, y = cuda_batch()
    nets = [make_net(), make_net()]
    opt = emoq.EmoSens(nets[0].parameters(), state_precision="8bit", min_lowbit_size=0, fused=False)
    train(opt, nets[0], 5, x.cpu(), y.cpu())
    gpu_net = copy.deepcopy(nets[0]).to(DEV)
    gpu_opt = emoq.EmoSens(gpu_net.parameters(), state_precision="8bit", min_lowbit_size=0, fused=False)
    gpu_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    before = [p.detach().clone() for p in nets[0].parameters()]
    train(opt, nets[0], 1, x.cpu(), y.cpu())
    train(gpu_opt, gpu_net, 1, x, y)
    for b, p, q in zip(before, nets[0].parameters(), gpu_net.parameters()):
        step_cpu, step_gpu = p.detach() - b, q.detach().cpu() - b
        assert ((step_cpu - step_gpu).norm() <= 1e-3 * step_cpu.norm() + 1e-7).item()
