"""The Trainer, TRL's SFTTrainer and `emoq finetune` in two CPU processes under torchrun.

One ``torchrun --nproc_per_node=2`` launch runs every scenario of tests/dist_trainer.py in the
same two processes (process start and imports dominate the cost): DDP and FSDP2 Trainer runs
with a checkpoint and ``resume_from_checkpoint``, SFTTrainer, and the CLI.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

from emoq.recipes.output import MARKER  # noqa: E402
from tests.tiny_llm import save_tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["ddp", "recheck", "sft", "cli", "fsdp2", "fsdp2-full"]  # fsdp2* last (see tests/dist_trainer.py)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def two_processes(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    env = dict(os.environ, EMOQ_COMPILE="0", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "tests.dist_trainer", str(tiny_dir), str(out), *SCENARIOS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, failure_report(out, proc.stderr)
    return out, {s: [json.loads((out / f"{s}-rank{r}.json").read_text()) for r in (0, 1)] for s in SCENARIOS}


def failure_report(out, stderr):
    """What a failed launch shows: the scenarios each rank finished and its stderr without the
    progress bars (which otherwise fill the tail a failure message keeps)."""
    done = sorted(p.name for p in out.glob("*-rank*.json"))
    lines = [line for line in stderr.splitlines() if not re.search(r"(examples|it)/s\]", line)]
    return f"finished: {done}\n" + "\n".join(lines)[-6000:]


def check_run(run, world, *, loss_rel):
    logs = run["logs"]
    assert len(logs) == 4 and run["world"] == world and run["skipped"] == 0
    for entry in logs:
        # the pulse consumed the loss the Trainer logged: with several processes both are the mean
        # over ranks (emoq in float64, the Trainer in float32), so equal within float rounding
        assert entry["emo_loss"] == pytest.approx(entry["loss"], rel=loss_rel, abs=0)
        assert entry["learning_rate"] == entry["emo_pulse"]
    assert run["pulse_state"]["steps"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["ddp", "recheck", "fsdp2", "fsdp2-full"])
def test_trainer_two_processes_and_resume(two_processes, scenario):
    _, results = two_processes
    r0, r1 = results[scenario]
    for r in (r0, r1):
        check_run(r["full"], 2, loss_rel=1e-6)
    # both ranks saw the same pulse history (the loss all-reduce) and logged the same
    assert r0["full"]["pulse_state"] == r1["full"]["pulse_state"] and r0["full"]["logs"] == r1["full"]["logs"]
    if scenario in ("ddp", "recheck"):
        assert r0["full"]["wrapped"] == "DistributedDataParallel" and r0["full"]["param_types"] == ["Parameter"]
        assert "optimizer.pt" in r0["full"]["checkpoint"]
        # the recheck's ratio average: recorded, the same on both ranks (checked above), resumed below
        assert (r0["full"]["pulse_state"].get("ratio_avg") is not None) == (scenario == "recheck")
    else:  # FSDP2: DTensor parameters, sharded low-bit states, accelerate's FSDP2 checkpoints
        assert r0["full"]["param_types"] == ["DTensor"] and r0["full"]["lowbit_states"] > 0
        want = "optimizer_0" if scenario == "fsdp2" else "optimizer.bin"  # DCP folder / full state dict
        assert want in r0["full"]["checkpoint"]
    # resume_from_checkpoint at step 2 continues the pulse exactly: same state after step 4
    for r in (r0, r1):
        assert r["resumed"]["pulse_state"] == r["full"]["pulse_state"]
        tail = [(h["loss"], h["emo_pulse"]) for h in r["resumed"]["logs"] if h["step"] > 2]
        assert tail == [(h["loss"], h["emo_pulse"]) for h in r["full"]["logs"][2:]]


@pytest.mark.slow
def test_sft_trainer_two_processes(two_processes):
    _, results = two_processes
    r0, r1 = results["sft"]
    check_run(r0["full"], 2, loss_rel=1e-6)
    assert r0["full"]["pulse_state"] == r1["full"]["pulse_state"]
    assert r0["full"]["wrapped"] == "DistributedDataParallel"


def test_sft_trainer_one_process(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EMOQ_COMPILE", "0")
    from tests.dist_trainer import run

    result = run(tiny_dir, tmp_path, "sft")["full"]
    check_run(result, 1, loss_rel=0)  # one process: exactly the logged loss
    assert result["optimizer"] == "EmoSens"


@pytest.mark.slow
def test_finetune_cli_writes_only_on_rank_0(two_processes):
    out, results = two_processes
    r0, r1 = results["cli"]
    assert r0["code"] == r1["code"] == 0
    assert len(r0["made"]) == 1 and r1["made"] == []  # only the main process made the output folder
    assert "held-out loss" in r0["printed"] and r1["printed"] == ""
    run = out / "cli-run"
    assert sorted(p.name for p in run.iterdir()) == [MARKER, "adapter", "loss_pulse.png", "metrics.json"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["main_process"] and metrics["steps"] == 2
    assert not list(out.glob(".cli-run.partial-*"))
