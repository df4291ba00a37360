"""Two gloo processes on CPU, every family x state precision per scenario (one spawn each).

DDP: replicas stay bit-identical while ranks see different data and losses; the step is the
single-process step on the rank-averaged gradient bit for bit; the pulse consumes the mean
over micro-batches and ranks; a NaN on one rank skips the step everywhere.
FSDP2: states are shards (low-bit included, decided alike on every rank); steps equal an
unsharded replica's; torch.distributed.checkpoint resumes exactly, pulse included.
The worker bodies are in tests/dist_workers.py.
"""

import math

import pytest
import torch

import emoq
from tests import dist_workers as W


@pytest.fixture(scope="module")
def spawn(tmp_path_factory):
    results = {}

    def run(scenario):
        if scenario not in results:
            out = tmp_path_factory.mktemp(scenario)
            W.spawn(W.main, (2, W.free_port(), scenario, str(out)))
            results[scenario] = [torch.load(out / f"{scenario}{r}.pt", weights_only=False) for r in (0, 1)]
        return results[scenario]

    return run


def test_spawn_fails_after_its_timeout_and_kills_the_ranks():
    # a hung rank (a collective that never completes, gloo's teardown) fails the test, not CI
    import time

    t = time.monotonic()
    with pytest.raises(TimeoutError, match="still running"):
        W.spawn(W.sleep_forever, (), timeout=3)
    assert time.monotonic() - t < 60


def equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
def test_ddp_every_family_and_precision(spawn):
    r0, r1 = spawn("ddp")
    for cfg in W.CONFIGS:
        check_ddp(cfg, r0[cfg], r1[cfg])


def check_ddp(cfg, a, b):
    """One DDP run (both ranks' observations) against its single-process references."""
    assert a["micro"][0] != b["micro"][0], cfg  # the ranks really saw different losses
    assert equal(a["params"], b["params"]), f"{cfg}: replicas differ"
    assert a["pulses"] == b["pulses"] and a["skipped"] == b["skipped"] == [0, 0, 0, 1, 1], cfg
    family = getattr(emoq, cfg[0])
    ref = emoq.EmoPulse(noise_floor=family.noise_floor, stop_thresholds=family.stop_thresholds)
    for step in range(W.DDP_STEPS):
        if step == W.NAN_STEP:  # one rank's NaN: skipped everywhere, pulse and last loss unchanged
            assert a["pulses"][step] == a["pulses"][step - 1]
            assert a["last_losses"][step] == a["last_losses"][step - 1]
            continue
        # the pulse's loss: mean over the 2 micro-batches, then over the 2 ranks
        want = (sum(a["micro"][step]) / 2 + sum(b["micro"][step]) / 2) / 2
        assert a["last_losses"][step] == pytest.approx(want, rel=1e-6), (cfg, step)
        assert a["pulses"][step] == ref.update(a["last_losses"][step]), (cfg, step)
    # same arithmetic in one process (gradients averaged like DDP's all-reduce): bit for bit
    assert equal(a["params"], a["same_math"]), f"{cfg}: DDP differs from one process on the averaged gradient"
    # one forward/backward on the global batch: the loss within float tolerance, and given the
    # same pulse (see dist_workers._ddp_reference) the parameters too
    applied = [s for s in range(W.DDP_STEPS) if s != W.NAN_STEP]
    assert a["global_losses"] == pytest.approx([a["last_losses"][s] for s in applied], rel=1e-6), cfg
    travel = sum(a["pulses"][s] for s in applied)  # sum of the step sizes applied
    moved = [(x - y).abs() for x, y in zip(a["params"], a["global_batch"])]
    if cfg[1] == "fp32":
        assert max(m.max().item() for m in moved) < 1e-6, cfg
    else:  # rounded states: an entry whose state lands on the neighbouring code or bf16 value
        # takes a slightly different step; each stays within the steps' total size, and few move
        assert max(m.max().item() for m in moved) < travel, cfg
        assert sum(int((m > 1e-6).sum()) for m in moved) < 1e-2 * sum(m.numel() for m in moved), cfg


def _values(value):
    """A saved state's values (low-bit: dequantized) and, for low-bit, its raw codes and scales."""
    from emoq.states import StateStorage

    if isinstance(value, dict):
        return StateStorage("fp32").import_(value, signed=True, device="cpu").reshape(-1), [
            value["codes"].reshape(-1), value["scale"].reshape(-1)]
    return value.float().reshape(-1), [value.reshape(-1)]


@pytest.mark.slow
def test_fsdp2_every_family_and_precision(spawn):
    r0, r1 = spawn("fsdp")
    for cfg in W.CONFIGS:
        family, precision = cfg
        a, b = r0[cfg], r1[cfg]
        lay0, lay1 = a["layout"], b["layout"]
        # every state is a shard of its parameter's rows (or whole: column statistics); the same
        # storage decision on both ranks, even where rank 1 holds no row
        assert lay0.keys() == lay1.keys()
        for name in lay0:
            assert {n: t for n, (_, t) in lay0[name].items()} == {n: t for n, (_, t) in lay1[name].items()}, name
        w0 = "0.weight"  # (64, 4096): rows 32 + 32
        if family in ("EmoSens", "EmoCats"):
            assert lay0[w0]["m"][0] == lay1[w0]["m"][0] == (32, 4096)
            assert lay1["10.weight"]["m"][0] == (0, 96)  # the one-row layer: rank 1 is empty
            lowbit = precision in ("8bit", "4bit", "fp8")
            assert (lay0[w0]["m"][1] != "Tensor") == lowbit
            assert (lay0["4.weight"]["m"][1] != "Tensor") == lowbit  # (33, 256): uneven rows 17 / 16
            assert lay0["8.weight"]["m"][1] == "Tensor"  # (96, 96): no whole blocks per shard -> fp32
            assert a["fallback"] == (1 if lowbit else 0)
        else:
            assert lay0[w0]["row"][0][0] == 32 and lay0[w0]["col"][0][-1] == 4096  # rows split, columns whole
            assert (lay0[w0]["col"][1] != "Tensor") == (precision in ("8bit", "4bit", "fp8"))
            assert lay1["10.weight"] == {}  # not factored: no state
        check_fsdp(cfg, a, b)
        if cfg == ("EmoAiry", "8bit"):  # HSDP placements (Replicate(), Shard(0)): the same steps
            assert a["hsdp"] and b["hsdp"]
        if cfg == W.CONFIGS[0]:  # tensor parallel style Shard(1): refused before anything is touched
            assert a["refused"].startswith("untouched: ") and "Shard(dim=1)" in a["refused"], a["refused"]


@pytest.mark.slow
def test_compiled_path_ddp_and_fsdp2(spawn):
    """emoq's default (compiled) path under DDP and FSDP2: the compiled functions get the local
    shards (never a DTensor), and every equality of the two tests above holds on that path too."""
    r0, r1 = spawn("compiled")
    assert list(r0) == W.COMPILED_CONFIGS
    for cfg in W.COMPILED_CONFIGS:
        check_ddp(cfg, r0[cfg]["ddp"], r1[cfg]["ddp"])
        a, b = r0[cfg]["fsdp"], r1[cfg]["fsdp"]
        check_fsdp(cfg, a, b)
        if cfg[0] in ("EmoSens", "EmoCats"):  # (32, 1024) rows 16/16 (low-bit where asked); (1, 32) empty on rank 1
            assert a["layout"]["0.weight"]["m"][0] == b["layout"]["0.weight"]["m"][0] == (16, 1024)
            assert (a["layout"]["0.weight"]["m"][1] != "Tensor") == (cfg[1] != "fp32")
            assert b["layout"]["6.weight"]["m"][0] == (0, 32)
        else:
            assert a["layout"]["0.weight"]["row"][0][0] == 16 and a["layout"]["0.weight"]["col"][0][-1] == 1024


def check_fsdp(cfg, a, b):
    """One FSDP2 run against its unsharded replica and the four resumes."""
    # the steps: the unsharded replica given the gathered gradient, bit for bit; the NaN in
    # one rank's shard skipped the step on both ranks
    assert a["skipped"] == b["skipped"] == [0, 0, 1, 1] and a["pulses"] == b["pulses"]
    assert a["pulses"][-1] == a["replica_pulse"]
    assert equal(a["sharded"], a["replica"]), f"{cfg}: sharded steps differ from the unsharded ones"
    for name, (got, want) in a["states"].items():
        assert got.keys() == want.keys(), (cfg, name)
        for state in got:
            (x, raw_x), (y, raw_y) = _values(got[state]), _values(want[state])
            if state == "col":  # a mean over all rows: the shards' partial sums all-reduced, another
                # summation order, so equal within rounding relative to the largest entry
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())
            else:  # per-row and element-wise states: bit for bit, low-bit codes included
                assert equal(raw_x, raw_y), (cfg, name, state)
    # one step's collectives: one all-reduce of every shard's partial sums (a column-sized vector
    # per factored weight, one or two scalars per other parameter), then the loss mean (2 scalars)
    assert len(a["collectives"]) == 2 and a["collectives"][1] == 2, a["collectives"]
    # the fake initialisation step of get_optimizer_state_dict changed nothing
    assert a["init_step_noop"] and b["init_step_noop"], cfg
    # resume after the checkpoint: same parameters and pulses as the uninterrupted run
    want_params, want_pulses = a["want"]
    for how in ("direct", "dsd", "full", "full_plain"):
        got_params, got_pulses = a[how]
        assert got_pulses == want_pulses and equal(got_params, want_params), (cfg, how)
    assert all(math.isfinite(x) for x in want_pulses)
