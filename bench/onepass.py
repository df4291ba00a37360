"""8-bit step on one 4096 x 4096 weight: the one-pass step vs the two-call step, interleaved.

Element-wise rules (EmoSens, EmoCats) step a large parameter in pieces; with 8-bit states each
piece runs in two compiled calls through fp32 scratch (the default) or, with
``emoq.kernels.ONE_PASS`` on, in one compiled pass over its blocks (``Runner._one_pass``). Both,
and torch's fused AdamW, are timed round-robin in one process (``bench.speed``'s ``--interleave``),
so all meet the same load; the results are bit-identical (tests/test_kernels.py).

    python -m bench.onepass [--steps 11] [--warmup 3] [--threads 2]

Writes bench/results/onepass_4096.json.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench import common
from bench.speed import time_interleaved


def with_one_pass(cls: type, on: bool) -> type:
    """``cls`` whose steps run with ``emoq.kernels.ONE_PASS`` set to ``on`` (restored after each step)."""
    from emoq import kernels

    class Switched(cls):  # type: ignore[misc, valid-type]
        def step(self, *args: Any, **kwargs: Any) -> Any:
            before, kernels.ONE_PASS = kernels.ONE_PASS, on
            try:
                return super().step(*args, **kwargs)
            finally:
                kernels.ONE_PASS = before

    return Switched


def makers() -> dict:
    import emoq

    out = {"torch AdamW fused": common.peer_optimizers()["torch AdamW fused"]}
    for name in ("EmoSens", "EmoCats"):
        cls = getattr(emoq, name)
        out[f"{name} 8bit one pass"] = lambda ps, cls=cls: with_one_pass(cls, True)(ps, state_precision="8bit")
        out[f"{name} 8bit two calls"] = lambda ps, cls=cls: with_one_pass(cls, False)(ps, state_precision="8bit")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    common.pin_threads(args.threads)
    common.quiet()
    results = time_interleaved(makers(), common.big_weight, args.steps, args.warmup)
    fused = results["torch AdamW fused"]["median_s"]
    rows = [{"optimizer": name, "step ms": r["median_s"] * 1e3, "/ torch AdamW fused": r["median_s"] / fused}
            for name, r in results.items()]
    print(f"\n8-bit steps, one 4096x4096 fp32 weight, {args.threads} threads, median of {args.steps} "
          f"after {args.warmup} warm-up, steps interleaved\n"
          + common.table(rows, ["optimizer", "step ms", "/ torch AdamW fused"]))
    payload = {"env": common.environment(), "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
               "rows": rows, "raw": results}
    common.write_json("onepass_4096.json", payload)
    return payload


if __name__ == "__main__":
    main()
