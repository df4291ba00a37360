"""Optimizer state memory: bytes per parameter, per optimizer x state precision, vs peers.

Two parameter sets: one 4096 x 4096 weight, and the LoRA (r=8) matrices of a SmolLM2-135M-shaped
model (30 layers x q,k,v,o,gate,up,down; 2.4 M parameters, all below or near the 4096-element
low-bit threshold). One step allocates the states; every tensor in ``opt.state`` is counted
(inside torchao subclasses: codes + scales + map; shared storages once).

    python -m bench.memory [--out bench/results]

Writes memory.json.
"""

from __future__ import annotations

import argparse
import traceback

from bench import common


def measure(make, params) -> dict:
    try:
        opt = make(params)
        common.set_grads(params)
        common.step(opt, 0)
        n = sum(p.numel() for p in params)
        b = common.state_bytes(opt)
        return {"bytes": b, "bytes_per_param": b / n}
    except Exception as exc:  # noqa: BLE001 - a peer that cannot run says so in the table
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}",
                "trace": traceback.format_exc(limit=2)}
    finally:
        for p in params:
            p.grad = None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    common.pin_threads(2)
    common.quiet()
    makers = {**common.peer_optimizers(), **common.emo_optimizers()}
    rows = []
    for name, make in makers.items():
        row = {"optimizer": name}
        for set_name, params_fn in (("4096x4096", common.big_weight), ("LoRA r=8 (SmolLM2-135M shapes)",
                                                                       common.lora_set)):
            r = measure(make, params_fn())
            row[set_name] = r.get("bytes_per_param", r.get("error"))
            row[f"{set_name} detail"] = r
        rows.append(row)
        print(f"{name:28s} {row['4096x4096']!s:>12.12}  {row['LoRA r=8 (SmolLM2-135M shapes)']!s:>12.12}", flush=True)
    cols = ["optimizer", "4096x4096", "LoRA r=8 (SmolLM2-135M shapes)"]
    print("\nstate bytes / parameter\n" + common.table(rows, cols))
    payload = {"env": common.environment(), "unit": "state bytes per parameter", "rows": rows}
    path = common.write_json("memory.json", payload, None if args.out is None else __import__("pathlib").Path(args.out))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
