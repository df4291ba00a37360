"""Two gloo processes: the pulse sees the mean loss over ranks and replicas stay identical."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import emoq


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, family, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        opt = getattr(emoq, family)(ddp.parameters())
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, so its own loss
        local, pulses, skipped = [], [], []
        for step in range(8):
            x, y = torch.randn(16, 64, generator=g), torch.randint(0, 4, (16,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            if step == 5 and rank == 1:
                loss = torch.tensor(float("nan"))  # one rank's bad loss: every rank must skip
            local.append(loss.item())
            opt.step(loss=loss)
            pulses.append(opt.pulse)
            skipped.append(opt.skipped_steps)
        torch.save({"local": local, "pulses": pulses, "skipped": skipped,
                    "params": [p.detach().clone() for p in net.parameters()]}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # both ranks done communicating before teardown
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["EmoSens", "EmoCats"])
def test_two_gloo_ranks_share_the_mean_loss(family, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), family, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["local"][:5] != r1["local"][:5]  # the ranks really saw different losses
    assert r0["pulses"] == r1["pulses"]
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    assert r0["skipped"] == r1["skipped"] == [0] * 5 + [1] * 3
    ref = emoq.EmoPulse(noise_floor=getattr(emoq, family).noise_floor,
                        stop_thresholds=getattr(emoq, family).stop_thresholds)
    for step, (a, b) in enumerate(zip(r0["local"], r1["local"])):
        if step == 5:
            assert r0["pulses"][5] == r0["pulses"][4]  # skipped: pulse unchanged
            continue
        assert r0["pulses"][step] == ref.update((a + b) / 2)
