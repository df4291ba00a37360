"""The tensor statistics the adaptive pulse needs, measured on a fixed strided subset of coordinates.

``pulse="adaptive"`` asks one question per step: does the gradient still point along the way the
weights have travelled since the start (``cos(g, x0 - x)``)? Answering it needs the starting point
``x0``. Storing it whole would cost 4 B/param — more than EmoCats8bit's whole state — so the
probe keeps every ``STRIDE``-th coordinate of each parameter (``state[p]["pulse_x0"]``, fp32,
4/61 = 0.066 B/param) and estimates the three sums of the cosine on that subset; with them, the
gradient's L1 norm (the Polyak bound of Lion-type steps, ``loss / |g|_1``). One pass, one
device sync and, under ``torch.distributed``, one all-reduce of four scalars.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

STRIDE = 61  # prime: a stride that divides a row length would sample a single column
STATE_NAME = "pulse_x0"


def _subset(t: Tensor) -> Tensor:
    return t.detach().reshape(-1)[::STRIDE]


def subset_size(p: Tensor) -> int:
    """How many coordinates of ``p`` the probe keeps: ``ceil(numel / STRIDE)``."""
    return -(-p.numel() // STRIDE)


def check_probe_state(value: Any, p: Tensor) -> str | None:
    """What is wrong with a saved ``pulse_x0`` for parameter ``p`` (``None``: nothing)."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        return "is not a floating-point tensor"
    if tuple(value.shape) != (subset_size(p),):
        return f"has shape {tuple(value.shape)}, the probe keeps ({subset_size(p)},) for this parameter"
    if not bool(torch.isfinite(value).all()):
        return "holds a NaN or inf"
    return None


def distance_probe(params: list[Tensor], state: dict[Tensor, dict[str, Any]]) -> tuple[float, float, float, float]:
    """``(<g, x0 - x>, |g|^2, |x0 - x|^2, |g|_1)``: the first three over the subset of ``params``
    (those with a gradient), the last an estimate of the whole gradient's L1 norm (each
    parameter's subset sum of ``|g|`` times ``numel / subset``).

    A parameter seen for the first time gets ``x0`` = its current value (so it adds 0 to the
    first three sums this step; its gradient counts in ``|g|_1``). Sums in float64 (no overflow
    for any finite fp32 values). Empty input: zeros. Under ``torch.distributed`` the four are
    summed over ranks and ``|g|_1`` divided by the world size: DDP replicas hold the same
    averaged gradient, so the L1 norm is each one's (the cosine of the first three needs no
    division).
    """
    grads, diffs, l1 = [], [], []
    first_seen = []  # (state, x0) recorded only once nothing can raise any more
    for p in params:
        st = state[p]
        g = _subset(p.grad).double() if p.grad is not None else None
        if g is not None:
            l1.append(g.abs().sum() * (p.numel() / max(g.numel(), 1)))
        x = _subset(p).double()
        x0 = st.get(STATE_NAME)
        if x0 is None or x0.shape != x.shape or x0.device != x.device:
            first_seen.append((st, x.float()))
            continue
        if g is None:
            raise ValueError("distance_probe: a parameter without a gradient (pass those with one)")
        grads.append(g)
        diffs.append(x0.double() - x)
    zero = torch.zeros((), dtype=torch.float64, device=params[0].device if params else "cpu")
    if grads:
        g, d = torch.cat(grads), torch.cat(diffs)
        cosine = [torch.dot(g, d), torch.dot(g, g), torch.dot(d, d)]
    else:
        cosine = [zero] * 3
    sums = torch.stack([*cosine, torch.stack(l1).sum() if l1 else zero])
    world = 1
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and sums.device.type != "cuda":
            sums = sums.cuda()
        dist.all_reduce(sums)
        world = dist.get_world_size()
    gx, gg, xx, g1 = sums.tolist()
    for st, x0 in first_seen:
        st[STATE_NAME] = x0
    return gx, gg, xx, g1 / world
