"""Quality at zero tuning: Emo family (lr=1.0) vs AdamW over an lr grid, Prodigy, schedule-free.

Task: an MLP (64-256-256-10) on sklearn's digits, 600 minibatch steps (batch 64), 3 seeds,
fp32 on CPU. Reports final train loss (mean of the last 20 steps) and held-out accuracy/loss.

    python -m bench.quality [--steps 600] [--seeds 3] [--out bench/results]

Writes quality_digits.json and quality_digits.png (training loss curves).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import emoq


def digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return xtr, ytr, xte, yte


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 10))


def optimizers() -> dict[str, callable]:
    import prodigyopt
    import schedulefree

    out = {f"{cls.__name__} (lr=1.0)": (lambda ps, c=cls: c(ps)) for cls in
           (emoq.EmoSens, emoq.EmoAiry, emoq.EmoCats, emoq.EmoTion)}
    for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2):
        out[f"AdamW lr={lr:g}"] = lambda ps, lr=lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.01)
    out["Prodigy (lr=1.0)"] = lambda ps: prodigyopt.Prodigy(ps, lr=1.0, weight_decay=0.01)
    out["AdamWScheduleFree (default lr)"] = lambda ps: schedulefree.AdamWScheduleFree(ps, weight_decay=0.01)
    return out


def run(make_opt, seed: int, steps: int, data) -> dict:
    xtr, ytr, xte, yte = data
    net = mlp(seed)
    opt = make_opt(list(net.parameters()))
    if hasattr(opt, "train"):
        opt.train()
    gen = torch.Generator().manual_seed(1000 + seed)
    curve = []
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (64,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
        loss.backward()
        if isinstance(opt, emoq.EmoOptimizer):
            opt.step(loss=loss)
        else:
            opt.step()
        curve.append(loss.item())
    if hasattr(opt, "eval"):
        opt.eval()
    with torch.no_grad():
        logits = net(xte)
        test_loss = F.cross_entropy(logits, yte).item()
        acc = (logits.argmax(1) == yte).float().mean().item()
    tail = curve[-20:]
    return {"train_loss": sum(tail) / len(tail), "test_loss": test_loss, "test_acc": acc, "curve": curve}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    data = digits_split()
    results = {}
    for name, make in optimizers().items():
        t0 = time.perf_counter()
        runs = [run(make, seed, args.steps, data) for seed in range(args.seeds)]
        agg = {k: [r[k] for r in runs] for k in ("train_loss", "test_loss", "test_acc")}
        results[name] = {
            **{f"{k}_mean": sum(v) / len(v) for k, v in agg.items()},
            **{f"{k}_all": v for k, v in agg.items()},
            "seconds": time.perf_counter() - t0,
            "curve_seed0": runs[0]["curve"],
        }
    adam = {k: v for k, v in results.items() if k.startswith("AdamW lr")}
    best_adam = min(adam, key=lambda k: adam[k]["test_loss_mean"])
    print(f"digits MLP, {args.steps} steps, batch 64, {args.seeds} seeds (mean); best AdamW by test loss: {best_adam}")
    print(f"{'optimizer':34s} {'train loss':>10s} {'test loss':>10s} {'test acc':>9s} {'test loss / best AdamW':>23s}")
    for name, r in results.items():
        ratio = r["test_loss_mean"] / results[best_adam]["test_loss_mean"]
        print(f"{name:34s} {r['train_loss_mean']:10.4f} {r['test_loss_mean']:10.4f} {r['test_acc_mean']:9.4f} "
              f"{ratio:23.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"task": "digits MLP 64-256-256-10", "steps": args.steps, "batch": 64, "seeds": args.seeds,
               "torch": torch.__version__, "best_adamw": best_adam,
               "results": {k: {kk: vv for kk, vv in v.items() if kk != "curve_seed0"} for k, v in results.items()}}
    (out / "quality_digits.json").write_text(json.dumps(summary, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for name, r in results.items():
            curve = torch.tensor(r["curve_seed0"])
            window = min(20, len(curve))
            smooth = torch.nn.functional.avg_pool1d(curve[None, None], window, 1)[0, 0]
            ax.plot(smooth.numpy(), label=name, lw=2 if "Emo" in name else 1, ls="-" if "Emo" in name else "--")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (20-step mean, seed 0)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "quality_digits.png", dpi=100)
    except ImportError:
        pass
    return summary


if __name__ == "__main__":
    main()
