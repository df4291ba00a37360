"""Storage policy for optimizer states: one place decides how a state tensor is kept.

The update rules (``emoq/optim/*.py``) only ever see plain fp32 working tensors. This module
turns a stored state into such a working tensor (``load``), writes the result back
(``store``), and converts states to and from plain tensors for checkpoints
(``export`` / ``import_``).
"""

from __future__ import annotations

import torch
from torch import Tensor

PRECISIONS = ("fp32", "bf16", "8bit", "4bit", "fp8")
IMPLEMENTED = ("fp32", "bf16")


class StateStorage:
    """How optimizer states are kept for one optimizer.

    Args:
        precision: ``"fp32"`` (states are the working tensors themselves, updated in place)
            or ``"bf16"`` (kept in bfloat16, updated in fp32 and rounded back to nearest).
    """

    def __init__(self, precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"state_precision must be one of {PRECISIONS}, got {precision!r}")
        if precision not in IMPLEMENTED:
            raise NotImplementedError(
                f"state_precision={precision!r} is not available in this release; "
                f"available: {IMPLEMENTED}"
            )
        self.precision = precision
        self.dtype = torch.float32 if precision == "fp32" else torch.bfloat16

    def zeros(self, shape: torch.Size | tuple[int, ...], *, signed: bool, device: torch.device) -> Tensor:
        """A new zero state. ``signed=False`` marks a state that is never negative."""
        del signed  # only the low-bit maps care
        return torch.zeros(shape, dtype=self.dtype, device=device)

    def load(self, state: Tensor) -> Tensor:
        """The fp32 working tensor for ``state`` (the state itself when it is fp32)."""
        return state if state.dtype == torch.float32 else state.float()

    def store(self, state: Tensor, work: Tensor) -> None:
        """Write the updated working tensor back into ``state``."""
        if work is not state:
            state.copy_(work)

    def export(self, state: Tensor) -> Tensor:
        """A plain tensor for ``state_dict()`` (loadable with ``torch.load(weights_only=True)``)."""
        return state

    def import_(self, value: Tensor, *, signed: bool, device: torch.device) -> Tensor:
        """A stored state built from a checkpoint tensor of any supported precision."""
        del signed
        return value.detach().to(device=device, dtype=self.dtype, copy=True)
