"""Ways to range-check one large gradient (the guard of every Emo step): time per call.

The guard must read every element (a NaN or inf anywhere skips the step) and bound the sum of
squares (``emoq.optim.base.SQUARES_LIMIT``). Candidates on one fp32 gradient, median of
``--calls`` calls after warm-up: ``torch.dot(g, g)`` (what the engine uses for large contiguous
fp32 CPU gradients), ``torch._foreach_norm`` (the multi-tensor norm, used for the rest),
``torch.linalg.vector_norm``, a compiled ``(g * g).sum()``, ``torch.aminmax`` and ``g.sum()``
(not sums of squares: shown as the cost of one plain reduction pass), and ``copy_`` (one read
and one write) for scale.

    python -m bench.range_check [--size 4096] [--threads 2] [--calls 31]

Writes range_check.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench import common


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="the gradient is size x size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=31)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)) * 1e-3
    flat = g.view(-1)
    sink = torch.empty_like(g)
    compiled = torch.compile(lambda x: (x * x).sum(), fullgraph=True, dynamic=False)
    candidates = {
        "torch.dot(g, g)": lambda: torch.dot(flat, flat),
        "torch._foreach_norm([g])": lambda: torch._foreach_norm([g], 2, dtype=torch.float32),
        "torch.linalg.vector_norm(g)": lambda: torch.linalg.vector_norm(g),
        "compiled (g*g).sum()": lambda: compiled(g),
        "torch.aminmax(g)": lambda: torch.aminmax(g),
        "g.sum() (not a sum of squares)": lambda: g.sum(),
        "copy_ (read + write)": lambda: sink.copy_(g),
    }
    rows = []
    for name, fn in candidates.items():
        for _ in range(3):
            fn()
        times = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        rows.append({"candidate": name, "ms": round(ms, 3)})
        print(f"{name:34s} {ms:8.3f} ms")
    payload = {"what": f"range check of one {args.size}x{args.size} fp32 gradient, {args.threads} threads, "
                       f"median of {args.calls} calls", "rows": rows, "env": common.environment()}
    print("wrote", common.write_json("range_check.json", payload, args.out))


if __name__ == "__main__":
    main()
