"""Shared helpers of the bench scripts: threads, parameter sets, optimizers, state bytes, output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def pin_threads(n: int = 2) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def environment() -> dict[str, Any]:
    import emoq

    env = {"torch": torch.__version__, "emoq": emoq.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "threads": torch.get_num_threads(),
           "cpu": _cpu_name(), "emoq_compile": os.environ.get("EMOQ_COMPILE", "1"),
           # glibc allocator settings change step times (page faults of large temporaries: bench/README.md)
           "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}}
    for mod in ("torchao", "bitsandbytes"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - report, do not fail
            env[mod] = f"unavailable ({type(exc).__name__})"
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ---------------------------------------------------------------------- parameter sets
def big_weight(device: str = "cpu") -> list[torch.nn.Parameter]:
    """One 4096 x 4096 fp32 weight."""
    return [torch.nn.Parameter((torch.randn(4096, 4096) * 0.02).to(device))]


def lora_set(layers: int = 30, hidden: int = 576, kv: int = 192, inter: int = 1536, r: int = 8,
             device: str = "cpu") -> list[torch.nn.Parameter]:
    """LoRA A/B matrices (r=8) on q,k,v,o,gate,up,down of a SmolLM2-135M-shaped model."""
    shapes = []
    for out_f, in_f in [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden),
                        (inter, hidden), (hidden, inter)]:
        shapes += [(r, in_f), (out_f, r)]
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device)) for _ in range(layers) for s in shapes]


def set_grads(params: list[torch.nn.Parameter], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(p.device)


# ---------------------------------------------------------------------- optimizers
def emo_optimizers() -> dict[str, Callable[[list], Any]]:
    import emoq

    out: dict[str, Callable[[list], Any]] = {}
    for fam in ("EmoSens", "EmoAiry", "EmoCats", "EmoTion"):
        cls = getattr(emoq, fam)
        for prec in ("fp32", "bf16", "8bit", "4bit", "fp8"):
            out[f"{fam} {prec}"] = lambda ps, c=cls, pr=prec: c(ps, state_precision=pr)
    return out


def peer_optimizers() -> dict[str, Callable[[list], Any]]:
    out: dict[str, Callable[[list], Any]] = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
    }

    def bnb8(ps):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(ps, lr=1e-4)

    def ao(name):
        def make(ps):
            import torchao.optim

            return getattr(torchao.optim, name)(ps, lr=1e-4)
        return make

    out["bnb AdamW8bit"] = bnb8
    out["torchao AdamW8bit"] = ao("AdamW8bit")
    out["torchao AdamW4bit"] = ao("AdamW4bit")
    out["torchao AdamWFp8"] = ao("AdamWFp8")
    return out


def is_emo(opt: Any) -> bool:
    import emoq

    return isinstance(opt, emoq.EmoOptimizer)


def step(opt: Any, i: int) -> None:
    if is_emo(opt):
        opt.step(loss=2.0 / (1.0 + 0.01 * i))  # a synthetic, slowly falling loss
    else:
        opt.step()


# ---------------------------------------------------------------------- measuring
def tensor_bytes(t: torch.Tensor, seen: set[int]) -> int:
    """Bytes of a tensor, looking inside tensor subclasses (torchao), each storage counted once."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n), seen) for n in names)
    try:  # a state may be a view of a buffer it shares (stacked small parameters): count the buffer once
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
    except Exception:  # noqa: BLE001
        key, nbytes = id(t), t.numel() * t.element_size()
    if key in seen and key != 0:
        return 0
    seen.add(key)
    return nbytes


def state_bytes(opt: Any) -> int:
    seen: set[int] = set()
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += tensor_bytes(v, seen)
    return total


def timed(fn: Callable[[], None], sync: bool = False) -> float:
    """Seconds ``fn`` takes (``sync``: waiting for the CUDA device before and after)."""
    if sync:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def quiet() -> None:
    warnings.filterwarnings("ignore", message=".*Enum subclass.*")
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


# ---------------------------------------------------------------------- output
def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def write_json(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    out = out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path
