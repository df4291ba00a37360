"""EmoCallback in the Hugging Face Trainer: tiny Llama, NF4 base + LoRA, gradient accumulation."""

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import emoq  # noqa: E402
from emoq.integrations.transformers import EmoCallback  # noqa: E402
from tests.tiny_llm import save_tiny_llama, tokenized_dataset  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def qlora_model(path):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))


def make_trainer(path, tmp_path, callbacks=(), trainer_cls=None, optimizer=None, pulse="v3.8", family=None,
                 **overrides):
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    model = qlora_model(path)
    kw = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
              max_steps=6, logging_steps=1, lr_scheduler_type="constant", report_to=[], use_cpu=True,
              save_strategy="no", disable_tqdm=True, seed=0)
    kw.update(overrides)
    args = TrainingArguments(**kw)
    ds = tokenized_dataset(AutoTokenizer.from_pretrained(path))
    opt_kw = {"optimizers": (optimizer(model), None)} if optimizer else \
        {"optimizer_cls_and_kwargs": (family or emoq.EmoAiry8bit, {"pulse": pulse})}
    return (trainer_cls or Trainer)(model=model, args=args, train_dataset=ds, callbacks=list(callbacks), **opt_kw)


def train_logs(trainer):
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def test_nf4_lora_grad_accumulation_feeds_the_logged_loss(tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path, callbacks=[EmoCallback()])
    assert any(type(m).__name__ == "Linear4bit" for m in trainer.model.modules())  # really NF4
    logs = train_logs(trainer)
    assert len(logs) == 6
    for entry in logs:
        # the pulse consumed exactly the loss the Trainer logs for that update (mean of 2 micro-batches)
        assert entry["emo_loss"] == entry["loss"]
        assert entry["learning_rate"] == entry["emo_pulse"]
        assert 1e-6 <= entry["emo_pulse"] <= 3e-3 and entry["emo_should_stop"] == 0.0
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, emoq.EmoAiry) and opt.emo_pulse.steps == 6
    assert all(g["lr"] == opt.pulse for g in opt.param_groups)  # scheduler's reset undone


def test_emo_loss_is_the_token_mean_loss_of_the_update(tiny_dir, tmp_path):
    # Independent check of what the pulse sees: recompute, for every micro-batch, the summed
    # next-token cross entropy and the token count; each update's loss must be their ratio over
    # its two micro-batches (the Trainer normalises by num_items_in_batch across accumulation).
    from transformers import Trainer

    seen = []

    class Recording(Trainer):  # a subclass, like TRL's SFTTrainer
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.no_grad():
                logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
                labels = inputs["labels"][:, 1:]
                ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                       ignore_index=-100, reduction="sum")
                seen.append((ce.item(), (labels != -100).sum().item()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch=num_items_in_batch)

    trainer = make_trainer(tiny_dir, tmp_path, callbacks=[EmoCallback()], trainer_cls=Recording)
    logs = train_logs(trainer)
    assert len(seen) == 12
    for i, entry in enumerate(logs):
        (s1, n1), (s2, n2) = seen[2 * i], seen[2 * i + 1]
        assert entry["emo_loss"] == pytest.approx((s1 + s2) / (n1 + n2), rel=1e-5)
        assert entry["emo_loss"] == entry["loss"]


def test_without_the_callback_training_fails_loudly(tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path)
    with pytest.raises(RuntimeError, match="got no loss.*EmoCallback"):
        trainer.train()


@pytest.mark.parametrize("overrides", [dict(lr_scheduler_type="linear"), dict(warmup_steps=2)])
def test_a_schedule_that_would_be_ignored_raises(tiny_dir, tmp_path, overrides):
    trainer = make_trainer(tiny_dir, tmp_path, callbacks=[EmoCallback()], **overrides)
    with pytest.raises(ValueError, match="lr_scheduler_type='constant'"):
        trainer.train()


def test_a_learning_rate_sized_scope_raises(tiny_dir, tmp_path):
    # lr=5e-5 (the Trainer's default learning rate) as the pulse scope would pin eta to its 1e-6 floor
    trainer = make_trainer(tiny_dir, tmp_path, callbacks=[EmoCallback()],
                           optimizer=lambda m: emoq.EmoAiry8bit([p for p in m.parameters() if p.requires_grad],
                                                                lr=5e-5))
    with pytest.raises(ValueError, match="lr is the emoPulse scope"):
        trainer.train()


@pytest.mark.parametrize("pulse", ["v3.8", "v3.9", "adaptive"])
def test_scope_problem_states_the_scale_for_every_variant(pulse):
    from emoq.integrations import scope_problem

    assert scope_problem("EmoSens", 1e-2) is None
    message = scope_problem("EmoSens", 5e-5)
    assert "up to 2e+04 times smaller" in message and "lr is the emoPulse scope" in message
    # the claim holds for every variant: at lr=5e-5 each step size is at most 5e-5 times the lr=1.0 one
    small, unit = emoq.EmoPulse(5e-5, pulse=pulse), emoq.EmoPulse(1.0, pulse=pulse)
    probe = (0.0, 1.0, 1.0, 1.0)
    for loss in (3.0, 2.5, 2.4, 2.6, 2.0):
        assert small.update(loss, probe) <= unit.update(loss, probe)


def test_non_emo_optimizer_is_refused(tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path, callbacks=[EmoCallback()],
                           optimizer=lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]))
    with pytest.raises(TypeError, match="needs an emoq optimizer"):
        trainer.train()


def test_optimizers_tuple_and_stop_after(tiny_dir, tmp_path, monkeypatch):
    # A stop signal that holds from the first update: training stops after `stop_after` updates.
    monkeypatch.setattr(emoq.EmoSens, "stop_thresholds", (math.inf, math.inf))
    trainer = make_trainer(tiny_dir, tmp_path, callbacks=[EmoCallback(stop_after=3)],
                           optimizer=lambda m: emoq.EmoSens([p for p in m.parameters() if p.requires_grad]))
    logs = train_logs(trainer)
    assert len(logs) == 3 and trainer.state.global_step == 3
    assert all(entry["emo_should_stop"] == 1.0 for entry in logs)


def test_stop_after_is_off_by_default(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(emoq.EmoSens, "stop_thresholds", (math.inf, math.inf))
    trainer = make_trainer(tiny_dir, tmp_path, callbacks=[EmoCallback()], max_steps=4,
                           optimizer=lambda m: emoq.EmoSens([p for p in m.parameters() if p.requires_grad]))
    assert len(train_logs(trainer)) == 4


def test_logging_every_n_steps_averages_like_the_trainer(tiny_dir, tmp_path):
    trainer = make_trainer(tiny_dir, tmp_path, callbacks=[EmoCallback()], logging_steps=3)
    logs = train_logs(trainer)
    assert len(logs) == 2
    for entry in logs:
        assert entry["emo_loss"] == pytest.approx(entry["loss"], rel=1e-6)


@pytest.mark.parametrize("pulse", ["v3.8", "adaptive"])
def test_trainer_checkpoint_resume_keeps_the_pulse(tiny_dir, tmp_path, pulse):
    trainer = make_trainer(tiny_dir, tmp_path, callbacks=[EmoCallback()], max_steps=4, save_strategy="steps",
                           save_steps=2, pulse=pulse)
    full = train_logs(trainer)
    resumed = make_trainer(tiny_dir, tmp_path, callbacks=[EmoCallback()], max_steps=4, save_strategy="steps",
                           save_steps=2, pulse=pulse)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    opt = resumed.optimizer.optimizer
    assert opt.emo_pulse.steps == 4 and opt.emo_pulse.name == pulse  # 2 restored + 2 new: history came back
    tail = [h for h in resumed.state.log_history if "loss" in h and h["step"] > 2]
    assert [h["emo_pulse"] for h in tail] == [h["emo_pulse"] for h in full[2:]]


def lora_grads(model, x):
    model.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_evaluation_before_training_keeps_nf4_gradients_right(tiny_dir):
    # bitsandbytes repacks NF4 weights for CPU inference on an eval-mode forward and its packed
    # kernel has no autograd: without the guard, LoRA gradients after one evaluation are wrong.
    from emoq.integrations.transformers import disable_bnb_cpu_inference_packing

    x = torch.randint(5, 90, (2, 16))

    def fresh():
        torch.manual_seed(0)
        model = qlora_model(tiny_dir)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)  # so every LoRA matrix gets a gradient
        disable_bnb_cpu_inference_packing(model)
        return model

    want = lora_grads(fresh(), x)
    model = fresh()
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    model.train()
    got = lora_grads(model, x)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_already_packed_model_is_refused(tiny_dir):
    from emoq.integrations.transformers import disable_bnb_cpu_inference_packing

    model = qlora_model(tiny_dir)
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    if not any(m.support_avx512bf16_for_cpu for m in layers):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(5, 90, (1, 8)))
    with pytest.raises(RuntimeError, match="repacked by bitsandbytes"):
        disable_bnb_cpu_inference_packing(model)


def test_stop_after_validation():
    with pytest.raises(ValueError):
        EmoCallback(stop_after=0)


def test_resume_keeps_the_stop_streak(tiny_dir, tmp_path, monkeypatch):
    # Old behaviour: stop_after=5 with a checkpoint at update 3 stopped the uninterrupted run at 5
    # and the resumed one at 8 (the streak restarted from 0). It is saved with the checkpoint now.
    monkeypatch.setattr(emoq.EmoSens, "stop_thresholds", (math.inf, math.inf))

    def trainer():
        return make_trainer(tiny_dir, tmp_path, callbacks=[EmoCallback(stop_after=5)], max_steps=10,
                            save_strategy="steps", save_steps=3,
                            optimizer=lambda m: emoq.EmoSens([p for p in m.parameters() if p.requires_grad]))

    full = trainer()
    full.train()
    assert full.state.global_step == 5
    saved = json.loads((tmp_path / "out" / "checkpoint-3" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["EmoCallback"]["attributes"]["stop_streak"] == 3
    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    assert resumed.state.global_step == 5


@pytest.mark.compiled
def test_lora_matrices_moved_into_one_buffer_train_and_save_in_the_trainer(tiny_dir, tmp_path):
    # The default compiled path moves same-shape LoRA matrices into one buffer per shape (README
    # "Small parameters move into one buffer"): inside the Trainer they move, and the adapter the
    # Trainer saves reloads to the trained values.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tiny_dir, tmp_path, callbacks=[EmoCallback()], max_steps=3,
                           optimizer=lambda m: emoq.EmoSens([p for p in m.parameters() if p.requires_grad]))
    trainer.train()
    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert len({p.untyped_storage().data_ptr() for p in lora.values()}) < len(lora)
    trainer.save_model(str(tmp_path / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    loaded = {n: p for n, p in PeftModel.from_pretrained(base, str(tmp_path / "adapter")).named_parameters()
              if "lora_" in n}
    assert loaded.keys() == lora.keys()
    assert all(torch.equal(lora[n].detach(), loaded[n].detach()) for n in lora)


def test_recheck_recomputes_the_update_loss_with_the_new_weights(tiny_dir, tmp_path):
    # Independent check of the recheck: for every update, the summed next-token cross entropy over
    # its two micro-batches divided by their token count, computed at the moment the optimizer
    # calls the recheck (after the update), equals what the recheck returns.
    from transformers import Trainer

    micro, checks = [], []

    class Recording(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            micro.append({k: v.clone() for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = make_trainer(tiny_dir, tmp_path, callbacks=[EmoCallback(recheck=True)], trainer_cls=Recording,
                           pulse="adaptive", family=emoq.EmoSens8bit)
    real_step = emoq.EmoSens8bit.recheck_next

    def recheck_next(self, fn):
        def wrapped():
            batches, total, tokens = micro[-2:], 0.0, 0
            with torch.no_grad():
                for b in batches:
                    logits = trainer.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                    labels = b["labels"][:, 1:]
                    total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                               ignore_index=-100, reduction="sum").item()
                    tokens += (labels != -100).sum().item()
            got = fn()
            checks.append((float(got), total / tokens))
            return got
        return real_step(self, None if fn is None else wrapped)

    emoq.EmoSens8bit.recheck_next = recheck_next
    try:
        logs = train_logs(trainer)
    finally:
        emoq.EmoSens8bit.recheck_next = real_step
    assert len(logs) == 6 and len(checks) == 6
    for got, want in checks:
        assert got == pytest.approx(want, rel=1e-5)
    inner = trainer.optimizer.optimizer
    assert inner.emo_pulse.ratio_avg is not None and -1 <= inner.emo_pulse.ratio_avg <= 1


def test_recheck_is_refused_where_it_cannot_be_exact(tiny_dir, tmp_path):
    from transformers import Trainer

    class OwnLoss(Trainer):  # like TRL's SFTTrainer: may count metrics per compute_loss call
        def compute_loss(self, *args, **kwargs):
            return super().compute_loss(*args, **kwargs)

    trainer = make_trainer(tiny_dir, tmp_path, callbacks=[EmoCallback(recheck=True)], trainer_cls=OwnLoss,
                           pulse="adaptive", family=emoq.EmoSens8bit)
    with pytest.raises(ValueError, match="overrides it"):
        trainer.train()
    for pulse, family in [("v3.8", emoq.EmoSens8bit), ("adaptive", emoq.EmoAiry8bit)]:  # another pulse, a sign rule
        trainer = make_trainer(tiny_dir, tmp_path, callbacks=[EmoCallback(recheck=True)], pulse=pulse, family=family)
        with pytest.raises(ValueError, match="recheck= needs pulse='adaptive' and an Adam-type rule"):
            trainer.train()
    with pytest.raises(TypeError, match="recheck must be a bool"):
        EmoCallback(recheck="yes")
