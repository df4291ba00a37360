"""emoq: the Emo optimizer family (emoPulse step size) with low-precision states."""

from emoq import optim as _optim
from emoq.optim import *  # noqa: F403  (the optimizers and their precision aliases; the list lives in emoq.optim)
from emoq.pulse import EmoPulse
from emoq.scheduler import EmoPulseScheduler

__version__ = "0.1.0"

__all__ = [*_optim.__all__, "EmoPulse", "EmoPulseScheduler", "__version__"]
