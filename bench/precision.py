"""Precision: each Emo family with fp32 / bf16 / 8bit / 4bit / fp8 states, and bf16 weights with
each compensation vs fp32 weights, on the digits MLP (64-256-256-10, batch 64, 600 steps).

Low-bit runs use ``min_lowbit_size=0`` (every state whose size is a multiple of the block is
quantized, stricter than the default) and ``EMOQ_COMPILE=0`` (the reference path: the same
rule functions as the compiled default, which rounds the same way). Final loss = loss on the whole
training split after the last step (deterministic given the weights), mean and standard
deviation over seeds (the seed moves init and batch order; its spread is the noise level
against which a precision's difference must be read); also held-out loss.

    python -m bench.precision [--steps 600] [--seeds 5] [--part states|compensation|both]
        [--first-seed 0] [--families EmoSens ...] [--precisions 8bit ...] [--tag _suffix]

Writes precision_states.json and precision_compensation.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("EMOQ_COMPILE", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import emoq  # noqa: E402
from bench import common  # noqa: E402
from bench.quality import digits_split, mlp  # noqa: E402

FAMILIES = ("EmoSens", "EmoAiry", "EmoCats", "EmoTion")
PRECISIONS = ("fp32", "bf16", "8bit", "4bit", "fp8")
TARGET = {"bf16": 0.05, "8bit": 0.05, "fp8": 0.10, "4bit": 0.15}  # issue #3: allowed loss increase


def fp32_compute(net: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The MLP's forward with its (bf16) weights cast to fp32: only the weight storage differs."""
    for layer in net:
        x = F.linear(x, layer.weight.float(), layer.bias.float()) if isinstance(layer, torch.nn.Linear) else layer(x)
    return x


def run(make_opt, seed: int, steps: int, data, weight_dtype=torch.float32, compute_fp32: bool = False) -> dict:
    xtr, ytr, xte, yte = data
    net = mlp(seed).to(weight_dtype)
    if compute_fp32:
        def fwd(x):
            return fp32_compute(net, x.float())
    else:
        def fwd(x):
            return net(x.to(weight_dtype))
    opt = make_opt(list(net.parameters()))
    gen = torch.Generator().manual_seed(1000 + seed)
    curve = []
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (64,), generator=gen)
        net.zero_grad()
        loss = F.cross_entropy(fwd(xtr[idx]).float(), ytr[idx])
        loss.backward()
        opt.step(loss=loss)
        curve.append(loss.item())
    with torch.no_grad():
        test_loss = F.cross_entropy(fwd(xte).float(), yte).item()
        train_loss = F.cross_entropy(fwd(xtr).float(), ytr).item()
    return {"train_loss": train_loss, "test_loss": test_loss, "last20_minibatch_loss": sum(curve[-20:]) / 20}


FIRST_SEED = 0


def mean_runs(make, seeds: int, steps: int, data, **kw) -> dict:
    runs = [run(make, s, steps, data, **kw) for s in range(FIRST_SEED, FIRST_SEED + seeds)]
    out = {k: sum(r[k] for r in runs) / len(runs) for k in ("train_loss", "test_loss", "last20_minibatch_loss")}
    out["train_loss_std"] = statistics.stdev([r["train_loss"] for r in runs]) if len(runs) > 1 else 0.0
    return out | {"train_loss_all": [r["train_loss"] for r in runs], "test_loss_all": [r["test_loss"] for r in runs]}


def states(args, data) -> dict:
    rows, res = [], {}
    for fam in args.families:
        cls = getattr(emoq, fam)
        for prec in args.precisions:
            t0 = time.perf_counter()
            r = mean_runs(lambda ps, c=cls, p=prec: c(ps, state_precision=p, min_lowbit_size=0), args.seeds,
                          args.steps, data)
            r["seconds"] = time.perf_counter() - t0
            res[f"{fam} {prec}"] = r
            base = res[f"{fam} fp32"]["train_loss"]
            rel = r["train_loss"] / base - 1
            ok = None if prec == "fp32" else ("yes" if rel <= TARGET[prec] else "NO")
            rows.append({"optimizer": fam, "states": prec, "train loss": r["train_loss"],
                         "seed std": r["train_loss_std"], "test loss": r["test_loss"],
                         "vs fp32 states": f"{rel:+.1%}", "target": "" if prec == "fp32" else f"<= +{TARGET[prec]:.0%}",
                         "met": ok})
            print(f"{fam:8s} {prec:5s} train {r['train_loss']:.4f} test {r['test_loss']:.4f} {rel:+.1%}", flush=True)
    cols = ["optimizer", "states", "train loss", "seed std", "test loss", "vs fp32 states", "target", "met"]
    print("\n" + common.table(rows, cols))
    return {"rows": rows, "results": res}


def compensation(args, data) -> dict:
    rows, res = [], {}
    ref = mean_runs(lambda ps: emoq.EmoSens(ps), args.seeds, args.steps, data)
    res["fp32 weights"] = ref
    rows.append({"weights": "fp32 (reference)", "compensation": "-", "extra bytes/param": 0,
                 "train loss": ref["train_loss"],
                 "seed std": ref["train_loss_std"], "test loss": ref["test_loss"], "vs fp32 weights": "+0.0%"})
    from emoq.compensate import compensation_bytes_per_param

    for compute, mode in [(c, m) for c in ("bf16", "fp32") for m in ("none", "stochastic", "error_feedback",
                                                                     "error_feedback8")]:
        r = mean_runs(lambda ps, m=mode: emoq.EmoSens(ps, compensation=m), args.seeds, args.steps, data,
                      weight_dtype=torch.bfloat16, compute_fp32=compute == "fp32")
        base = [x / b - 1 for x, b in zip(r["train_loss_all"], ref["train_loss_all"])]
        r["paired_rel_diff"] = base
        res[f"bf16 {mode} ({compute} compute)"] = r
        rel = r["train_loss"] / ref["train_loss"] - 1
        rows.append({"weights": f"bf16, {compute} compute", "compensation": mode,
                     "extra bytes/param": compensation_bytes_per_param(mode, torch.bfloat16),
                     "train loss": r["train_loss"], "seed std": r["train_loss_std"], "test loss": r["test_loss"],
                     "vs fp32 weights": f"{rel:+.1%}",
                     "mean |paired diff|": f"{statistics.mean(abs(x) for x in base):.1%}"})
        print(f"bf16 {compute} {mode:16s} train {r['train_loss']:.4f} test {r['test_loss']:.4f} {rel:+.1%}", flush=True)
    print("\nEmoSens, bf16 weights (forward in bf16, or with the weights cast to fp32) vs fp32 weights\n"
          + common.table(rows, ["weights", "compensation", "extra bytes/param", "train loss", "seed std",
                                "test loss", "vs fp32 weights", "mean |paired diff|"]))
    return {"rows": rows, "results": res}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--part", choices=("states", "compensation", "both"), default="both")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--precisions", nargs="*", default=list(PRECISIONS), choices=PRECISIONS,
                    help="fp32 is always run first (the baseline)")
    ap.add_argument("--tag", default="", help="suffix of the JSON file names")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    global FIRST_SEED
    FIRST_SEED = args.first_seed
    args.precisions = ["fp32"] + [p for p in args.precisions if p != "fp32"]
    common.pin_threads(2)
    common.quiet()
    data = digits_split()
    out = None if args.out is None else Path(args.out)
    payload = {}
    meta = {"env": common.environment(), "task": "digits MLP 64-256-256-10", "steps": args.steps, "batch": 64,
            "seeds": list(range(args.first_seed, args.first_seed + args.seeds))}
    if args.part in ("states", "both"):
        payload["states"] = states(args, data)
        print(f"wrote {common.write_json(f'precision_states{args.tag}.json', meta | payload['states'], out)}")
    if args.part in ("compensation", "both"):
        payload["compensation"] = compensation(args, data)
        path = common.write_json(f"precision_compensation{args.tag}.json", meta | payload["compensation"], out)
        print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
