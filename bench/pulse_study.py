"""The pulse study: does ``lr=1.0`` (no tuning) match a tuned AdamW and each family's tuned scope?

For one task (bench/tasks.py: ``digits``, ``charlm``; the QLoRA recipe is bench/qlora_study.py)
it trains, for every seed:

- ``peers``: AdamW (weight decay 0.01) over an lr grid; bitsandbytes AdamW8bit at the best
  AdamW lr of the grid; Prodigy (lr=1.0); schedule-free AdamW (its default lr);
- ``scopes``: each Emo family with the ``v3.8`` and ``v3.9`` pulses at scopes
  0.3 / 1 / 3 / 10 / 30 (fp32 states): the best a user could get by tuning the scope;
- ``main``: each family x each ``pulse=`` x fp32 / 8bit states at ``lr=1.0``.

Every run is appended to ``bench/results/cache/pulse_<task>.jsonl`` (runs already there are
not repeated, so an interrupted study resumes); ``--report`` aggregates the cache into
``pulse_<task>.json`` (mean, spread, ratios), ``pulse_<task>.png`` (loss and step size of
seed 0) and a markdown table on stdout.

    python -m bench.pulse_study --task digits --seeds 0 1 2 --parts peers scopes main --workers 2
    python -m bench.pulse_study --task digits --report

Low-bit states run with ``EMOQ_COMPILE=0`` (the fused kernels eagerly; same formulas) and the
default ``min_lowbit_size`` (what a user gets). One thread per worker.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("EMOQ_COMPILE", "0")

import torch  # noqa: E402

FAMILIES = ("EmoSens", "EmoAiry", "EmoCats", "EmoTion")
PULSES = ("v3.8", "v3.9", "adaptive")
SCOPES = (0.3, 1.0, 3.0, 10.0, 30.0)
ADAMW_GRID = {"digits": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2), "charlm": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
              "qlora": (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3)}
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------- optimizer specs
def emo_spec(family: str, pulse: str, precision: str = "fp32", scope: float = 1.0) -> str:
    return f"{family} {precision} {pulse} scope={scope:g}"


def build(spec: str, params: list) -> Any:
    """An optimizer from its spec string (the names used in tables and the cache)."""
    words = spec.split()
    if words[0].startswith("Emo"):
        import emoq

        family, precision, pulse, scope = words[0], words[1], words[2], float(words[3].split("=")[1])
        cls = getattr(emoq, family)
        if pulse.startswith("cand:"):  # research candidates (bench/pulse_candidates.py)
            from bench import pulse_candidates

            opt = cls(params, lr=scope, state_precision=precision)
            pulse_candidates.install(opt, pulse[5:])
            return opt
        if pulse == "adaptive+recheck":  # the adaptive pulse fed step(recheck=...) by Task.run
            opt = cls(params, lr=scope, state_precision=precision, pulse="adaptive")
            opt.bench_recheck = True
            return opt
        return cls(params, lr=scope, state_precision=precision, pulse=pulse)
    if words[0] == "AdamW":
        return torch.optim.AdamW(params, lr=float(words[1].split("=")[1]), weight_decay=0.01)
    if words[0] == "bnb":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=float(words[2].split("=")[1]), weight_decay=0.01)
    if words[0] == "Prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(params, lr=1.0, weight_decay=0.01)
    if words[0] == "ScheduleFree":
        import schedulefree

        return schedulefree.AdamWScheduleFree(params, weight_decay=0.01)
    raise ValueError(f"unknown optimizer spec {spec!r}")


def adamw_specs(task: str) -> list[str]:
    return [f"AdamW lr={lr:g}" for lr in ADAMW_GRID[task]]


def part_specs(task: str, part: str, cache: dict | None = None) -> list[str]:
    if part == "adamw":
        return adamw_specs(task)
    if part == "peers":
        specs = adamw_specs(task) + ["Prodigy", "ScheduleFree"]
        best = best_adamw(cache or {}, task)
        if best is not None:
            specs.append(f"bnb AdamW8bit {best.split()[1]}")
        return specs
    if part == "scopes":
        return [emo_spec(f, p, "fp32", s) for f in FAMILIES for p in ("v3.8", "v3.9") for s in SCOPES]
    if part == "main":
        return [emo_spec(f, p, prec) for f in FAMILIES for p in PULSES for prec in ("fp32", "8bit")]
    raise ValueError(f"unknown part {part!r}")


# ---------------------------------------------------------------------- running
def _worker(job: tuple[str, str, int]) -> dict[str, Any]:
    task_name, spec, seed = job
    torch.set_num_threads(1)
    import warnings

    from bench.tasks import TASKS

    task = _TASK_CACHE.get(task_name) or _TASK_CACHE.setdefault(task_name, TASKS[task_name]())
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = task.run(lambda ps: build(spec, ps), seed)
    return {"task": task_name, "spec": spec, "seed": seed, "test_loss": res.test_loss, "train_loss": res.train_loss,
            "diverged": res.diverged, "skipped_steps": res.skipped_steps, "seconds": time.perf_counter() - t0,
            "curve": [round(x, 5) for x in res.curve], "etas": [float(f"{x:.4g}") for x in res.etas]}


_TASK_CACHE: dict[str, Any] = {}


def cache_path(task: str, out: Path) -> Path:
    return out / "cache" / f"pulse_{task}.jsonl"


def load_cache(path: Path) -> dict[tuple[str, int], dict]:
    runs = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                runs[(r["spec"], r["seed"])] = r
    return runs


def run_jobs(task: str, specs: Iterable[str], seeds: Iterable[int], out: Path, workers: int) -> dict:
    path = cache_path(task, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = load_cache(path)
    jobs = [(task, spec, seed) for spec in specs for seed in seeds if (spec, seed) not in cache]
    if not jobs:
        return cache
    print(f"{task}: {len(jobs)} runs ({workers} workers)", file=sys.stderr)
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers)
        results = pool.imap_unordered(_worker, jobs)
    else:
        pool, results = None, map(_worker, jobs)
    try:
        with path.open("a") as fh:
            for i, r in enumerate(results, 1):
                fh.write(json.dumps(r) + "\n")
                fh.flush()
                cache[(r["spec"], r["seed"])] = r
                print(f"  [{i}/{len(jobs)}] {r['spec']:36s} seed {r['seed']}: test {r['test_loss']:.4f} "
                      f"({r['seconds']:.1f}s){' DIVERGED' if r['diverged'] else ''}", file=sys.stderr)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return cache


# ---------------------------------------------------------------------- aggregation
def summarize(cache: dict, spec: str, seeds: list[int]) -> dict[str, Any] | None:
    runs = [cache[(spec, s)] for s in seeds if (spec, s) in cache]
    if len(runs) < len(seeds):
        return None
    losses = [r["test_loss"] if math.isfinite(r["test_loss"]) else math.inf for r in runs]
    return {"test_loss_mean": statistics.fmean(losses) if all(map(math.isfinite, losses)) else math.inf,
            "test_loss_min": min(losses), "test_loss_max": max(losses), "test_loss_all": losses,
            "diverged_seeds": [r["seed"] for r in runs if r["diverged"]],
            "final_eta_mean": statistics.fmean(r["etas"][-1] for r in runs),
            "seconds_mean": statistics.fmean(r["seconds"] for r in runs)}


def best_adamw(cache: dict, task: str, seeds: list[int] | None = None) -> str | None:
    seeds = seeds if seeds is not None else sorted({s for (_, s) in cache})
    rows = {spec: summarize(cache, spec, seeds) for spec in adamw_specs(task)}
    rows = {k: v for k, v in rows.items() if v is not None}
    return min(rows, key=lambda k: rows[k]["test_loss_mean"]) if rows else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, choices=("digits", "charlm"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parts", nargs="*", default=["adamw", "peers", "scopes", "main"])
    ap.add_argument("--specs", nargs="*", default=[], help="extra optimizer specs to run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--report", action="store_true", help="only aggregate the cache")
    args = ap.parse_args(argv)
    if not args.report:
        cache = load_cache(cache_path(args.task, args.out))
        for part in args.parts:
            cache = run_jobs(args.task, part_specs(args.task, part, cache), args.seeds, args.out, args.workers)
        if args.specs:
            run_jobs(args.task, args.specs, args.seeds, args.out, args.workers)
    from bench.pulse_report import report

    report(args.task, args.seeds, args.out)


if __name__ == "__main__":
    main()
