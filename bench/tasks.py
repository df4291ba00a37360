"""Training tasks of the pulse study (bench/pulse_study.py): small, offline, CPU, seeded.

Each task trains a fresh model for a fixed number of steps with any optimizer and reports the
held-out loss. ``seed`` sets the initialisation and the batch order; the held-out split is
fixed per task, so every optimizer is judged on the same examples.

- ``digits``: the MLP 64-256-256-10 of ``bench.quality`` on sklearn's digits (75/25 split),
  batch 64, 600 steps; held-out cross-entropy.
- ``charlm``: a 2-layer causal transformer (d=64, 4 heads, context 64, 0.12 M parameters)
  learning characters of Python's reference documentation (``pydoc_data.topics``, 465 k
  characters; the last 10 % held out), batch 32, 300 steps; held-out cross-entropy per
  character on 128 fixed windows.

The QLoRA task (the default recipe) runs through the recipe machinery: bench/qlora_study.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class RunResult:
    test_loss: float
    train_loss: float  # mean of the last 20 minibatch losses
    curve: list[float]  # minibatch loss per step
    etas: list[float]  # step size per step (the pulse, or the peer's effective lr)
    diverged: bool
    skipped_steps: int


def effective_lr(opt: Any) -> float:
    """The step size an optimizer used: emoPulse's eta, Prodigy's d*lr, otherwise group lr."""
    import emoq

    if isinstance(opt, emoq.EmoOptimizer):
        return float(opt.pulse)
    group = opt.param_groups[0]
    if "d" in group and "d0" in group:  # Prodigy
        return float(group["d"] * group["lr"])
    return float(group.get("scheduled_lr", group["lr"]))


def optimizer_step(opt: Any, loss: torch.Tensor, recheck: Callable[[], Any] | None = None) -> None:
    """``opt``'s step; an Emo optimizer gets the loss, and ``recheck`` when built with one
    (``bench_recheck``: the ``adaptive+recheck`` specs)."""
    import emoq

    if isinstance(opt, emoq.EmoOptimizer):
        opt.step(loss=loss, recheck=recheck if getattr(opt, "bench_recheck", False) else None)
    else:
        opt.step()


class Task:
    name: str
    steps: int

    def model(self, seed: int) -> torch.nn.Module:
        raise NotImplementedError

    def batch(self, step: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module) -> float:
        raise NotImplementedError

    def run(self, make_opt: Callable[[list], Any], seed: int, steps: int | None = None) -> RunResult:
        steps = steps or self.steps
        model = self.model(seed)
        opt = make_opt(list(model.parameters()))
        if hasattr(opt, "train") and callable(opt.train):
            opt.train()  # schedule-free
        gen = torch.Generator().manual_seed(1000 + seed)
        curve, etas = [], []
        first = None
        for step in range(steps):
            x, y = self.batch(step, gen)
            opt.zero_grad(set_to_none=True)
            loss = self.loss(model, x, y)
            loss.backward()
            optimizer_step(opt, loss, lambda x=x, y=y: self.loss(model, x, y))
            value = loss.item()
            first = value if first is None else first
            curve.append(value)
            etas.append(effective_lr(opt) if getattr(opt, "pulse", 0.0) is not None else math.nan)
        if hasattr(opt, "eval") and callable(opt.eval):
            opt.eval()
        with torch.no_grad():
            test = self.evaluate(model)
        tail = curve[-20:]
        train = sum(tail) / len(tail)
        diverged = not math.isfinite(test) or not math.isfinite(train) or train > first
        return RunResult(test, train, curve, etas, diverged, int(getattr(opt, "skipped_steps", 0)))


class Digits(Task):
    name = "digits"
    steps = 600

    def __init__(self) -> None:
        from bench.quality import digits_split

        self.xtr, self.ytr, self.xte, self.yte = digits_split()

    def model(self, seed: int) -> torch.nn.Module:
        from bench.quality import mlp

        return mlp(seed)

    def batch(self, step: int, gen: torch.Generator):
        idx = torch.randint(0, len(self.xtr), (64,), generator=gen)
        return self.xtr[idx], self.ytr[idx]

    def loss(self, model, x, y):
        return F.cross_entropy(model(x), y)

    def evaluate(self, model) -> float:
        return F.cross_entropy(model(self.xte), self.yte).item()


@lru_cache(maxsize=1)
def pydoc_text() -> tuple[torch.Tensor, int]:
    """Python's reference documentation as character ids (sorted topics), and the vocabulary size."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), len(chars)


class _Block(torch.nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(att)
        return x + self.mlp(self.ln2(x))


class CharTransformer(torch.nn.Module):
    def __init__(self, vocab: int, d: int = 64, layers: int = 2, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(context, d) * 0.02)
        self.blocks = torch.nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


class CharLM(Task):
    name = "charlm"
    steps = 300
    context = 64
    batch_size = 32
    eval_windows = 128

    def __init__(self) -> None:
        data, self.vocab = pydoc_text()
        cut = int(len(data) * 0.9)
        self.train_ids, self.test_ids = data[:cut], data[cut:]
        starts = torch.linspace(0, len(self.test_ids) - self.context - 2, self.eval_windows).long()
        self.eval_x = torch.stack([self.test_ids[s:s + self.context] for s in starts])
        self.eval_y = torch.stack([self.test_ids[s + 1:s + self.context + 1] for s in starts])

    def model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return CharTransformer(self.vocab, context=self.context)

    def batch(self, step: int, gen: torch.Generator):
        starts = torch.randint(0, len(self.train_ids) - self.context - 1, (self.batch_size,), generator=gen)
        offsets = torch.arange(self.context)
        x = self.train_ids[starts[:, None] + offsets]
        y = self.train_ids[starts[:, None] + offsets + 1]
        return x, y

    def loss(self, model, x, y):
        return F.cross_entropy(model(x).reshape(-1, self.vocab), y.reshape(-1))

    def evaluate(self, model) -> float:
        return self.loss(model, self.eval_x, self.eval_y).item()


TASKS: dict[str, Callable[[], Task]] = {"digits": Digits, "charlm": CharLM}
