"""The Emo optimizer family."""

from emoq.optim.airy import EmoAiry
from emoq.optim.aliases import (
    EmoAiry4bit,
    EmoAiry8bit,
    EmoAiryBf16,
    EmoAiryFp8,
    EmoCats4bit,
    EmoCats8bit,
    EmoCatsBf16,
    EmoCatsFp8,
    EmoSens4bit,
    EmoSens8bit,
    EmoSensBf16,
    EmoSensFp8,
    EmoTion4bit,
    EmoTion8bit,
    EmoTionBf16,
    EmoTionFp8,
)
from emoq.optim.base import EmoOptimizer
from emoq.optim.cats import EmoCats
from emoq.optim.sens import EmoSens
from emoq.optim.tion import EmoTion

__all__ = [
    "EmoAiry",
    "EmoCats",
    "EmoOptimizer",
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
]
