"""Optimizer step time on CPU: Emo families x state precision vs torch / bitsandbytes / torchao.

Parameter sets: one 4096 x 4096 weight, and the LoRA (r=8) matrices of a SmolLM2-135M-shaped
model (``--lora``). Threads pinned (default 2). Each optimizer gets ``--warmup`` untimed steps
(torch.compile happens there) and ``--steps`` timed ones; the table gives the median step time
and its ratio to torch's fused AdamW and to the faster of bnb / torchao AdamW8bit, all measured
in the same run. Emo optimizers get a synthetic loss each step (``opt.step(loss=...)``).

    python -m bench.speed [--steps 7] [--warmup 3] [--threads 2] [--lora] [--only NAME ...]

Writes speed_4096.json (speed_lora.json with --lora).
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

from bench import common

DEFAULT = ["torch AdamW fused", "torch AdamW foreach", "bnb AdamW8bit", "torchao AdamW8bit", "torchao AdamW4bit",
           "EmoSens fp32", "EmoSens fp32 eager", "EmoSens bf16", "EmoSens bf16 eager", "EmoSens 8bit", "EmoSens 4bit",
           "EmoSens fp8",
           "EmoCats fp32", "EmoCats fp32 eager", "EmoCats 8bit", "EmoCats 4bit", "EmoCats fp8",
           "EmoAiry fp32", "EmoAiry 8bit", "EmoTion fp32", "EmoTion 8bit"]


def makers() -> dict:
    import emoq

    out = {**common.peer_optimizers(), **common.emo_optimizers()}
    # "eager": the reference path (fused=False); the plain names run the default compiled step.
    out["EmoSens fp32 eager"] = lambda ps: emoq.EmoSens(ps, fused=False)
    out["EmoCats fp32 eager"] = lambda ps: emoq.EmoCats(ps, fused=False)
    out["EmoSens bf16 eager"] = lambda ps: emoq.EmoSens(ps, state_precision="bf16", fused=False)
    return out


def time_one(make, params_fn, steps: int, warmup: int) -> dict:
    params = params_fn()
    try:
        opt = make(params)
        common.set_grads(params)
        warm = [common.timed(lambda i=i: common.step(opt, i)) for i in range(warmup)]
        times = [common.timed(lambda i=i: common.step(opt, warmup + i)) for i in range(steps)]
        return {"median_s": common.median(times), "times_s": times, "warmup_s": warm}
    except Exception as exc:  # noqa: BLE001 - a peer that cannot run says so in the table
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    finally:
        del params
        gc.collect()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora", action="store_true", help="time the LoRA parameter set instead of 4096x4096")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    common.pin_threads(args.threads)
    common.quiet()
    params_fn = common.lora_set if args.lora else common.big_weight
    all_makers = makers()
    names = args.only or DEFAULT
    results = {}
    for name in names:
        results[name] = time_one(all_makers[name], params_fn, args.steps, args.warmup)
        r = results[name]
        print(f"{name:24s} " + (f"{r['median_s'] * 1e3:9.1f} ms (warm-up {sum(r['warmup_s']):.1f} s)"
                                if "median_s" in r else r["error"]), flush=True)
    fused = results.get("torch AdamW fused", {}).get("median_s")
    eight = [results[n]["median_s"] for n in ("bnb AdamW8bit", "torchao AdamW8bit")
             if "median_s" in results.get(n, {})]
    best8 = min(eight) if eight else None
    rows = []
    for name, r in results.items():
        row = {"optimizer": name}
        if "median_s" in r:
            row["step ms"] = r["median_s"] * 1e3
            row["/ torch AdamW fused"] = r["median_s"] / fused if fused else None
            row["/ best 8-bit peer"] = r["median_s"] / best8 if best8 else None
        else:
            row["step ms"] = f"cannot run: {r['error']}"
        rows.append(row)
    what = "LoRA r=8 set (SmolLM2-135M shapes)" if args.lora else "one 4096x4096 fp32 weight"
    print(f"\nstep time, {what}, {args.threads} threads, median of {args.steps} after {args.warmup} warm-up\n"
          + common.table(rows, ["optimizer", "step ms", "/ torch AdamW fused", "/ best 8-bit peer"]))
    payload = {"env": common.environment(), "params": what, "steps": args.steps, "warmup": args.warmup,
               "best_8bit_peer_s": best8, "torch_adamw_fused_s": fused, "rows": rows, "raw": results}
    path = common.write_json("speed_lora.json" if args.lora else "speed_4096.json", payload,
                             None if args.out is None else Path(args.out))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
