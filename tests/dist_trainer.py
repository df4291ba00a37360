"""The Hugging Face Trainer (and TRL's SFTTrainer) with EmoCallback, one process or several.

Run by tests/test_integration_distributed.py, under ``torchrun --nproc_per_node=2`` (the
launcher is part of what is tested) or in one process::

    python -m tests.dist_trainer TINY_LLAMA_DIR OUT_DIR SCENARIO [SCENARIO ...]

Scenarios: ``ddp`` (Trainer; checkpoint at step 2 of 4, then resume from it), ``recheck`` (the
same with ``pulse="adaptive"`` and ``EmoCallback(recheck=True)``), ``fsdp2`` (the
same with FSDP2 and a sharded, DCP checkpoint), ``fsdp2-full`` (FSDP2, full state dict
checkpoint), ``sft`` (TRL's SFTTrainer), ``cli`` (``emoq finetune`` on the tiny Llama in NF4,
what ``torchrun -m emoq.cli finetune ...`` runs). Each rank writes what it saw to
``OUT_DIR/{scenario}-rank{rank}.json``. Run ``fsdp2*`` last: they switch accelerate to FSDP on
CPU for the rest of the process (see allow_fsdp_on_cpu).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

FSDP = {
    "fsdp2": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
              "state_dict_type": "SHARDED_STATE_DICT"},
    "fsdp2-full": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                   "state_dict_type": "FULL_STATE_DICT"},
}
STEPS = 4
OPTIMIZER = ("EmoSens", {"state_precision": "8bit", "min_lowbit_size": 0})


def _reset_accelerate() -> None:
    """Several Trainers with different distributed setups in one process: forget the last one's."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    for var in [k for k in os.environ if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"]:
        del os.environ[var]
    del PartialState


def allow_fsdp_on_cpu() -> None:
    """accelerate 1.15 turns an FSDP plugin on only for GPU-like distributed types: on CPU
    (MULTI_CPU) the Trainer silently drops it and trains with DDP. Promote MULTI_CPU to FSDP
    when a plugin is given, so accelerate's own FSDP2 code (fully_shard, DCP checkpoints through
    get/set_optimizer_state_dict) runs on CPU with gloo. A test device only: not emoq's code."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_emoq_test", False):
        return

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # later re-reads keep it
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    init._emoq_test = True
    AcceleratorState.__init__ = init


def _args(scenario: str, work: Path, **kw):
    common = dict(output_dir=str(work), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  max_steps=STEPS, logging_steps=1, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                  save_strategy="no" if scenario == "sft" else "steps", save_steps=2, disable_tqdm=True, seed=0,
                  dataloader_num_workers=0)
    if scenario in FSDP:
        allow_fsdp_on_cpu()
        common.update(fsdp=True, fsdp_config=dict(FSDP[scenario]))
    common.update(kw)
    if scenario == "sft":
        from trl import SFTConfig

        return SFTConfig(max_length=32, packing=False, dataset_text_field="text", **common)
    from transformers import TrainingArguments

    return TrainingArguments(**common)


def _trainer(scenario: str, tiny: Path, work: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    import emoq
    from emoq.integrations.transformers import EmoCallback
    from tests.tiny_llm import TEXTS, tokenized_dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)  # full fine-tune, fp32 on CPU
    opt = (getattr(emoq, OPTIMIZER[0]), dict(OPTIMIZER[1], **({"pulse": "adaptive"} if scenario == "recheck" else {})))
    callback = EmoCallback(recheck=scenario == "recheck")
    if scenario == "sft":
        from datasets import Dataset
        from trl import SFTTrainer

        return SFTTrainer(model=model, args=_args(scenario, work), train_dataset=Dataset.from_dict({"text": TEXTS}),
                          processing_class=tokenizer, optimizer_cls_and_kwargs=opt, callbacks=[callback])
    return Trainer(model=model, args=_args(scenario, work), train_dataset=tokenized_dataset(tokenizer),
                   optimizer_cls_and_kwargs=opt, callbacks=[callback])


def _summary(trainer) -> dict:
    from emoq.integrations.transformers import unwrap_emo_optimizer

    opt = unwrap_emo_optimizer(trainer.optimizer)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"logs": logs, "pulse_state": opt.emo_pulse.state_dict(), "skipped": opt.skipped_steps,
            "wrapped": type(trainer.model_wrapped).__name__,
            "lowbit_states": sum(type(s).__name__.startswith("OptimState") for st in opt.state.values()
                                 for s in st.values()),
            "world": int(os.environ.get("WORLD_SIZE", "1")), "optimizer": type(opt).__name__,
            "param_types": sorted({type(p).__name__ for p in trainer.model.parameters()}),
            "distributed_type": str(trainer.accelerator.distributed_type),
            "checkpoint": sorted(p.name for p in Path(trainer.args.output_dir, "checkpoint-2").iterdir())
            if Path(trainer.args.output_dir, "checkpoint-2").is_dir() else []}


def run_cli(tiny: Path, out: Path) -> dict:
    """``emoq finetune`` as under ``torchrun -m emoq.cli``: the output folders this process made
    (``emoq.recipes.output.OutputDir``: the partial directory that becomes the output)."""
    import contextlib
    import io

    from emoq.cli import main as cli_main
    from emoq.recipes import output

    rank = int(os.environ.get("RANK", "0"))
    recipe = out / f"tiny-rank{rank}.yaml"
    recipe.write_text("# everything from --set\n")
    made, init = [], output.OutputDir.__init__

    def counting_init(self, path, *args, **kwargs):
        made.append(str(path))
        return init(self, path, *args, **kwargs)

    output.OutputDir.__init__ = counting_init
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            code = cli_main(["finetune", "--no-progress", str(recipe), "--set", f"model={tiny}", "--set",
                             f"output_dir={out / 'cli-run'}", "--set", "max_steps=2", "--set", "eval_size=8", "--set",
                             "max_train_samples=24", "--set", "seq_len=128", "--set", "eval_batch_size=4", "--set",
                             "batch_size=2", "--set", "grad_accum=2"])
    finally:
        output.OutputDir.__init__ = init
    return {"code": code, "made": [p for p in made if "cli-run" in p], "printed": printed.getvalue()}


def run(tiny: Path, out: Path, scenario: str) -> dict:
    if scenario == "cli":
        result = run_cli(tiny, out)
        _reset_accelerate()
        return result
    work = out / scenario
    full = _trainer(scenario, tiny, work)
    full.train()
    result = {"full": _summary(full)}
    if scenario != "sft":
        _reset_accelerate()
        resumed = _trainer(scenario, tiny, out / f"{scenario}-resumed")
        resumed.train(resume_from_checkpoint=str(work / "checkpoint-2"))
        result["resumed"] = _summary(resumed)
    _reset_accelerate()
    return result


def main(argv: list[str]) -> None:
    tiny, out, scenarios = Path(argv[0]), Path(argv[1]), argv[2:]
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    try:
        for scenario in scenarios:
            result = run(tiny, out, scenario)
            (out / f"{scenario}-rank{rank}.json").write_text(json.dumps(result))
    finally:
        # exiting with a live gloo group can abort in interpreter finalisation (SIGABRT, seen in CI)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
