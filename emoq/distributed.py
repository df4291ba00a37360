"""The one collective emoq needs: the mean loss over ranks."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def reduce_loss(loss: float, finite_grads: bool, device: torch.device | None) -> tuple[float, bool]:
    """Mean ``loss`` over ranks and whether every rank's loss and gradients are finite.

    Without an initialised process group (or with one rank) this is local and free. Otherwise
    one ``all_reduce`` of two float64 scalars, so every rank takes the same step size and the
    same skip decision.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return loss, finite_grads and math.isfinite(loss)
    if dist.get_backend() == "nccl":
        if device is None or device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    elif device is None:
        device = torch.device("cpu")
    bad = 0.0 if finite_grads and math.isfinite(loss) else 1.0
    buf = torch.tensor([loss if bad == 0.0 else 0.0, bad], dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    total, bad_ranks = buf.tolist()
    return total / dist.get_world_size(), bad_ranks == 0.0
