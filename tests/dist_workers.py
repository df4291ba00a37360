"""Worker bodies of the two-process gloo tests (tests/test_core_distributed.py).

Each scenario runs its configurations inside ONE two-process spawn (process start and imports
dominate the cost), writes what it observed to ``{out}/{scenario}{rank}.pt``, and the test in
the parent process asserts on it. ``ddp`` and ``fsdp`` run emoq's eager reference path
(EMOQ_COMPILE=0) over every family x precision; ``compiled`` runs both on emoq's default
compiled path (sharded parameters stepped through their local shards) for one precision per
family, on a smaller net (compile time grows with the number of distinct shapes).
"""

from __future__ import annotations

import copy
import os
import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F

FAMILIES = ("EmoSens", "EmoAiry", "EmoCats", "EmoTion")
PRECISIONS = ("fp32", "bf16", "8bit", "4bit", "fp8")
CONFIGS = [(f, p) for f in FAMILIES for p in PRECISIONS]

# Linear layers (in, out). Weights (out, in), and what each exercises, sharded over 2 ranks:
# (64, 4096) factored, 8 192-element column statistics (low-bit), rows 32/32;
# (256, 64) a block holds 4 rows (row-aligned units of 4), rows 128/128;
# (33, 256) uneven rows 17/16, one block per row;
# (96, 33) below min_lowbit_size; (96, 96) uneven-safe but rows neither hold nor divide a block:
# low-bit unsharded, fp32 on every rank when sharded; (1, 96) rank 1 holds no row at all.
SHAPES = ((4096, 64), (64, 256), (256, 33), (33, 96), (96, 96), (96, 1))
# the compiled scenario, without biases (each distinct shape costs compiles): (32, 1024) factored,
# rows 16/16, low-bit m/v; two (32, 32) stepped as one stack; (1, 32): rank 1 holds no row
COMPILED_SHAPES = ((1024, 32), (32, 32), (32, 32), (32, 1))
COMPILED_CONFIGS = [("EmoSens", "8bit"), ("EmoAiry", "fp32"), ("EmoCats", "fp8"), ("EmoTion", "bf16")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, args: tuple, nprocs: int = 2, timeout: float = 900.0) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` that fails after ``timeout`` seconds
    instead of hanging the suite (a rank stuck in a collective, or in gloo's teardown, would
    otherwise block CI forever); the processes are killed first."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            raise TimeoutError(f"{nprocs} spawned ranks of {fn.__name__} still running after {timeout:.0f} s")


def make_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(SHAPES):
        layers.append(torch.nn.Linear(a, b, bias=SHAPES is not COMPILED_SHAPES))
        if i < len(SHAPES) - 1:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def batch(rank: int, step: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of one rank at one step (a fixed function of both, so a resumed run sees the same)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, SHAPES[0][0], generator=g), torch.randn(n, 1, generator=g)


def optimizer(family: str, params, precision: str):
    import emoq

    return getattr(emoq, family)(params, state_precision=precision)


def main(rank: int, world: int, port: int, scenario: str, out: str) -> None:
    global SHAPES
    compiled = scenario == "compiled"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), EMOQ_COMPILE="1" if compiled else "0",
                      EMOQ_TEST_OUT=out)
    torch.set_num_threads(1)
    if compiled:
        SHAPES = COMPILED_SHAPES
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if compiled:
            results = {cfg: {"ddp": _ddp(rank, *cfg), "fsdp": _fsdp(rank, *cfg)} for cfg in COMPILED_CONFIGS}
        else:
            results = {cfg: globals()[f"_{scenario}"](rank, *cfg) for cfg in CONFIGS}
        dist.barrier()  # both ranks done communicating before teardown
    finally:
        dist.destroy_process_group()
    if rank == 0:  # single-process runs, same threads, no process group
        for cfg, res in results.items():
            if scenario == "ddp":
                res.update(_ddp_reference(*cfg, res))
            elif compiled:
                res["ddp"].update(_ddp_reference(*cfg, res["ddp"]))
    torch.save(results, f"{out}/{scenario}{rank}.pt")


def _params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


# ---------------------------------------------------------------------- DDP
DDP_STEPS = 5
NAN_STEP = 3  # rank 1's loss is NaN at this step: every rank must skip it


def _ddp(rank: int, family: str, precision: str) -> dict:
    """DDP, 2 micro-batches per update (the first under no_sync), different data per rank."""
    net = make_net()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = optimizer(family, ddp.parameters(), precision)
    micro, pulses, last_losses, skipped = [], [], [], []
    for step in range(DDP_STEPS):
        x, y = batch(rank, step, 16)
        opt.zero_grad()
        losses = []
        for k, ctx in enumerate((ddp.no_sync, _nullcontext)):
            with ctx():
                loss = F.mse_loss(ddp(x[8 * k:8 * k + 8]), y[8 * k:8 * k + 8])
                (loss / 2).backward()
            if step == NAN_STEP and rank == 1 and k == 1:
                loss = torch.tensor(float("nan"))
            losses.append(loss.item())
            opt.record_loss(loss)
        opt.step()
        micro.append(losses)
        pulses.append(opt.pulse)
        last_losses.append(opt.last_loss)
        skipped.append(opt.skipped_steps)
    return {"micro": micro, "pulses": pulses, "last_losses": last_losses, "skipped": skipped,
            "params": _params(net)}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _ddp_reference(family: str, precision: str, res: dict) -> dict:
    """Two single-process runs on rank 0 after the process group is gone.

    ``same_math``: each rank's accumulated gradient computed here, averaged like DDP's
    all-reduce, the loss the DDP run consumed: the DDP replicas must equal it bit for bit.
    ``global_batch``: one forward/backward on all 32 examples of the update: its loss and
    gradient equal the DDP ones within float tolerance (another summation order). It is given
    the DDP run's loss: fed its own, a last-bit difference can flip SPEC step 2's rounding-
    accident branch and change the pulse by a large factor (measured here: 0.00186 vs 0.003),
    which is the pulse's quirk, not a distribution effect.
    """
    exact, glob = make_net(), make_net()
    opt_exact, opt_glob = optimizer(family, exact.parameters(), precision), optimizer(family, glob.parameters(),
                                                                                        precision)
    glob_losses, glob_pulses = [], []
    for step in range(DDP_STEPS):
        if step == NAN_STEP:
            continue  # skipped everywhere
        per_rank = []
        for r in range(2):
            exact.zero_grad()
            x, y = batch(r, step, 16)
            for k in range(2):
                (F.mse_loss(exact(x[8 * k:8 * k + 8]), y[8 * k:8 * k + 8]) / 2).backward()
            per_rank.append([p.grad.clone() for p in exact.parameters()])
        for p, g0, g1 in zip(exact.parameters(), *per_rank):
            p.grad = g0 / 2 + g1 / 2
        opt_exact.step(loss=res["last_losses"][step])
        xs, ys = zip(*(batch(r, step, 16) for r in range(2)))
        glob.zero_grad()
        loss = F.mse_loss(glob(torch.cat(xs)), torch.cat(ys))
        loss.backward()
        glob_losses.append(loss.item())
        opt_glob.step(loss=res["last_losses"][step])  # the same pulse: see the docstring
        glob_pulses.append(opt_glob.pulse)
    return {"same_math": _params(exact), "global_batch": _params(glob), "global_pulses": glob_pulses,
            "global_losses": glob_losses}


# ---------------------------------------------------------------------- FSDP2
FSDP_STEPS = 4  # before the checkpoint
RESUME_STEPS = 3  # after it
NAN_GRAD_STEP = 2  # rank 1's shard of the first weight gets a NaN gradient: every rank must skip


def _shard(net: torch.nn.Module, mesh=None) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:  # a CPU mesh also where CUDA exists (fully_shard's default would move the net there)
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    for m in net:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def _fsdp_step(net, opt, rank: int, step: int) -> None:
    x, y = batch(rank, step)
    opt.zero_grad()
    loss = F.mse_loss(net(x), y)
    loss.backward()
    if step == NAN_GRAD_STEP and rank == 1:
        with torch.no_grad():
            next(net.parameters()).grad.to_local()[0, 0] = float("nan")
    opt.step(loss=loss)


def _full(net) -> list[torch.Tensor]:
    return [p.detach().full_tensor().clone() for p in net.parameters()]


def _hsdp_matches_fsdp(rank: int, family: str, precision: str) -> bool:
    """HSDP placements (Replicate(), Shard(0)) on a 1 x 2 mesh: the same steps as plain FSDP2."""
    from torch.distributed.device_mesh import init_device_mesh

    runs = []
    for mesh in (None, init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))):
        net = _shard(make_net(), mesh)
        opt = optimizer(family, net.parameters(), precision)
        for step in range(3):
            _fsdp_step(net, opt, rank, 10 + step)
        runs.append((_full(net), opt.pulse, str(next(net.parameters()).placements)))
    (a, pa, _), (b, pb, placements) = runs
    return pa == pb and "Replicate" in placements and all(torch.equal(x, y) for x, y in zip(a, b))


def _unsupported_placement(family: str, precision: str) -> str:
    """A tensor-parallel style Shard(1) parameter is refused before anything is touched."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    plain = torch.nn.Parameter(distribute_tensor(torch.ones(4, 6), mesh, [Shard(0)]))
    column = torch.nn.Parameter(distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)]))
    opt = optimizer(family, [plain, column], precision)
    for p in (plain, column):
        p.grad = distribute_tensor(torch.ones(4, 6), mesh, p.placements)
    try:
        opt.step(loss=1.0)
    except NotImplementedError as err:
        untouched = (opt.pulse is None and not opt.state and bool((plain.to_local() == 1).all()))
        return f"{'untouched' if untouched else 'TOUCHED'}: {err}"
    return "accepted"


def _unsharded_states(family: str, precision: str, q: torch.Tensor) -> list:
    """The states an unsharded optimizer allocates for ``q`` (no step, so no collective)."""
    states: dict = {}
    optimizer(family, [q], precision)._init_state(q, states)
    return list(states.values())


def _count_all_reduce(fn) -> list[int]:
    """The sizes of the ``all_reduce`` calls made while ``fn()`` runs."""
    calls, real = [], dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        fn()
    finally:
        dist.all_reduce = real
    return calls


def _fsdp(rank: int, family: str, precision: str) -> dict:
    """FSDP2 (fully_shard on every Linear and the model), different data per rank.

    1. Each step is compared with an unsharded replica of the model on this rank, given the
       gathered gradient and the loss the sharded optimizer consumed (the states of a parameter
       whose shards cannot hold whole blocks are fp32 when sharded: its replica is an fp32
       optimizer fed the same loss, so the same pulse).
    2. Checkpoint after FSDP_STEPS steps three ways, run RESUME_STEPS more, then resume each way
       and run the same steps: (a) torch.distributed.checkpoint directly on ``state_dict()``,
       loaded into the advanced run (a rollback); (b) get_/set_optimizer_state_dict through DCP
       into a fresh model and optimizer; (c) full state dicts (gathered, torch.save on rank 0,
       broadcast from rank 0 on load: accelerate's FULL_STATE_DICT); (d) that full state dict
       given to ``opt.load_state_dict`` on every rank (each keeps its rows).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    import emoq
    from emoq.states import is_lowbit

    net = make_net()
    replica = copy.deepcopy(net)
    _shard(net)
    opt = optimizer(family, net.parameters(), precision)
    replica_opts = None
    out: dict = {"skipped": [], "pulses": []}
    for step in range(FSDP_STEPS):
        if step == 1:  # count the step's collectives: the loss mean and one sum over shards
            out["collectives"] = _count_all_reduce(lambda: _fsdp_step(net, opt, rank, 1))
        else:
            _fsdp_step(net, opt, rank, step)
        grads = [p.grad.full_tensor() for p in net.parameters()]
        if replica_opts is None:  # after the first step, when the sharded states exist
            fallback = [q for p, q in zip(net.parameters(), replica.parameters())
                        if opt.state[p] and not any(is_lowbit(s) for s in opt.state[p].values())
                        and any(is_lowbit(s) for s in _unsharded_states(family, precision, q))]
            rest = [q for q in replica.parameters() if all(q is not f for f in fallback)]
            replica_opts = [optimizer(family, rest, precision)] + (
                [optimizer(family, fallback, "fp32")] if fallback else [])
            out["fallback"] = len(fallback)
        for q, g in zip(replica.parameters(), grads):
            q.grad = g
        skipped_now = opt.skipped_steps > (out["skipped"][-1] if out["skipped"] else 0)
        for o in replica_opts:  # a skipped step is skipped by every replica optimizer (the fp32 one has no NaN)
            o.step(loss=float("nan") if skipped_now else opt.last_loss)
        out["skipped"].append(opt.skipped_steps)
        out["pulses"].append(opt.pulse)
    out["sharded"] = _full(net)
    out["replica"] = _params(replica)
    out["replica_pulse"] = replica_opts[0].pulse
    out["layout"] = {name: {k: (tuple(s.shape), type(s).__name__) for k, s in opt.state[p].items()}
                     for name, p in net.named_parameters()}
    full = get_optimizer_state_dict(net, opt, options=StateDictOptions(full_state_dict=True))
    ref_states = {}
    for o in replica_opts:
        sd, names = o.state_dict(), {id(q): n for n, q in replica.named_parameters()}
        flat = [q for g in o.param_groups for q in g["params"]]
        ref_states.update({names[id(flat[i])]: st for i, st in sd["state"].items()})
    out["states"] = {name: (full["state"].get(name, {}), ref_states.get(name, {})) for name, _ in
                     net.named_parameters()}

    # ---- checkpoints
    work = f"{os.environ['EMOQ_TEST_OUT']}/{family}-{precision}"  # the same folder on both ranks
    direct, via_dsd = f"{work}/direct", f"{work}/dsd"
    dcp.save({"model": net.state_dict(), "optim": opt.state_dict()}, checkpoint_id=direct)
    dcp.save({"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}, checkpoint_id=via_dsd)
    full_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_model, full_optim = get_model_state_dict(net, options=full_opts), get_optimizer_state_dict(net, opt,
                                                                                                  options=full_opts)
    if rank == 0:
        torch.save({"model": full_model, "optim": full_optim}, f"{work}/full.pt")

    def run_on(n, o) -> tuple[list, list]:
        pulses = []
        for step in range(FSDP_STEPS, FSDP_STEPS + RESUME_STEPS):
            _fsdp_step(n, o, rank, step)
            pulses.append(o.pulse)
        return _full(n), pulses

    out["want"] = run_on(net, opt)
    if (family, precision) == CONFIGS[0]:
        out["refused"] = _unsupported_placement(family, precision)
    if (family, precision) == ("EmoAiry", "8bit"):
        out["hsdp"] = _hsdp_matches_fsdp(rank, family, precision)
    # (a) direct DCP, into the advanced run
    template = {"model": net.state_dict(), "optim": opt.state_dict()}
    dcp.load(template, checkpoint_id=direct)

    opt.load_state_dict(template["optim"])
    out["direct"] = run_on(net, opt)
    # (b) get_/set_ through DCP into a fresh model and optimizer
    net2 = _shard(make_net())
    opt2 = optimizer(family, net2.parameters(), precision)
    before = _full(net2)
    sd = {"model": get_model_state_dict(net2), "optim": get_optimizer_state_dict(net2, opt2)}  # fake init step
    out["init_step_noop"] = (opt2.pulse is None and opt2.skipped_steps == 0 and opt2.emo_pulse.steps == 0
                             and all(torch.equal(a, b) for a, b in zip(before, _full(net2))))
    dcp.load(sd, checkpoint_id=via_dsd)
    set_model_state_dict(net2, sd["model"])
    set_optimizer_state_dict(net2, opt2, sd["optim"])
    out["dsd"] = run_on(net2, opt2)
    # (c) full state dicts, broadcast from rank 0
    net3 = _shard(make_net())
    opt3 = optimizer(family, net3.parameters(), precision)
    saved = torch.load(f"{work}/full.pt", weights_only=True) if rank == 0 else {"model": {}, "optim": {}}
    bcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(net3, saved["model"], options=bcast)
    set_optimizer_state_dict(net3, opt3, saved["optim"], options=bcast)
    out["full"] = run_on(net3, opt3)
    # (d) the same full state dict, read by every rank and given to opt.load_state_dict: each
    # rank keeps its own rows
    dist.barrier()  # rank 0 wrote full.pt
    net4 = _shard(make_net())
    opt4 = optimizer(family, net4.parameters(), precision)
    saved = torch.load(f"{work}/full.pt", weights_only=True)
    set_model_state_dict(net4, saved["model"], options=StateDictOptions(full_state_dict=True))
    opt4.load_state_dict(saved["optim"])
    out["full_plain"] = run_on(net4, opt4)
    del emoq
    return out


def sleep_forever(rank: int) -> None:
    """A rank that never finishes (tests/test_core_distributed.py: the spawn timeout)."""
    import time

    time.sleep(3600)
