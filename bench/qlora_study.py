"""The pulse study on the default QLoRA recipe (recipes/smollm2-pydoc.yaml), through the recipe machinery.

SmolLM2-135M-Instruct in NF4 + LoRA r=8 on every linear layer, pydoc Q/A pairs, batch 4 x 128
tokens, 60 updates, weight decay 0 (the recipe's), held-out loss / perplexity on the recipe's 48
held-out examples after the last update. ``seed`` is the recipe's ``seed`` key: it shuffles the
examples (so the held-out set differs per seed, the same for every optimizer), initialises LoRA
and orders the batches. Each optimizer is the Trainer's ``optimizer_cls_and_kwargs`` (so it gets
the Trainer's parameter groups, as in ``emoq finetune``); Emo optimizers run with
:class:`~emoq.integrations.transformers.EmoCallback`.

The NF4 model is loaded once per seed and process; before every run its LoRA weights are reset
to the freshly initialised ones (the Trainer re-seeds itself), which gives the same run as a
fresh ``emoq finetune`` at a fraction of the load time.

    python -m bench.qlora_study --seeds 0 1 2 --specs "AdamW lr=0.001" "EmoSens fp32 adaptive scope=1" ...
    python -m bench.qlora_study --seeds 0 1 2 --parts peers scopes main --workers 2
    python -m bench.qlora_study --report

Runs are cached in ``bench/results/cache/pulse_qlora.jsonl`` like bench/pulse_study.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("EMOQ_COMPILE", "0")

import torch  # noqa: E402

from bench.pulse_study import ADAMW_GRID, RESULTS, cache_path, load_cache  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-pydoc.yaml"


def cls_and_kwargs(spec: str) -> tuple[type, dict[str, Any]]:
    words = spec.split()
    if words[0].startswith("Emo"):
        import emoq

        family, precision, pulse, scope = words[0], words[1], words[2], float(words[3].split("=")[1])
        cls = getattr(emoq, family)
        if pulse.startswith(("veto:", "armijo:")):  # the same-minibatch Armijo research (bench/armijo.py)
            from bench import armijo

            return armijo.optimizer_class(family, pulse), dict(lr=scope, state_precision=precision)
        if pulse.startswith("cand:"):  # a research candidate (bench/pulse_candidates.py)
            from bench import pulse_candidates

            def init(self, params, _cand=pulse[5:], **kw):
                cls.__init__(self, params, **kw)
                pulse_candidates.install(self, _cand)

            return type(family, (cls,), {"__init__": init}), dict(lr=scope, state_precision=precision)
        if pulse == "adaptive+recheck":  # run() adds EmoCallback(recheck=True)
            pulse = "adaptive"
        return cls, dict(lr=scope, state_precision=precision, pulse=pulse)
    if words[0] == "AdamW":
        return torch.optim.AdamW, dict(lr=float(words[1].split("=")[1]))
    if words[0] == "bnb":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit, dict(lr=float(words[2].split("=")[1]))
    if words[0] == "Prodigy":
        import prodigyopt

        return prodigyopt.Prodigy, dict(lr=1.0)
    if words[0] == "ScheduleFree":
        import schedulefree

        return schedulefree.AdamWScheduleFree, {}
    raise ValueError(f"unknown optimizer spec {spec!r}")


class _Seeded:
    """One seed's NF4 + LoRA model and data, loaded once; ``run(spec)`` trains a fresh adapter."""

    def __init__(self, seed: int) -> None:
        from transformers import set_seed

        from emoq.recipes.config import load_recipe
        from emoq.recipes.data import load_examples, split, tokenize
        from emoq.recipes.model import load_qlora, load_tokenizer, resolve_model_dir

        self.recipe = load_recipe(RECIPE, [f"seed={seed}"])
        set_seed(seed)  # as emoq finetune: the LoRA initialisation depends on it
        rows = load_examples(self.recipe)
        path = resolve_model_dir(self.recipe)
        tokenizer = load_tokenizer(path, self.recipe)
        self.model = load_qlora(self.recipe, path)
        train_rows, held_rows = split(rows, self.recipe)
        self.train_ds = tokenize(train_rows, tokenizer, self.recipe.seq_len)
        self.eval_ds = tokenize(held_rows, tokenizer, self.recipe.seq_len)
        self.initial = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def run(self, spec: str) -> dict[str, Any]:
        from transformers import Trainer, TrainerCallback

        import emoq
        from bench.tasks import effective_lr
        from emoq.integrations.transformers import EmoCallback
        from emoq.recipes.run import evaluate, training_arguments

        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in self.initial:
                    p.copy_(self.initial[n])
        cls, kwargs = cls_and_kwargs(spec)
        etas: list[float] = []

        class Record(TrainerCallback):
            def on_train_begin(self, args, state, control, optimizer=None, **kw):
                inner = getattr(optimizer, "optimizer", optimizer)
                if hasattr(inner, "train") and callable(inner.train):
                    inner.train()  # schedule-free

            def on_step_end(self, args, state, control, optimizer=None, **kw):
                etas.append(effective_lr(getattr(optimizer, "optimizer", optimizer)))

            def on_train_end(self, args, state, control, optimizer=None, **kw):
                inner = getattr(optimizer, "optimizer", optimizer)
                if hasattr(inner, "eval") and callable(inner.eval):
                    inner.eval()

        callbacks = [Record()]
        if issubclass(cls, emoq.EmoOptimizer):
            callbacks.insert(0, EmoCallback(recheck=spec.split()[2] == "adaptive+recheck"))
        with tempfile.TemporaryDirectory() as tmp:
            args = training_arguments(self.recipe, Path(tmp), progress=False)
            if getattr(cls, "needs_reeval", False):
                from bench.armijo import reeval_trainer

                Trainer = reeval_trainer()  # noqa: N806
            trainer = Trainer(model=self.model, args=args, train_dataset=self.train_ds, eval_dataset=self.eval_ds,
                              optimizer_cls_and_kwargs=(cls, kwargs), callbacks=callbacks)
            t0 = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - t0
            after = evaluate(trainer, self.eval_ds)
        curve = [h["loss"] for h in trainer.state.log_history if "loss" in h and "eval_loss" not in h]
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        return {"test_loss": after["loss"], "perplexity": after["perplexity"], "curve": curve,
                "etas": [float(f"{x:.4g}") for x in etas], "seconds": seconds,
                "skipped_steps": int(getattr(opt, "skipped_steps", 0)),
                "diverged": not math.isfinite(after["loss"]) or (bool(curve) and curve[-1] > 2 * curve[0])}


def _worker(job: tuple[int, list[str], str]) -> list[dict[str, Any]]:
    seed, specs, path = job
    torch.set_num_threads(int(os.environ.get("EMOQ_BENCH_THREADS", "1")))
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    seeded = _Seeded(seed)
    out = []
    for spec in specs:
        r = {"task": "qlora", "spec": spec, "seed": seed, **seeded.run(spec)}
        r["train_loss"] = sum(r["curve"][-10:]) / max(1, len(r["curve"][-10:]))
        with open(path, "a") as fh:  # one line per run, appended atomically enough for two workers
            fh.write(json.dumps(r) + "\n")
        print(f"  {spec:36s} seed {seed}: held-out loss {r['test_loss']:.4f} ppl {r['perplexity']:.3f} "
              f"({r['seconds']:.0f}s)", file=sys.stderr, flush=True)
        out.append(r)
    return out


def part_specs(part: str, cache: dict) -> list[str]:
    from bench.pulse_study import FAMILIES, PULSES, SCOPES, emo_spec

    adamw = [f"AdamW lr={lr:g}" for lr in ADAMW_GRID["qlora"]]
    if part == "adamw":
        return adamw
    if part == "peers":
        from bench.pulse_study import summarize

        seeds = sorted({s for (_, s) in cache})
        rows = {s: summarize(cache, s, seeds) for s in adamw}
        rows = {k: v for k, v in rows.items() if v is not None}
        specs = adamw + ["Prodigy", "ScheduleFree"]
        if rows:
            best = min(rows, key=lambda k: rows[k]["test_loss_mean"])
            specs.append(f"bnb AdamW8bit {best.split()[1]}")
        return specs
    if part == "scopes":
        return [emo_spec(f, p, "fp32", s) for f in FAMILIES for p in ("v3.8", "v3.9") for s in SCOPES]
    if part == "main":
        # EmoAiry / EmoTion keep no state for LoRA matrices: their 8bit run is the fp32 run
        return [emo_spec(f, p, prec) for f in FAMILIES for p in PULSES for prec in ("fp32", "8bit")
                if prec == "fp32" or f in ("EmoSens", "EmoCats")]
    raise ValueError(part)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parts", nargs="*", default=[])
    ap.add_argument("--specs", nargs="*", default=[])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args(argv)
    path = cache_path("qlora", args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for part in [*args.parts, None]:
            cache = load_cache(path)
            specs = part_specs(part, cache) if part else args.specs
            jobs = [(seed, [s for s in specs if (s, seed) not in cache], str(path)) for seed in args.seeds]
            jobs = [j for j in jobs if j[1]]
            if not jobs:
                continue
            print(f"qlora {part or 'specs'}: {sum(len(j[1]) for j in jobs)} runs", file=sys.stderr)
            if args.workers > 1:
                import multiprocessing as mp

                # split each seed's list in two so both workers stay busy with few seeds
                halves = [(seed, specs[i::2], p) for seed, specs, p in jobs for i in range(2) if specs[i::2]]
                with mp.get_context("spawn").Pool(args.workers) as pool:
                    list(pool.imap_unordered(_worker, halves))
            else:
                for job in jobs:
                    _worker(job)
    from bench.pulse_report import report

    report("qlora", args.seeds, args.out)


if __name__ == "__main__":
    main()
