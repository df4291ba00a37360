"""`emoq finetune`: a QLoRA fine-tune in the Hugging Face Trainer with an emoq optimizer."""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from emoq.recipes.config import Recipe, RecipeError


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / (1024 if sys.platform == "darwin" else 1)


def evaluate(trainer: Any, dataset: Any) -> dict[str, float]:
    loss = trainer.evaluate(eval_dataset=dataset)["eval_loss"]
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}


def plot(history: list[dict[str, Any]], path: Path, title: str, evals: list[tuple[int, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [h for h in history if "loss" in h and "emo_pulse" in h]
    steps = [h["step"] for h in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    losses = [h["loss"] for h in rows]
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, label="train loss")
    window = min(10, len(losses))
    if window > 1:
        smooth = [sum(losses[i - window + 1:i + 1]) / window for i in range(window - 1, len(losses))]
        ax.plot(steps[window - 1:], smooth, color="tab:blue", label=f"train loss ({window}-step mean)")
    ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", color="tab:green", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["emo_pulse"] for h in rows], color="tab:red", label="emoPulse η")
    ax2.set_ylabel("step size η")
    ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_arguments(recipe: Recipe, output_dir: Path, progress: bool = True) -> Any:
    """The recipe's ``TrainingArguments`` (constant schedule, no checkpoints, CPU when no CUDA, FSDP
    when the recipe has ``fsdp_config``)."""
    from transformers import TrainingArguments

    from emoq.recipes.model import compute_dtype

    dtype = compute_dtype(recipe)
    fsdp = {} if recipe.fsdp_config is None else {"fsdp": True, "fsdp_config": dict(recipe.fsdp_config)}
    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=recipe.eval_batch_size, gradient_accumulation_steps=recipe.grad_accum,
        max_steps=recipe.max_steps, logging_steps=recipe.logging_steps, lr_scheduler_type="constant",
        weight_decay=recipe.weight_decay, seed=recipe.seed, report_to=[], save_strategy="no",
        disable_tqdm=not progress, bf16=dtype == torch.bfloat16 and torch.cuda.is_available(),
        fp16=dtype == torch.float16 and torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, remove_unused_columns=False, **fsdp,
    )


def _process_state() -> Any:
    """accelerate's process state: one process, or one of several under torchrun / accelerate launch."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _from_main(state: Any, make: Any) -> Any:
    """``make()`` run by the main process, its result (or its ``RecipeError``) given to every process."""
    box: list[Any] = [None]
    if state.is_main_process:
        try:
            box[0] = ("ok", make())
        except RecipeError as err:
            box[0] = ("error", str(err))
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(box)
    kind, value = box[0]
    if kind == "error":
        raise RecipeError(value)
    return value


def finetune(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Run the recipe; write adapter + metrics.json + loss_pulse.png into ``output_dir``.

    Order: the output directory is checked and its partial sibling created, the data loaded
    and tokenized, and only then the model loaded, so every error that can be found early is a
    one-line ``RecipeError`` before the slow part. Everything is written into the partial
    folder and moved into place at the end: a failed or interrupted run leaves nothing
    half-written, and emoq never removes what it did not write (:mod:`emoq.recipes.output`).

    Under several processes (``torchrun`` / ``accelerate launch``) every process trains and
    evaluates; the main one alone creates the output, converts or downloads first (the others
    then read its cache), and writes. The others return the same metrics with
    ``"main_process": False``.
    """
    from transformers import Trainer, set_seed

    from emoq.integrations.transformers import EmoCallback
    from emoq.recipes.data import load_examples, split, tokenize
    from emoq.recipes.model import compute_dtype, load_qlora, load_tokenizer, model_label, resolve_model_dir
    from emoq.recipes.output import OutputDir, check_output_dir

    out = check_output_dir(recipe.output_dir, recipe.overwrite)
    if recipe.fsdp_config is not None and not torch.cuda.is_available():
        raise RecipeError("recipe key 'fsdp_config': FSDP needs CUDA GPUs (accelerate 1.15 turns FSDP off for CPU "
                          "processes, so the run would silently fall back to data parallelism); drop the key")
    state = _process_state()
    output = None
    try:
        def make_output() -> str:
            nonlocal output
            output = OutputDir(out, recipe.overwrite)
            return str(output.work)

        work = Path(_from_main(state, make_output))
        start = time.perf_counter()
        set_seed(recipe.seed)
        with state.main_process_first():  # the main process converts / downloads, the others reuse its cache
            rows = load_examples(recipe)
            path = resolve_model_dir(recipe)
        tokenizer = load_tokenizer(path, recipe)
        train_rows, held_rows = split(rows, recipe)
        train_ds = tokenize(train_rows, tokenizer, recipe.seq_len)
        eval_ds = tokenize(held_rows, tokenizer, recipe.seq_len)
        for what, ds, n in (("held-out", eval_ds, len(held_rows)), ("training", train_ds, len(train_rows))):
            if len(ds) == 0:
                raise RecipeError(f"recipe key 'seq_len': no {what} example is left after tokenising its {n} rows "
                                  f"(each prompt alone fills seq_len={recipe.seq_len} tokens); raise seq_len")
        model = load_qlora(recipe, path, state.local_process_index)
        label = model_label(recipe, model)
        load_seconds = time.perf_counter() - start

        dtype = compute_dtype(recipe)
        args = training_arguments(recipe, work / "trainer", progress and state.is_main_process)
        optimizer_kwargs = recipe.full_optimizer_kwargs
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          optimizer_cls_and_kwargs=(recipe.optimizer_cls, optimizer_kwargs),
                          callbacks=[EmoCallback(stop_after=recipe.stop_after, recheck=recipe.recheck)])
        before = evaluate(trainer, eval_ds)
        t0 = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - t0
        after = evaluate(trainer, eval_ds)
        history = trainer.state.log_history
        opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer

        trainer.save_model(str(work / "adapter"))  # every process (FSDP gathers); the main one writes
        train_logs = [h for h in history if "loss" in h and "emo_pulse" in h]
        metrics = {
            "recipe": recipe.to_dict(),
            "model": label,
            "optimizer": type(opt).__name__,
            "pulse": opt.emo_pulse.name,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "compute_dtype": str(dtype).replace("torch.", ""),
            "processes": state.num_processes, "main_process": state.is_main_process,
            "train_examples": len(train_ds), "held_out_examples": len(eval_ds),
            "steps": trainer.state.global_step,
            "eval_before": before, "eval_after": after,
            "perplexity_change": after["perplexity"] / before["perplexity"] - 1,
            "final_pulse": opt.pulse, "skipped_steps": opt.skipped_steps, "should_stop": opt.should_stop,
            "train_loss_first": train_logs[0]["loss"] if train_logs else None,
            "train_loss_last": train_logs[-1]["loss"] if train_logs else None,
            "seconds_load": load_seconds, "seconds_train": train_seconds,
            "seconds_total": time.perf_counter() - start,
            "peak_rss_mb": _peak_rss_mb(),
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "history": history,
        }
        if state.is_main_process:
            tokenizer.save_pretrained(work / "adapter")
            (work / "adapter" / "training_args.bin").unlink(missing_ok=True)  # the Trainer's, not an adapter file
            (work / "metrics.json").write_text(json.dumps(metrics, indent=1))
            plot(history, work / "loss_pulse.png",
                 f"{type(opt).__name__} (pulse {opt.emo_pulse.name}) on {label}: held-out ppl "
                 f"{before['perplexity']:.2f} → {after['perplexity']:.2f}",
                 [(0, before["loss"]), (trainer.state.global_step, after["loss"])])
            shutil.rmtree(work / "trainer", ignore_errors=True)
            output.publish()
    finally:
        if output is not None:
            output.discard()
    return metrics
