"""End to end: memory and speed of whole fine-tuning steps of SmolLM2-135M, per optimizer.

Two tasks on the offline pydoc Q/A data (the default recipe's data, seq_len 128, batch 4,
held-out 48 examples):

- ``full``: full fine-tune, every weight trained (134.5 M parameters), fp32 weights; plus bf16
  weights with each ``compensation`` (EmoSens, fp32 states);
- ``qlora``: the default recipe's model, NF4 base + LoRA r=8 on every linear layer (fp32 compute).

Each optimizer runs in a fresh subprocess (so its peak RSS is its own): load, ``--warmup``
steps (compilation happens there, timed separately), ``--steps`` timed steps (forward, backward,
optimizer step), then the held-out loss. Reported: peak RSS (``ru_maxrss``; CUDA max allocated
when on GPU), optimizer-state bytes (every tensor in ``opt.state``), median s/step and optimizer
s/step, tokens/s (non-padding tokens), held-out loss before and after. Peers (torch, bnb, torchao
AdamW) get a fixed learning rate (``--adamw-lr`` full, ``--lora-lr`` qlora); Emo optimizers run
at their defaults (``lr=1.0``: zero tuning).

    python -m bench.e2e [--task full qlora] [--steps 6] [--warmup 2] [--only NAME ...]
                        [--device cuda] [--model-dir DIR] [--random-init]

Writes e2e_full.json / e2e_qlora.json and e2e.png (``_cuda`` before the suffix on the GPU).
``--random-init`` builds the full model from ``DIR/config.json`` with random weights, for a
machine the checkpoint cannot reach: memory and step time are the real model's, the held-out
loss is not meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import common

FULL = ["torch AdamW fused", "bnb AdamW8bit", "torchao AdamW8bit", "torchao AdamW4bit",
        "EmoSens fp32", "EmoSens 8bit", "EmoSens 4bit", "EmoAiry fp32", "EmoAiry 8bit", "EmoAiry 4bit",
        "EmoCats fp32", "EmoCats 8bit", "EmoCats 4bit", "EmoTion fp32", "EmoTion 8bit", "EmoTion 4bit",
        "torch AdamW fused, bf16 weights", "EmoSens bf16 weights, none", "EmoSens bf16 weights, stochastic",
        "EmoSens bf16 weights, error_feedback", "EmoSens bf16 weights, error_feedback8"]
QLORA = [n for n in FULL if "bf16 weights" not in n]


def make_optimizer(name: str, params: list, lr: float) -> Any:
    """The optimizer called ``name`` in the tables (peers at ``lr``, Emo at their defaults)."""
    import torch

    import emoq

    if name.startswith("torch AdamW fused"):
        return torch.optim.AdamW(params, lr=lr, fused=True)
    if name.startswith("bnb AdamW8bit"):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr)
    if name.startswith("torchao AdamW"):
        import torchao.optim

        return getattr(torchao.optim, name.split()[1])(params, lr=lr)
    family, rest = name.split(" ", 1)
    if rest.startswith("bf16 weights"):
        return getattr(emoq, family)(params, compensation=rest.split(", ")[1])
    return getattr(emoq, family)(params, state_precision=rest)


def _batches(dataset: Any, batch: int, device: str = "cpu") -> list[dict]:
    import torch

    cols = {k: torch.tensor(dataset[k], device=device) for k in ("input_ids", "attention_mask", "labels")}
    n = len(cols["input_ids"]) // batch * batch
    return [{k: v[i:i + batch] for k, v in cols.items()} for i in range(0, n, batch)]


def held_out_loss(model: Any, batches: list[dict]) -> float:
    """Token-mean cross entropy over the held-out examples."""
    import torch

    total = tokens = 0.0
    model.eval()
    with torch.no_grad():
        for b in batches:
            out = model(**b)
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(out.loss) * n
            tokens += n
    model.train()
    return total / max(tokens, 1)


def load(task: str, bf16: bool, model_dir: str | None = None, random_init: bool = False,
         device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) for ``task``: the full fp32 (or bf16) model, or NF4 + LoRA, on ``device``.

    ``model_dir``: a model directory instead of the builtin SmolLM2 (which is re-saved from its
    GGUF once); ``random_init``: the same architecture from its config.json with random weights
    (memory and step time are those of the real model; the held-out loss is not meaningful), for
    machines the 98 MB checkpoint cannot reach. NF4 + LoRA needs the real weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from emoq.recipes.config import Recipe
    from emoq.recipes.model import load_qlora, load_tokenizer, resolve_model_dir

    recipe = Recipe(compute_dtype="float32")
    path = model_dir or resolve_model_dir(recipe)
    tokenizer = load_tokenizer(path, recipe)
    if task == "qlora":
        if random_init:
            raise ValueError("--random-init: the qlora task quantizes the real weights to NF4; it needs the checkpoint")
        return load_qlora(recipe, path), tokenizer
    dtype = torch.bfloat16 if bf16 else torch.float32
    if random_init:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device), tokenizer


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(name: str, task: str, steps: int, warmup: int, lr: float, threads: int, device: str = "cpu",
           model_dir: str | None = None, random_init: bool = False) -> dict:
    """One optimizer, in this (fresh) process."""
    import torch

    from emoq.recipes.config import Recipe
    from emoq.recipes.data import load_examples, split, tokenize

    common.pin_threads(threads)
    common.quiet()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tokenizer = load(task, "bf16 weights" in name, model_dir, random_init, device)
    device = str(next(model.parameters()).device)
    recipe = Recipe()
    train_rows, held_rows = split(load_examples(recipe), recipe)
    train = _batches(tokenize(train_rows, tokenizer, recipe.seq_len), recipe.batch_size, device)
    held = _batches(tokenize(held_rows, tokenizer, recipe.seq_len), recipe.eval_batch_size, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(name, params, lr)
    before = held_out_loss(model, held)
    load_s = time.perf_counter() - t0
    is_emo = common.is_emo(opt)
    step_s, opt_s, warm_s, tokens = [], [], [], []
    for i in range(warmup + steps):
        b = train[i % len(train)]
        _sync(device)
        t = time.perf_counter()
        loss = model(**b).loss
        loss.backward()
        _sync(device)
        t_opt = time.perf_counter()
        opt.step(loss=loss) if is_emo else opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        end = time.perf_counter()
        if i < warmup:
            warm_s.append(end - t)
        else:
            step_s.append(end - t)
            opt_s.append(end - t_opt)
            tokens.append(int((b["labels"][:, 1:] != -100).sum()))
    after = held_out_loss(model, held)
    med = statistics.median(step_s)
    return {
        "optimizer": name, "task": task, "threads": torch.get_num_threads(), "device": device,
        "random_init": random_init,
        "trainable_params": sum(p.numel() for p in params),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "state_mb": common.state_bytes(opt) / 2**20,
        "s_per_step": med, "opt_s_per_step": statistics.median(opt_s),
        "tokens_per_s": statistics.median(tokens) / med,
        "warmup_s": warm_s, "step_s": step_s, "load_s": load_s,
        "held_out_before": before, "held_out_after": after,
        "skipped_steps": getattr(opt, "skipped_steps", None), "pulse": getattr(opt, "pulse", None),
    }


def run_one(name: str, args: argparse.Namespace, task: str) -> dict:
    lr = args.adamw_lr if task == "full" else args.lora_lr
    cmd = [sys.executable, "-m", "bench.e2e", "--worker", name, "--task", task, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--lr", str(lr), "--device", args.device]
    cmd += ["--model-dir", args.model_dir] if args.model_dir else []
    cmd += ["--random-init"] if args.random_init else []
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    for line in proc.stdout.splitlines():
        if line.startswith("E2E "):
            return json.loads(line[4:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"optimizer": name, "task": task, "error": tail[0][:200]}


def table(rows: list[dict], base_name: str) -> str:
    base = next((r for r in rows if r.get("optimizer") == base_name and "error" not in r), None)
    out = []
    for r in rows:
        if "error" in r:
            out.append({"optimizer": r["optimizer"], "peak RSS MB": f"cannot run: {r['error']}"})
            continue
        out.append({"optimizer": r["optimizer"], "peak RSS MB": round(r["peak_rss_mb"]),
                    "peak CUDA MB": None if r.get("peak_cuda_mb") is None else round(r["peak_cuda_mb"]),
                    "state MB": round(r["state_mb"], 1), "s/step": round(r["s_per_step"], 3),
                    f"/ {base_name}": round(r["s_per_step"] / base["s_per_step"], 3) if base else None,
                    "opt s/step": round(r["opt_s_per_step"], 3), "tokens/s": round(r["tokens_per_s"], 1),
                    "held-out before": round(r["held_out_before"], 4), "held-out after": round(r["held_out_after"], 4)})
    cuda = any(r.get("peak_cuda_mb") is not None for r in rows)
    cols = ["optimizer", "peak RSS MB"] + (["peak CUDA MB"] if cuda else []) + [
            "state MB", "s/step", f"/ {base_name}", "opt s/step", "tokens/s",
            "held-out before", "held-out after"]
    return common.table(out, cols)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 6), squeeze=False)
    for ax, (task, rows) in zip(axes[0], results.items()):
        ok = [r for r in rows if "error" not in r]
        key = "peak_cuda_mb" if any(r.get("peak_cuda_mb") is not None for r in ok) else "peak_rss_mb"
        for r in ok:
            emo = r["optimizer"].startswith("Emo")
            ax.scatter(r["s_per_step"], r[key], c="tab:red" if emo else "tab:blue", s=20)
            ax.annotate(r["optimizer"], (r["s_per_step"], r[key]), fontsize=6)
        ax.set_xlabel("s / step")
        ax.set_ylabel("peak CUDA allocated (MB)" if key == "peak_cuda_mb" else "peak RSS (MB)")
        ax.set_title(f"SmolLM2-135M {task}: memory vs step time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", nargs="*", default=["full", "qlora"], choices=("full", "qlora"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adamw-lr", type=float, default=2e-5)
    ap.add_argument("--lora-lr", type=float, default=2e-4)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (peak CUDA memory is reported on cuda)")
    ap.add_argument("--model-dir", default=None, help="a model directory instead of the builtin SmolLM2")
    ap.add_argument("--random-init", action="store_true",
                    help="the model's architecture with random weights (full task; held-out loss not meaningful)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--lr", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("E2E " + json.dumps(worker(args.worker, args.task[0], args.steps, args.warmup, args.lr, args.threads,
                                         args.device, args.model_dir, args.random_init)), flush=True)
        return {}
    out = None if args.out is None else Path(args.out)
    results: dict[str, list[dict]] = {}
    suffix = "" if args.device == "cpu" else "_cuda"
    for task in args.task:
        names = [n for n in (FULL if task == "full" else QLORA) if not args.only or n in args.only]
        rows = []
        for name in names:
            r = run_one(name, args, task)
            rows.append(r)
            print(f"{task} {name:40s} " + (f"{r['s_per_step']:.2f} s/step, opt {r['opt_s_per_step']:.3f} s, "
                                            f"RSS {r['peak_rss_mb']:.0f} MB, held-out {r['held_out_after']:.4f}"
                                            if "error" not in r else r["error"]), flush=True)
        results[task] = rows
        print(f"\n{task}: {args.steps} timed steps after {args.warmup} warm-up, {args.threads} threads\n"
              + table(rows, "torch AdamW fused"))
        payload = {"env": common.environment(), "task": task, "device": args.device,
                   "random_init": args.random_init, "steps": args.steps, "warmup": args.warmup,
                   "adamw_lr": args.adamw_lr, "lora_lr": args.lora_lr, "rows": rows}
        print(f"wrote {common.write_json(f'e2e_{task}{suffix}.json', payload, out)}")
    if results:
        plot(results, (out or common.RESULTS) / f"e2e{suffix}.png")
    return results


if __name__ == "__main__":
    main()
