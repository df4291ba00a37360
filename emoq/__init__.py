"""emoq: the Emo optimizer family (emoPulse step size) with low-precision states."""

from emoq.optim import EmoAiry, EmoCats, EmoOptimizer, EmoSens, EmoTion
from emoq.pulse import EmoPulse
from emoq.scheduler import EmoPulseScheduler

__version__ = "0.1.0"

__all__ = ["EmoAiry", "EmoCats", "EmoOptimizer", "EmoPulse", "EmoPulseScheduler", "EmoSens", "EmoTion",
           "__version__"]
