"""Hugging Face Trainer glue: feed emoPulse the loss of every update, log the real step size.

Add :class:`EmoCallback` to any ``transformers.Trainer`` (or a subclass such as TRL's
``SFTTrainer``) whose optimizer is an emoq optimizer::

    trainer = Trainer(model, args, train_dataset=ds,
                      optimizer_cls_and_kwargs=(emoq.EmoAiry8bit, {}),
                      callbacks=[EmoCallback()])

What it does, once training starts:

* wraps the trainer instance's ``training_step`` (not the class) to add up the loss that each
  micro-batch returns — the Trainer's own per-update loss, already divided by the accumulation
  steps or normalised by ``num_items_in_batch``, and never scaled by an AMP GradScaler — and
  hands the sum to the optimizer with ``record_loss`` right before ``optimizer.step()``. That is
  exactly the number the Trainer logs as ``loss`` for that update (``logging_steps=1``);
* wraps ``trainer.log`` so every log entry (history, TensorBoard, W&B...) carries
  ``learning_rate`` = the real step size η, ``emo_pulse`` (η of the last update), ``emo_loss``
  (the mean pulse loss since the last log, comparable to ``loss``) and ``emo_should_stop``;
* optionally stops training when the stop signal holds for ``stop_after`` consecutive updates;
* with ``recheck=True`` (EmoSens with ``pulse="adaptive"``), keeps each micro-batch's inputs and gives the
  optimizer a recheck (``recheck_next``) that computes the update's loss again, the same way,
  with the updated weights: one more forward per micro-batch, under ``torch.no_grad()``;
* keeps bitsandbytes from repacking NF4 weights for CPU inference during evaluations (the
  packed kernel has no autograd: training after it silently gets wrong gradients), and raises
  if that already happened.

The Trainer's lr scheduler cannot change an emoq update (the step size comes from the pulse, not
from the group ``lr``), but a decaying or warm-up schedule would be silently ignored, so
anything but ``lr_scheduler_type="constant"`` with no warm-up raises ``ValueError``.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from emoq.integrations import scope_problem
from emoq.optim.base import EmoOptimizer

__all__ = ["EmoCallback", "disable_bnb_cpu_inference_packing", "unwrap_emo_optimizer"]


def unwrap_emo_optimizer(optimizer: Any) -> EmoOptimizer:
    """The emoq optimizer inside ``optimizer`` (accelerate wraps it in ``AcceleratedOptimizer``)."""
    seen = optimizer
    for _ in range(4):
        if isinstance(seen, EmoOptimizer):
            return seen
        seen = getattr(seen, "optimizer", None)
    raise TypeError(
        f"EmoCallback needs an emoq optimizer, the Trainer has {type(optimizer).__name__}; pass one with "
        "optimizers=(emoq.EmoSens(model.parameters()), None) or optimizer_cls_and_kwargs=(emoq.EmoSens, {})"
    )


def disable_bnb_cpu_inference_packing(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking NF4 weights for CPU inference; returns modules touched.

    bitsandbytes 0.50 (CPUs with AVX512-BF16) repacks a ``Linear4bit`` weight the first time it
    runs in eval mode without grad, and keeps it packed; the packed kernel has no autograd, so
    every later training step backpropagates wrong gradients through the frozen base (measured:
    LoRA gradients off by ~90 % after one evaluation), with only a UserWarning. Raises if a
    weight is already packed (the model was evaluated before this call): reload it.
    """
    touched, packed = 0, []
    for name, module in model.named_modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            touched += 1
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if getattr(state, "packing_format_for_cpu", False):
                packed.append(name)
    if packed:
        raise RuntimeError(
            f"{len(packed)} NF4 layer(s) (e.g. {packed[0]!r}) were repacked by bitsandbytes for CPU inference when the "
            "model ran in eval mode; training through them gives wrong gradients. Call "
            "emoq.integrations.transformers.disable_bnb_cpu_inference_packing(model) right after loading, "
            "before any evaluation"
        )
    return touched


def _find_trainer() -> Trainer | None:
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


class EmoCallback(TrainerCallback, ExportableState):
    """Connect an emoq optimizer to the Hugging Face Trainer (see the module docstring).

    Its state (the stop-signal streak) is saved with every Trainer checkpoint (transformers'
    ``ExportableState``, in ``trainer_state.json``) and restored on resume, so a resumed run
    stops at the same update as an uninterrupted one.

    Args:
        stop_after: stop training (``control.should_training_stop``) once the optimizer's stop
            signal has held for this many consecutive updates. ``None`` (default): never.
        trainer: the trainer, when the callback is added after construction
            (``trainer.add_callback(EmoCallback(trainer=trainer))``). Without it the callback
            finds the trainer that calls it at ``on_train_begin``.
        recheck: feed ``pulse="adaptive"`` its recheck (see the module docstring and
            :meth:`~emoq.EmoOptimizer.step`). Needs the Trainer's own ``compute_loss`` (a
            subclass that overrides it, such as TRL's ``SFTTrainer``, may count metrics per call:
            refused with ``ValueError`` at ``on_train_begin``) and an Adam-type optimizer
            (EmoSens) built with ``pulse="adaptive"``.
    """

    def __init__(self, stop_after: int | None = None, trainer: Trainer | None = None, recheck: bool = False) -> None:
        if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 1):
            raise ValueError(f"stop_after must be a positive int or None, got {stop_after!r}")
        if not isinstance(recheck, bool):
            raise TypeError(f"recheck must be a bool, got {type(recheck).__name__}")
        self.stop_after = stop_after
        self.recheck = recheck
        self._micro_batches: list[tuple[Any, Any, Any]] = []
        self.trainer = trainer
        self.optimizer: EmoOptimizer | None = None
        self.stop_streak = 0
        self._update_loss: torch.Tensor | None = None
        self._counts_before = (0, 0)
        self._window: list[float] = []
        self._originals: dict[str, Any] = {}

    # ---------------------------------------------------------------- installation
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        trainer = self.trainer or _find_trainer()
        if trainer is None:
            raise RuntimeError("EmoCallback could not find its Trainer; add it with "
                               "trainer.add_callback(EmoCallback(trainer=trainer))")
        self.trainer = trainer
        self.optimizer = unwrap_emo_optimizer(kwargs.get("optimizer") or trainer.optimizer)
        self._check_schedule(args)
        self._check_scope()
        self._check_recheck(trainer)
        disable_bnb_cpu_inference_packing(kwargs.get("model") or trainer.model)
        self._micro_batches = []
        self._install(trainer)
        self.stop_streak = self._saved_streak(state) if state.global_step > 0 else 0  # resumed, or a new run
        self._window = []

    def state(self) -> dict[str, Any]:
        """What a Trainer checkpoint keeps of this callback (``ExportableState``)."""
        return {"args": {"stop_after": self.stop_after}, "attributes": {"stop_streak": self.stop_streak}}

    def _saved_streak(self, state: TrainerState) -> int:
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):  # several EmoCallbacks: transformers keeps a list (one makes sense)
            saved = saved[0] if saved else None
        streak = (saved or {}).get("attributes", {}).get("stop_streak", 0)
        return streak if isinstance(streak, int) and not isinstance(streak, bool) and streak >= 0 else 0

    def _check_schedule(self, args: TrainingArguments) -> None:
        kind = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
        warmup = (getattr(args, "warmup_steps", 0) or 0) + (getattr(args, "warmup_ratio", 0) or 0)
        if kind != "constant" or warmup:
            raise ValueError(
                f"emoPulse sets the step size of {type(self.optimizer).__name__}, so the Trainer's lr schedule "
                f"(lr_scheduler_type={kind!r}, warmup {warmup}) would be silently ignored: set "
                "TrainingArguments(lr_scheduler_type='constant', warmup_steps=0)"
            )

    def _check_scope(self) -> None:
        problem = scope_problem(type(self.optimizer).__name__, self.optimizer.emo_pulse.initial_scope)
        if problem:
            raise ValueError(problem)

    def _check_recheck(self, trainer: Trainer) -> None:
        if not self.recheck:
            return
        if type(trainer).compute_loss is not Trainer.compute_loss:
            raise ValueError(f"EmoCallback(recheck=True) computes each micro-batch's loss again with "
                             f"Trainer.compute_loss; {type(trainer).__name__} overrides it (it may count metrics "
                             "per call), so the recheck is not supported there: use recheck=False")
        self.optimizer._check_recheck(self._recheck_loss)  # the pulse must read it: ValueError otherwise

    def _recheck_loss(self) -> torch.Tensor:
        """The update's loss again, as ``training_step`` computes and scales it (sum over micro-batches)."""
        trainer, total = self.trainer, None
        for model, inputs, num_items in self._micro_batches:
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items)
            if trainer.args.n_gpu > 1:
                loss = loss.mean()
            scaled = trainer.loss_is_scaled_for_ga
            if scaled is None:
                scaled = ((trainer.model_accepts_loss_kwargs and num_items is not None)
                          or trainer.compute_loss_func is not None)
            if not scaled:
                loss = loss / trainer.current_gradient_accumulation_steps
            value = loss.detach().float().reshape(-1).mean()
            total = value if total is None else total + value
        self._micro_batches = []
        if total is None:
            raise RuntimeError("EmoCallback(recheck=True) kept no micro-batch for this update")
        return total

    def _install(self, trainer: Trainer) -> None:
        if self._originals:  # a second train() on the same trainer
            self._uninstall()
        original_step, original_log = trainer.training_step, trainer.log
        self._originals = {"training_step": original_step, "log": original_log}

        def training_step(model, inputs, *args, **kw):
            loss = original_step(model, inputs, *args, **kw)
            if self.recheck:  # training_step's own arguments, prepared as it prepares them
                num_items = args[0] if args else kw.get("num_items_in_batch")
                self._micro_batches.append((model, trainer._prepare_inputs(inputs), num_items))
            # the Trainer's per-micro-batch loss, scaled for accumulation like the one it logs
            value = loss.detach().float().reshape(-1).mean()
            self._update_loss = value if self._update_loss is None else self._update_loss + value
            return loss

        def log(logs: dict[str, float], *args, **kw):
            self._decorate(logs)
            return original_log(logs, *args, **kw)

        trainer.training_step = training_step
        trainer.log = log

    def _uninstall(self) -> None:
        for name in self._originals:
            self.trainer.__dict__.pop(name, None)  # back to the class's method
        self._originals = {}

    def on_train_end(self, args, state, control, **kwargs):
        self._uninstall()

    # ---------------------------------------------------------------- per update
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        opt = self.optimizer
        if self._update_loss is None:
            raise RuntimeError("EmoCallback saw no micro-batch loss before optimizer.step(); was training_step "
                               "replaced after training began?")
        opt.record_loss(self._update_loss)
        self._update_loss = None
        if self.recheck:
            opt.recheck_next(self._recheck_loss)
        self._counts_before = (opt.emo_pulse.steps, opt.skipped_steps)

    def on_optimizer_step(self, args, state, control, **kwargs):
        opt = self.optimizer
        applied, skipped = opt.emo_pulse.steps, opt.skipped_steps
        if applied > self._counts_before[0]:
            self._window.append(opt.last_loss)
        elif skipped == self._counts_before[1]:
            # accelerate's GradScaler skipped optimizer.step() (inf grads in fp16): drop this update's loss
            opt.discard_recorded_losses()
            opt.recheck_next(None)
        self._micro_batches = []  # a skipped step did not call the recheck

    def on_step_end(self, args, state, control, **kwargs):
        opt = self.optimizer
        if opt.pulse is not None:
            for group in opt.param_groups:  # the scheduler just reset it to the scope; show the real one
                group["lr"] = opt.pulse
        self.stop_streak = self.stop_streak + 1 if opt.should_stop else 0
        if self.stop_after is not None and self.stop_streak >= self.stop_after:
            control.should_training_stop = True
        return control

    # ---------------------------------------------------------------- logs
    def _decorate(self, logs: dict[str, float]) -> None:
        opt = self.optimizer
        if opt is None or opt.pulse is None:
            return
        if "learning_rate" in logs:
            logs["learning_rate"] = opt.pulse
        logs["emo_pulse"] = opt.pulse
        if self._window:
            logs["emo_loss"] = math.fsum(self._window) / len(self._window)
            self._window = []
        logs["emo_should_stop"] = float(opt.should_stop)
        logs["emo_skipped_steps"] = opt.skipped_steps
