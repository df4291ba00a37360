"""bench.common's measurements."""

import pytest
import torch

import emoq
from bench import common

pytestmark = pytest.mark.compiled  # small same-shape parameters are stacked on the compiled path


def test_state_bytes_counts_stacked_states_whole():
    # Small same-shape parameters share one stacked state buffer (each state a view of it): the
    # buffer counts once and whole. It counted only the first member's view before, so the QLoRA
    # e2e table showed 0.3 MB of EmoSens states for millions of LoRA values.
    params = [torch.nn.Parameter(torch.randn(8, 64)) for _ in range(5)]
    n = sum(p.numel() for p in params)
    common.set_grads(params)
    opt = emoq.EmoSens(params)  # fp32 m and v
    opt.step(loss=1.0)
    assert all(v._base is not None for st in opt.state.values() for v in st.values())  # stacked views
    assert common.state_bytes(opt) == 2 * 4 * n
    adamw = torch.optim.AdamW(params, lr=1e-3)
    adamw.step()
    assert common.state_bytes(adamw) == 2 * 4 * n + 4 * len(params)  # exp_avg, exp_avg_sq, step
