"""Precision aliases: ``EmoSens8bit(params, ...)`` is ``EmoSens(params, ..., state_precision="8bit")``.

Each alias is a thin subclass that only changes the default of ``state_precision`` (passing
another ``state_precision`` to an alias raises, to avoid a misleading class name).
"""

from __future__ import annotations

from typing import Any

from emoq.optim.airy import EmoAiry
from emoq.optim.base import EmoOptimizer
from emoq.optim.cats import EmoCats
from emoq.optim.sens import EmoSens
from emoq.optim.tion import EmoTion


def _alias(base: type[EmoOptimizer], precision: str, suffix: str) -> type[EmoOptimizer]:
    def __init__(self: EmoOptimizer, params: Any, *args: Any, **kwargs: Any) -> None:
        given = kwargs.pop("state_precision", precision)
        if given != precision:
            raise ValueError(f"{base.__name__}{suffix} keeps {precision} states; use {base.__name__}("
                             f"..., state_precision={given!r}) instead")
        base.__init__(self, params, *args, state_precision=precision, **kwargs)

    name = f"{base.__name__}{suffix}"
    doc = f"{base.__name__} with ``state_precision={precision!r}`` (see :class:`{base.__name__}`)."
    cls = type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})
    return cls


EmoSensBf16 = _alias(EmoSens, "bf16", "Bf16")
EmoAiryBf16 = _alias(EmoAiry, "bf16", "Bf16")
EmoCatsBf16 = _alias(EmoCats, "bf16", "Bf16")
EmoTionBf16 = _alias(EmoTion, "bf16", "Bf16")
EmoSens8bit = _alias(EmoSens, "8bit", "8bit")
EmoAiry8bit = _alias(EmoAiry, "8bit", "8bit")
EmoCats8bit = _alias(EmoCats, "8bit", "8bit")
EmoTion8bit = _alias(EmoTion, "8bit", "8bit")
EmoSens4bit = _alias(EmoSens, "4bit", "4bit")
EmoAiry4bit = _alias(EmoAiry, "4bit", "4bit")
EmoCats4bit = _alias(EmoCats, "4bit", "4bit")
EmoTion4bit = _alias(EmoTion, "4bit", "4bit")
EmoSensFp8 = _alias(EmoSens, "fp8", "Fp8")
EmoAiryFp8 = _alias(EmoAiry, "fp8", "Fp8")
EmoCatsFp8 = _alias(EmoCats, "fp8", "Fp8")
EmoTionFp8 = _alias(EmoTion, "fp8", "Fp8")

ALIASES = {cls.__name__: cls for cls in (
    EmoSensBf16, EmoAiryBf16, EmoCatsBf16, EmoTionBf16, EmoSens8bit, EmoAiry8bit, EmoCats8bit, EmoTion8bit,
    EmoSens4bit, EmoAiry4bit, EmoCats4bit, EmoTion4bit, EmoSensFp8, EmoAiryFp8, EmoCatsFp8, EmoTionFp8)}

__all__ = sorted(ALIASES)
