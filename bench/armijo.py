"""Research (stop 21): a same-minibatch Armijo signal for the Adam-type pulse.

Its ``veto:c=0.65`` mode is in the library since stop 22 as ``step(..., recheck=fn)`` with
``pulse="adaptive"`` (emoq/pulse.py ``EmoPulseAdaptive``; the library clamps each ratio to [-1, 1],
this harness does not: without the clamp the library reproduces this harness bit for bit, digits
seeds 100-102). The study runs the library's through ``bench.pulse_study`` / ``bench.qlora_study``
specs ``"EmoSens fp32 adaptive+recheck scope=1"``; this module stays for the other modes.

After a step on minibatch ``B`` the loss of the *same* minibatch is evaluated once more (one
forward, no backward) and compared with what the gradient predicted::

    ratio = (f_B(x_t) - f_B(x_{t+1})) / <g_t, x_t - x_{t+1}>

(1 for a step along which the loss is linear, 1/2 at the minimum of a quadratic along the step,
negative past twice that). Unlike the loss history the pulse reads, the ratio has no minibatch
noise in it. Two uses were measured (bench/README.md, "Stop 21"):

- ``armijo:c=C,up=U,down=D,beta=B,eta0=E`` — the ratio alone drives the step size: ``log eta``
  grows by ``U`` while an EMA_B of the ratio is at least ``C``, else shrinks by ``D``;
- ``veto:c=C`` — the library's ``pulse="adaptive"`` unchanged, except that a step whose ratio EMA
  (0.9) is under ``C`` may not grow the step size (the cosine rule's growth is vetoed; its
  shrinking stays);
- ``library`` — the library's ``pulse="adaptive"`` through the same loop (a check of the harness).

``python -m bench.armijo --task charlm --seeds 100 101 --modes "veto:c=0.65" "armijo:c=0.65"``
prints one JSON line per run and writes them with ``--out``. The QLoRA recipe runs through
``python -m bench.qlora_study --specs "EmoSens fp32 veto:c=0.65 scope=1"`` (:func:`optimizer_class`,
:class:`ReevalTrainer`). EmoSens only (the Adam kind); fp32 and 8-bit states.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

import emoq
from emoq.pulse import EmoPulse, EmoPulseAdaptive

KEYS = {"armijo": {"c", "up", "down", "beta", "eta0"}, "veto": {"c", "beta"}, "library": set()}


def parse(mode: str) -> tuple[str, dict[str, float]]:
    """``"kind:key=value,..."`` as ``(kind, {key: value})``; ``ValueError`` names what is wrong."""
    kind, _, arg = mode.partition(":")
    if kind not in KEYS:
        raise ValueError(f"unknown mode {mode!r}: one of {sorted(KEYS)}, e.g. 'veto:c=0.65'")
    kw = {}
    for pair in filter(None, arg.split(",")):
        key, eq, value = pair.partition("=")
        if not eq or key not in KEYS[kind]:
            raise ValueError(f"mode {mode!r}: {pair!r} is not key=value with a key in {sorted(KEYS[kind])}")
        try:
            kw[key] = float(value)
        except ValueError:
            raise ValueError(f"mode {mode!r}: {key}={value!r} is not a number") from None
        if not math.isfinite(kw[key]):
            raise ValueError(f"mode {mode!r}: {key} must be finite")
    return kind, kw


class Driven(EmoPulse, register=False):
    """``armijo`` mode: the v3.8 core kept (it is cheap and harmless), eta set by :class:`Armijo`."""

    value = 1e-3

    def update(self, loss: float, probe: Any = None) -> float:
        self._observe(float(loss), probe)
        self.eta = self.value
        self.steps += 1
        return self.value


class Veto(EmoPulseAdaptive, register=False):
    """``veto`` mode: the library's adaptive pulse; a ratio EMA under ``C`` vetoes growth."""

    C = 0.65
    ratio_avg: float | None = None

    def _observe(self, loss: float, probe: Any) -> None:
        last, peak = self.log_eta, self.log_peak
        super()._observe(loss, probe)
        if self.ratio_avg is not None and self.ratio_avg < self.C:
            self.log_eta = min(self.log_eta, last)
            self.log_peak = max(peak, self.log_eta)  # a vetoed growth is no new peak


class Armijo:
    """Measures the ratio around one optimizer step and moves the step size for the next."""

    def __init__(self, opt: emoq.EmoOptimizer, mode: str) -> None:
        self.opt, (self.kind, self.kw) = opt, parse(mode)
        self.avg: float | None = None
        self.log_eta = math.log(self.kw.get("eta0", 1e-3))
        if self.kind == "armijo":
            opt._pulse = Driven(opt._pulse.initial_scope, opt.noise_floor, opt.stop_thresholds)
            opt._pulse.value = math.exp(self.log_eta)
        elif self.kind == "veto":
            if opt._pulse.name != "adaptive":
                raise ValueError("veto: build the optimizer with pulse='adaptive'")
            opt._pulse.__class__ = type("Veto", (Veto,), {"C": self.kw.get("c", 0.65)}, register=False)
        self.ratios: list[float] = []

    def _gx(self) -> float:
        """<g, x> over every parameter with a gradient, in float64."""
        with torch.no_grad():
            return float(sum(torch.dot(p.grad.reshape(-1).double(), p.detach().reshape(-1).double())
                             for g in self.opt.param_groups for p in g["params"] if p.grad is not None))

    def step(self, before: float, reeval: Any, take_step: Any) -> Any:
        """``take_step()`` (the optimizer's real step), then the ratio of ``before`` (this minibatch's
        loss) and ``reeval()`` (the same minibatch's loss after the step)."""
        gx0 = self._gx() if self.kind != "library" else 0.0
        out = take_step()
        if self.kind == "library":
            return out
        gx1 = self._gx()
        with torch.no_grad():
            after = float(reeval())
        pred = gx0 - gx1
        r = (before - after) / pred if pred > 0 else -1.0
        self.ratios.append(r)
        beta = self.kw.get("beta", 0.9)
        self.avg = r if self.avg is None or beta == 0 else beta * self.avg + (1 - beta) * r
        if self.kind == "veto":
            self.opt._pulse.ratio_avg = self.avg
        else:
            grow = self.avg >= self.kw.get("c", 0.65)
            self.log_eta += self.kw.get("up", 0.05) if grow else -self.kw.get("down", 0.05)
            self.log_eta = min(self.log_eta, math.log(0.1))
            self.opt._pulse.value = math.exp(self.log_eta)
        return out


# ---------------------------------------------------------------------- digits / charLM
def run_task(task: Any, seed: int, mode: str, precision: str = "fp32") -> dict[str, Any]:
    model = task.model(seed)
    kind, _ = parse(mode)
    opt = emoq.EmoSens(list(model.parameters()), state_precision=precision,
                       pulse="adaptive" if kind in ("veto", "library") else "v3.8")
    ctl = Armijo(opt, mode)
    gen = torch.Generator().manual_seed(1000 + seed)  # bench.tasks.Task.run's batches
    etas, curve = [], []
    for step in range(task.steps):
        x, y = task.batch(step, gen)
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, x, y)
        loss.backward()
        ctl.step(loss.item(), lambda x=x, y=y: task.loss(model, x, y), lambda loss=loss: opt.step(loss=loss))
        etas.append(opt.pulse)
        curve.append(loss.item())
    with torch.no_grad():
        test = task.evaluate(model)
    k = max(1, task.steps // 10)
    return {"task": task.name, "mode": mode, "precision": precision, "seed": seed, "test_loss": test,
            "diverged": not math.isfinite(test),
            "eta_deciles": [float(f"{statistics.mean(etas[i:i + k]):.3g}") for i in range(0, len(etas), k)],
            "ratio_deciles": [round(statistics.median(ctl.ratios[i:i + k]), 3) for i in range(0, len(ctl.ratios), k)]
            if ctl.ratios else []}


# ---------------------------------------------------------------------- QLoRA (bench.qlora_study)
def optimizer_class(family: str, mode: str) -> type:
    """An Emo optimizer class whose ``step()`` runs :class:`Armijo` ``mode`` around the real step;
    :class:`ReevalTrainer` gives it the minibatch's loss after the step."""
    base = getattr(emoq, family)

    class WithArmijo(base):  # type: ignore[misc,valid-type]
        needs_reeval = True

        def __init__(self, params: Any, **kw: Any) -> None:
            base.__init__(self, params, pulse="adaptive" if parse(mode)[0] != "armijo" else "v3.8", **kw)
            self.armijo = Armijo(self, mode)
            self.reeval = None

        def step(self, closure: Any = None, *, loss: Any = None) -> Any:
            if self.reeval is None:  # no minibatch to re-evaluate (e.g. a checkpoint's state-init step)
                return base.step(self, closure, loss=loss)
            if loss is None and self._recorded_count:
                loss = float(self._recorded_sum.item()) / self._recorded_count
                self.discard_recorded_losses()
            reeval, self.reeval = self.reeval, None
            return self.armijo.step(float(loss), reeval, lambda: base.step(self, closure, loss=loss))

    WithArmijo.__name__ = base.__name__
    return WithArmijo


def reeval_trainer() -> type:
    from transformers import Trainer

    class ReevalTrainer(Trainer):
        """Hands the optimizer a closure computing this update's minibatch loss (one micro-batch:
        the recipe's ``grad_accum`` is 1) with the current weights."""

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
            out = super().training_step(model, inputs, num_items_in_batch)
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            if getattr(inner, "needs_reeval", False):
                if self.args.gradient_accumulation_steps != 1:
                    raise ValueError("bench.armijo re-evaluates one micro-batch: grad_accum must be 1")
                prepared = self._prepare_inputs(inputs)
                inner.reeval = lambda: self.compute_loss(model, prepared).detach()
            return out

    return ReevalTrainer


def main(argv: list[str] | None = None) -> None:
    from bench.tasks import TASKS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
    ap.add_argument("--modes", nargs="+", required=True, help='e.g. "veto:c=0.65" "armijo:c=0.65" "library"')
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", default=None, help="a JSON-lines file to append the runs to")
    args = ap.parse_args(argv)
    for mode in args.modes:
        parse(mode)  # every mode checked before the first run
    out = Path(args.out).expanduser() if args.out else None
    if out is not None:
        with open(out, "a"):  # appends, never truncates; a path that cannot be written fails here, first
            pass
    torch.set_num_threads(1)
    task = TASKS[args.task]()
    for mode in args.modes:
        tests = []
        for seed in args.seeds:
            r = run_task(task, seed, mode, args.precision)
            tests.append(r["test_loss"])
            print(json.dumps(r), flush=True)
            if out is not None:
                with open(out, "a") as f:
                    f.write(json.dumps(r) + "\n")
        print(f"# {args.task} {mode} {args.precision}: mean held-out loss {statistics.mean(tests):.4f} "
              f"over {len(tests)} seeds", flush=True)


if __name__ == "__main__":
    main()
