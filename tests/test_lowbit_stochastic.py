"""Stochastic rounding of signed 4-bit states (emoq.states.round_stochastic, the dither of
emoq.kernels.store_state): unbiased, one of the two neighbouring codes, deterministic, new each
step, no random generator touched, the same for a parameter alone, stacked or sharded."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import emoq
from emoq.kernels import StateLayout, element_index, store_state
from emoq.states import (
    StateStorage,
    dequantize_parts,
    dither,
    dither_seed,
    mix32,
    parts,
    qmap,
    quantize_parts_,
    rounds_stochastically,
)
from tests.conftest import make_net, train

MAP = qmap("4bit", True)
Q = torch.tensor(MAP)
BLOCK = 128
STORAGE = StateStorage("4bit", min_lowbit_size=0)  # one: each builds its encoding table on first use


def store_sr(x: torch.Tensor, step: int, which: int = 0,
             layout: StateLayout | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stochastically rounded store of ``x`` (flat, blocks of 128): its value, codes and scales."""
    storage = STORAGE
    state = storage.zeros(x.shape, signed=True, device="cpu")
    layout = layout or StateLayout("4bit", True, tuple(x.shape))
    store_state(layout, storage.kernel_args(state), x, step, which)
    c, scale, _ = parts(state)
    return storage.load(state), torch.stack([c >> 4, c & 15], -1).view(-1).long(), scale


def quantize_sr(x: torch.Tensor, step: int, which: int = 0, layout: StateLayout | None = None) -> torch.Tensor:
    return store_sr(x, step, which, layout)[0]


def neighbours(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain reference: the map values just below and just above each ``v`` (the end value
    outside the map)."""
    below = torch.searchsorted(Q, v, right=True) - 1  # last map value <= v
    above = torch.searchsorted(Q, v).clamp(max=len(MAP) - 1)  # first map value >= v
    lo = Q[below.clamp(min=0)]
    return lo, torch.where(below < 0, lo, Q[above])


def up_probability(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Plain reference: each element's chance of the upper neighbour (its distance from the lower one)."""
    scaled = (x.view(-1, BLOCK) / scale[:, None]).view(-1)  # as torchao's scale_tensor
    lo, hi = neighbours(scaled)
    return torch.where(hi > lo, (scaled.double() - lo.double()) / (hi.double() - lo.double()), 0.0)


def test_policy():
    assert rounds_stochastically("4bit", True)
    assert not any(rounds_stochastically(p, s) for p in ("fp32", "bf16", "8bit", "fp8") for s in (True, False))
    assert not rounds_stochastically("4bit", False)  # second moments: nearest (measured, docs/precision.md)


@settings(max_examples=40, deadline=None)
@given(v=st.floats(MAP[0], 1.0, allow_subnormal=False), step=st.integers(1, (1 << 24) - 1),
       which=st.integers(0, 3))
def test_unbiased_on_average(v, step, which):
    # 64 blocks, each with its maximum 1.0 (scale 1, so the scaled value is v itself) and 127
    # copies of v: 8128 independent-looking draws of the same rounding. Each reads lo or hi, so
    # the mean's standard deviation is (hi - lo) * sqrt(p (1 - p) / n) <= (hi - lo) / (2 sqrt(n));
    # a 5-sigma bound (two-sided tail 6e-7 per example) plus float rounding of v itself.
    x = torch.full((64, BLOCK), float(v))
    x[:, 0] = 1.0
    y = quantize_sr(x.view(-1), step, which).view(64, BLOCK)[:, 1:]
    v32 = torch.tensor([v], dtype=torch.float32)
    lo, hi = (float(t) for t in neighbours(v32))
    n = y.numel()
    assert bool(((y == lo) | (y == hi)).all())
    mean = y.double().mean().item()
    bound = 5 * (hi - lo) / (2 * math.sqrt(n)) + 1e-6
    assert abs(mean - float(v32)) <= bound, (v, lo, hi, mean)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), step=st.integers(1, 1000), log_range=st.floats(-12, 3))
def test_always_one_of_the_two_neighbouring_codes(seed, step, log_range):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16 * BLOCK, generator=g) * torch.logspace(log_range - 8, log_range, 16 * BLOCK)[
        torch.randperm(16 * BLOCK, generator=g)]
    _, codes, scale = store_sr(x, step)
    scaled = (x.view(-1, BLOCK) / scale[:, None]).view(-1)  # as torchao's scale_tensor
    lo, hi = neighbours(scaled)
    got = Q[codes]
    assert bool(((got == lo) | (got == hi)).all())


def test_deterministic_and_new_each_step_and_state():
    x = torch.randn(32 * BLOCK, generator=torch.Generator().manual_seed(0))
    a, codes, scale = store_sr(x, 7)
    assert torch.equal(store_sr(x, 7)[1], codes)
    # with independent draws an element's code differs between two stores with probability
    # 2 p (1 - p): the count of differences is within 5 sigma of its expectation
    p = up_probability(x, scale)
    q = 2 * p * (1 - p)
    mean, sd = float(q.sum()), math.sqrt(float((q * (1 - q)).sum()))
    for other in (store_sr(x, 8)[1], store_sr(x, 7, which=1)[1]):
        differ = int((other != codes).sum())
        assert abs(differ - mean) <= 5 * sd, (differ, mean, sd)


def test_dither_is_uniform_and_reads_no_generator():
    state = torch.random.get_rng_state()
    u = dither(torch.arange(1 << 16), dither_seed(3, 0))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    counts = torch.histc(u, bins=16, min=0.0, max=1.0)
    n, p = u.numel(), 1 / 16  # binomial counts: 5 sigma each
    assert bool(((counts - n * p).abs() <= 5 * math.sqrt(n * p * (1 - p))).all()), counts
    # the hash is a bijection of 32-bit words: no two elements of a step share a word
    h = mix32(torch.arange(1 << 20, dtype=torch.int64))
    assert h.unique().numel() == 1 << 20 and int(h.max()) < 1 << 32


def test_element_index_numbers_elements_within_their_own_parameter():
    whole = element_index(StateLayout("4bit", True, (6, 4)), torch.device("cpu"))
    assert torch.equal(whole, torch.arange(24))
    stacked = element_index(StateLayout("4bit", True, (3, 2, 4), members=3), torch.device("cpu"))
    assert torch.equal(stacked, torch.arange(8).repeat(3))
    shard = element_index(StateLayout("4bit", True, (2, 4), offset=16), torch.device("cpu"))  # rows 4-5 of 6
    assert torch.equal(shard, whole[16:])
    x = torch.randn(6 * BLOCK, generator=torch.Generator().manual_seed(2))
    full = quantize_sr(x, 5)  # a row shard quantizes its rows as the whole tensor does
    part = quantize_sr(x[2 * BLOCK:], 5, layout=StateLayout("4bit", True, (4 * BLOCK,), offset=2 * BLOCK))
    assert torch.equal(part, full[2 * BLOCK:])


def test_quantize_parts_without_dither_is_nearest():
    x = torch.randn(4 * BLOCK, generator=torch.Generator().manual_seed(1))
    storage = STORAGE
    state = storage.zeros(x.shape, signed=True, device="cpu")
    c, s, q = parts(state)
    quantize_parts_("4bit", True, c, s, q, x)
    y = dequantize_parts("4bit", True, c, s, q, x.numel())
    nearest = Q[(x.view(-1, BLOCK) / s[:, None]).view(-1, 1).sub(Q).abs().argmin(1)] * s.repeat_interleave(BLOCK)
    assert torch.equal(y, nearest)


def test_steps_do_not_touch_the_global_generator_and_repeat_exactly(batch):
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        net = make_net()
        opt = emoq.EmoCats(net.parameters(), state_precision="4bit", min_lowbit_size=0)
        state = torch.random.get_rng_state()
        train(net, opt, batch, 3)
        assert torch.equal(torch.random.get_rng_state(), state)
        runs.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("step", [1, (1 << 24) + 1])
def test_step_count_reaches_the_dither(step):
    # The optimizer's step count (modulo 2**24, exact in the fp32 step scalars) seeds the dither:
    # the stored m after a step equals a direct store with that step's seed.
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4 * BLOCK))
    opt = emoq.EmoCats([p], state_precision="4bit", min_lowbit_size=0, fused=False, betas=(0.9, 0.0),
                       weight_decay=0.0)
    opt._pulse.steps = step - 1
    p.grad = torch.randn(4 * BLOCK)
    opt.step(loss=1.0)
    want = quantize_sr(p.grad.clone(), step % (1 << 24))  # beta2 = 0: m = g
    assert torch.equal(opt._storage.load(opt.state[p]["m"]), want)
