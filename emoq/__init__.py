"""emoq: the Emo optimizer family (emoPulse step size) with low-precision states."""

from emoq.optim import (
    EmoAiry,
    EmoAiry4bit,
    EmoAiry8bit,
    EmoAiryBf16,
    EmoAiryFp8,
    EmoCats,
    EmoCats4bit,
    EmoCats8bit,
    EmoCatsBf16,
    EmoCatsFp8,
    EmoOptimizer,
    EmoSens,
    EmoSens4bit,
    EmoSens8bit,
    EmoSensBf16,
    EmoSensFp8,
    EmoTion,
    EmoTion4bit,
    EmoTion8bit,
    EmoTionBf16,
    EmoTionFp8,
)
from emoq.pulse import EmoPulse
from emoq.scheduler import EmoPulseScheduler

__version__ = "0.1.0"

__all__ = [
    "EmoAiry",
    "EmoCats",
    "EmoOptimizer",
    "EmoPulse",
    "EmoPulseScheduler",
    "EmoSens",
    "EmoTion",
    "EmoAiry4bit",
    "EmoAiry8bit",
    "EmoAiryBf16",
    "EmoAiryFp8",
    "EmoCats4bit",
    "EmoCats8bit",
    "EmoCatsBf16",
    "EmoCatsFp8",
    "EmoSens4bit",
    "EmoSens8bit",
    "EmoSensBf16",
    "EmoSensFp8",
    "EmoTion4bit",
    "EmoTion8bit",
    "EmoTionBf16",
    "EmoTionFp8",
    "__version__",
]
