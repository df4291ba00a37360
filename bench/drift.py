"""How fast DDP replicas drift apart when each rank feeds the pulse its own loss.

emoq averages the loss over ranks before the pulse (one all-reduce of two scalars per step).
This script measures what that buys: two gloo processes train the same DDP model (an MLP on
sklearn's digits, each rank on its own half of the training set), once as shipped and once with
the all-reduce replaced by the rank's local loss (what a "no synchronisation needed" optimizer
does). DDP still averages the gradients, so any difference between the replicas comes from the
step size alone.

    python -m bench.drift [--steps 300] [--families EmoSens EmoAiry EmoCats EmoTion]

Writes bench/results/distributed_drift.json: per run (family x synced / local loss) the step at
which the ranks' pulses first differ and, every 50 steps, the largest and the relative L2
difference between the replicas and each rank's step size, as columns on one line per run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from bench.common import RESULTS, environment

FAMILIES = ("EmoSens", "EmoAiry", "EmoCats", "EmoTion")
EVERY = 50  # steps between recorded points
COLUMNS = ("step", "max_abs_diff", "rel_l2_diff", "eta_rank0", "eta_rank1")


def compact(curve: list[dict]) -> dict[str, list]:
    """A run's points (step 1 and every ``EVERY`` steps) as columns, 4 significant digits."""
    kept = [c for c in curve if c["step"] == 1 or c["step"] % EVERY == 0]
    return {k: [c[k] if k == "step" else float(f"{c[k]:.4g}") for c in kept] for k in COLUMNS}


def write_results(payload: dict, path=None) -> None:
    """The results as JSON with one line per run (the file stays a few KB)."""
    path = path or RESULTS / "distributed_drift.json"
    head = {k: v for k, v in payload.items() if k != "results"}
    lines = [json.dumps(head, indent=1)[:-2] + ',\n "results": {']
    runs = list(payload["results"].items())
    for i, (name, run) in enumerate(runs):
        lines.append(f"  {json.dumps(name)}: {json.dumps(run)}" + ("," if i < len(runs) - 1 else ""))
    lines.append(" }\n}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _data(rank: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    half = order[rank::2]  # each rank its own half
    return x[half], y[half]


def _local_loss(loss: float, finite_grads: bool, device) -> tuple[float, bool]:
    return loss, finite_grads and math.isfinite(loss)


def _worker(rank: int, port: int, steps: int, families: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import emoq
    import emoq.optim.base as base

    x, y = _data(rank)
    results = {}
    synced_reduce = base.reduce_loss
    for family in families:
        for mode in ("synced", "local loss"):
            base.reduce_loss = synced_reduce if mode == "synced" else _local_loss
            torch.manual_seed(0)
            net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
            ddp = torch.nn.parallel.DistributedDataParallel(net)
            opt = getattr(emoq, family)(ddp.parameters())
            g = torch.Generator().manual_seed(100 + rank)
            curve, first_pulse_split = [], None
            for step in range(1, steps + 1):
                idx = torch.randint(0, len(x), (32,), generator=g)
                opt.zero_grad()
                loss = F.cross_entropy(ddp(x[idx]), y[idx])
                loss.backward()
                opt.step(loss=loss)
                etas = [torch.zeros(1, dtype=torch.float64) for _ in range(2)]
                dist.all_gather(etas, torch.tensor([opt.pulse], dtype=torch.float64))
                if first_pulse_split is None and etas[0].item() != etas[1].item():
                    first_pulse_split = step
                if step % EVERY == 0 or step == 1:
                    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
                    both = [torch.empty_like(flat) for _ in range(2)]
                    dist.all_gather(both, flat)
                    diff = (both[0] - both[1]).abs()
                    curve.append({"step": step, "max_abs_diff": diff.max().item(),
                                  "rel_l2_diff": (diff.norm() / both[0].norm()).item(),
                                  "eta_rank0": etas[0].item(), "eta_rank1": etas[1].item()})
            results[f"{family} {mode}"] = {"first_pulse_split": first_pulse_split, **compact(curve)}
    base.reduce_loss = synced_reduce
    if rank == 0:
        torch.save(results, f"{out}/drift.pt")
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(port, args.steps, args.families, tmp), nprocs=2, join=True)
        results = torch.load(f"{tmp}/drift.pt", weights_only=False)
    print(f"{'run':24} {'pulse splits at':>15} {'max|dp| @100':>13} {'@' + str(args.steps):>10} "
          f"{'rel L2 @' + str(args.steps):>12}")
    for name, r in results.items():
        at100 = r["step"].index(100) if 100 in r["step"] else -1
        split = "never" if r["first_pulse_split"] is None else f"step {r['first_pulse_split']}"
        print(f"{name:24} {split:>15} {r['max_abs_diff'][at100]:13.2e} {r['max_abs_diff'][-1]:10.2e} "
              f"{r['rel_l2_diff'][-1]:12.2e}")
    write_results({"environment": environment(), "steps": args.steps,
                   "task": "digits MLP 64-128-10, batch 32 per rank, 2 ranks", "results": results})


if __name__ == "__main__":
    main()
