"""The Emo optimizer family."""

from emoq.optim.airy import EmoAiry
from emoq.optim.base import EmoOptimizer
from emoq.optim.cats import EmoCats
from emoq.optim.sens import EmoSens
from emoq.optim.tion import EmoTion

__all__ = ["EmoAiry", "EmoCats", "EmoOptimizer", "EmoSens", "EmoTion"]
