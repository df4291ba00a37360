"""Where a default (compiled) Emo step's time goes on the LoRA set: the same optimizer timed with one
phase of the stacked step skipped at a time, interleaved round by round (a timing probe: steps with
a phase skipped compute garbage; the optimizer is thrown away).

Phases: the range check (``torch.dot`` of each stacked gradient) and stacking the gradients; "kernel
+ Python" skips both (what is left: the compiled rule on the members' buffers and the bookkeeping).
Since stop 20 the members' values live in one buffer (``emoq.optim.base.ParamHome``): nothing is
stacked or copied back for them (the earlier "no value stacking" / "no copy back" rows are gone).

    python -m bench.step_breakdown [--families EmoSens EmoCats] [--threads 2] [--rounds 25]

Writes step_breakdown.json.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from bench import common

PHASES = {"full step": (), "no range check": ("dot",), "no gradient stacking": ("g",),
          "kernel + Python only": ("dot", "g")}


@contextmanager
def skipping(skip: set[str]):
    """Patch the stacked step's gradient stacking and range check to be skipped while ``skip`` names them."""
    from emoq.optim import base

    stack, dot = base.Unit.stack, base.sum_of_squares
    zero = torch.zeros(1)

    def kept_stack(self, which, members):
        return self._bufs[which] if which in skip and which in self._bufs else stack(self, which, members)

    base.Unit.stack = kept_stack
    base.sum_of_squares = lambda g: zero if "dot" in skip else dot(g)
    try:
        yield
    finally:
        base.Unit.stack, base.sum_of_squares = stack, dot


def breakdown(family: str, rounds: int, params_fn=common.lora_set) -> dict[str, float]:
    """Median step time (s) of each row of :data:`PHASES` for ``family`` at fp32."""
    import emoq

    params = params_fn()
    common.set_grads(params)
    opt = getattr(emoq, family)(params)
    for i in range(3):  # compile, allocate states and buffers
        common.step(opt, i)
    skip: set[str] = set()
    times: dict[str, list[float]] = {name: [] for name in PHASES}
    with skipping(skip):
        for _ in range(rounds):
            for name, phases in PHASES.items():
                skip.clear()
                skip.update(phases)
                t = time.perf_counter()
                common.step(opt, 10)
                times[name].append(time.perf_counter() - t)
    return {name: common.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="*", default=["EmoSens", "EmoCats"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    common.pin_threads(args.threads)
    common.quiet()
    results = {fam: breakdown(fam, args.rounds) for fam in args.families}
    rows = [{"step": name, **{f"{fam} ms": results[fam][name] * 1e3 for fam in args.families}} for name in PHASES]
    print(f"\nLoRA set, {args.threads} threads, median of {args.rounds} interleaved rounds\n"
          + common.table(rows, ["step"] + [f"{fam} ms" for fam in args.families]))
    payload = {"env": common.environment(), "threads": args.threads, "rounds": args.rounds, "seconds": results}
    path = common.write_json("step_breakdown.json", payload, None if args.out is None else Path(args.out))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
