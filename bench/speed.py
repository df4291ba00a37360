"""Optimizer step time: Emo families x state precision vs torch / bitsandbytes / torchao.

Parameter sets: one 4096 x 4096 weight, and the LoRA (r=8) matrices of a SmolLM2-135M-shaped
model (``--lora``). Threads pinned (default 2). Each optimizer gets ``--warmup`` untimed steps
(torch.compile happens there) and ``--steps`` timed ones; the table gives the median step time
and its ratio to torch's fused AdamW and to the faster of bnb / torchao AdamW8bit, all measured
in the same run. Emo optimizers get a synthetic loss each step (``opt.step(loss=...)``).

``--device cuda`` times on the GPU (synchronised) and adds the achieved memory bandwidth: the
least bytes a step must move (read and write the weights, read the gradients, read and write
every state tensor: ``2 P + G + 2 S``) over the step time, against a plain ``copy_`` of as many
bytes on the same device.

    python -m bench.speed [--steps 7] [--warmup 3] [--threads 2] [--lora] [--only NAME ...] [--device cuda]
                          [--interleave]

``--interleave`` builds every optimizer first (each on its own copy of the parameters) and
times their steps round-robin, one step of each per round: on a machine shared with other jobs,
every optimizer then meets the same load, so the same-run ratios hold where sequential timings
(minutes apart) would not; each step also starts with the caches holding the other optimizers'
data, as a training step starts after the forward and backward passes.

Writes speed_4096.json (speed_lora.json with --lora; ``_cuda`` before ``.json`` on the GPU).
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


def time_one(make, params_fn, steps: int, warmup: int, sync: bool = False) -> dict:
    params = params_fn()
    try:
        opt = make(params)
        common.set_grads(params)
        warm = [common.timed(lambda i=i: common.step(opt, i), sync) for i in range(warmup)]
        times = [common.timed(lambda i=i: common.step(opt, warmup + i), sync) for i in range(steps)]
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        moved = 3 * param_bytes + 2 * common.state_bytes(opt)  # 2 P + G (same dtype) + 2 S
        return {"median_s": common.median(times), "times_s": times, "warmup_s": warm, "min_bytes_moved": moved}
    except Exception as exc:  # noqa: BLE001 - a peer that cannot run says so in the table
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    finally:
        del params
        gc.collect()


def time_interleaved(makers: dict, params_fn, steps: int, warmup: int, sync: bool = False) -> dict:
    """:func:`time_one`'s results for every optimizer of ``makers``, their steps timed round-robin."""
    runs, results = {}, {}
    for name, make in makers.items():
        params = params_fn()
        try:
            opt = make(params)
            common.set_grads(params)
            warm = [common.timed(lambda o=opt, i=i: common.step(o, i), sync) for i in range(warmup)]
            runs[name] = (opt, params, warm)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run says so in the table
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(steps):
        for name, (opt, _, _) in runs.items():
            times[name].append(common.timed(lambda o=opt, i=i: common.step(o, warmup + i), sync))
    for name, (opt, params, warm) in runs.items():
        moved = 3 * sum(p.numel() * p.element_size() for p in params) + 2 * common.state_bytes(opt)
        results[name] = {"median_s": common.median(times[name]), "times_s": times[name], "warmup_s": warm,
                         "min_bytes_moved": moved}
    return {name: results[name] for name in makers}


def copy_bandwidth(nbytes: int, device: str, repeats: int = 20) -> float:
    """Bytes per second of ``dst.copy_(src)`` moving ``nbytes`` (half read, half written)."""
    import torch

    src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    t = common.median([common.timed(lambda: dst.copy_(src), device.startswith("cuda")) for _ in range(repeats)])
    return 2 * src.numel() / t


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora", action="store_true", help="time the LoRA parameter set instead of 4096x4096")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=None)
    ap.add_argument("--interleave", action="store_true", help="time the optimizers' steps round-robin")
    args = ap.parse_args(argv)
    common.pin_threads(args.threads)
    common.quiet()
    sync = args.device.startswith("cuda")
    params_fn = (lambda: common.lora_set(device=args.device)) if args.lora else (
        lambda: common.big_weight(args.device))
    all_makers = makers()
    names = args.only or DEFAULT
    results = {}
    if args.interleave:
        results = time_interleaved({name: all_makers[name] for name in names}, params_fn, args.steps, args.warmup,
                                   sync)
    for name in names:
        if name not in results:
            results[name] = time_one(all_makers[name], params_fn, args.steps, args.warmup, sync)
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
            if sync:
                row["GB/s"] = r["min_bytes_moved"] / r["median_s"] / 1e9
                row["/ copy_"] = row["GB/s"] * 1e9 / copy_bandwidth(r["min_bytes_moved"], args.device)
        else:
            row["step ms"] = f"cannot run: {r['error']}"
        rows.append(row)
    what = "LoRA r=8 set (SmolLM2-135M shapes)" if args.lora else "one 4096x4096 fp32 weight"
    where = torch_device_name(args.device) if sync else f"{args.threads} threads"
    cols = ["optimizer", "step ms", "/ torch AdamW fused", "/ best 8-bit peer"] + (["GB/s", "/ copy_"] if sync else [])
    order = ", steps interleaved" if args.interleave else ""
    print(f"\nstep time, {what}, {where}, median of {args.steps} after {args.warmup} warm-up{order}\n"
          + common.table(rows, cols))
    payload = {"env": common.environment(), "device": where, "params": what, "steps": args.steps, "warmup": args.warmup,
               "interleaved": args.interleave,
               "best_8bit_peer_s": best8, "torch_adamw_fused_s": fused, "rows": rows, "raw": results}
    suffix = "_cuda" if sync else ""
    path = common.write_json(f"speed_lora{suffix}.json" if args.lora else f"speed_4096{suffix}.json", payload,
                             None if args.out is None else Path(args.out))
    print(f"wrote {path}")
    return payload


def torch_device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device))


if __name__ == "__main__":
    main()
