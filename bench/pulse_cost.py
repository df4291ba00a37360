"""What pulse="adaptive" costs per step and in memory, against the default pulse, same run.

Every Emo family at fp32 and 8-bit states, on one 4096 x 4096 weight and on the LoRA set of
bench/common.py, with ``pulse="v3.8"`` and ``pulse="adaptive"``: median step time over
``--steps`` timed steps after ``--warmup`` (the two pulses alternate, so drifts of a shared
machine hit both alike), the extra time in ms and as a ratio, and the probe's bytes per
parameter (its strided subset of the starting point, emoq/probe.py).

    python -m bench.pulse_cost [--steps 15] [--warmup 3] [--threads 2]

Writes pulse_cost.json.
"""

from __future__ import annotations

import argparse
import gc
import statistics

from bench import common

FAMILIES = ("EmoSens", "EmoAiry", "EmoCats", "EmoTion")


def measure(family: str, precision: str, params_fn, steps: int, warmup: int) -> dict:
    import emoq
    from emoq.probe import STATE_NAME

    cls = getattr(emoq, family)
    runs = {}
    for pulse in ("v3.8", "adaptive"):
        params = params_fn()
        common.set_grads(params)
        runs[pulse] = {"params": params, "opt": cls(params, state_precision=precision, pulse=pulse), "times": []}
        for i in range(warmup):
            common.step(runs[pulse]["opt"], i)
    for i in range(steps):
        for pulse in ("v3.8", "adaptive"):
            run = runs[pulse]
            run["times"].append(common.timed(lambda r=run, i=i: common.step(r["opt"], warmup + i)))
    base = statistics.median(runs["v3.8"]["times"])
    adaptive = statistics.median(runs["adaptive"]["times"])
    opt = runs["adaptive"]["opt"]
    numel = sum(p.numel() for p in runs["adaptive"]["params"])
    probe_bytes = sum(st[STATE_NAME].numel() * st[STATE_NAME].element_size() for st in opt.state.values())
    out = {"family": family, "states": precision, "v3.8 ms": base * 1e3, "adaptive ms": adaptive * 1e3,
           "extra ms": (adaptive - base) * 1e3, "ratio": adaptive / base, "probe B/param": probe_bytes / numel,
           "state B/param (v3.8)": common.state_bytes(runs["v3.8"]["opt"]) / numel}
    del runs
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    common.pin_threads(args.threads)
    common.quiet()
    payload = {"env": common.environment(), "steps": args.steps, "warmup": args.warmup, "sets": {}}
    cols = ["family", "states", "v3.8 ms", "adaptive ms", "extra ms", "ratio", "probe B/param",
            "state B/param (v3.8)"]
    for name, fn in (("one 4096x4096 fp32 weight", common.big_weight), ("LoRA r=8 set", common.lora_set)):
        rows = [measure(f, prec, fn, args.steps, args.warmup) for f in FAMILIES for prec in ("fp32", "8bit")]
        payload["sets"][name] = rows
        print(f"\n{name}, {args.threads} threads, median of {args.steps}\n" + common.table(rows, cols), flush=True)
    path = common.write_json("pulse_cost.json", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
