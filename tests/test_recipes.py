"""Recipe validation, the pydoc Q/A data, tokenisation with prompt masking."""

import pytest

from emoq.recipes.config import BUILTIN_DATA, Recipe, RecipeError, load_recipe
from emoq.recipes.data import load_examples, pydoc_qa_pairs, split, tokenize
from tests.tiny_llm import char_tokenizer


def test_defaults_are_the_embedded_offline_recipe():
    r = load_recipe(None)
    assert r.model == "builtin:smollm2-135m-instruct" and r.data == BUILTIN_DATA
    assert r.optimizer == "EmoSens8bit" and r.pulse == "adaptive" and r.seq_len == 128 and r.batch_size == 4


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("max_steps: 5\noptimizer: EmoSens\noptimizer_kwargs: {weight_decay: 0.1}\n")
    r = load_recipe(path, ["max_steps=7", "stop_after=null", "lora_dropout=0.1", "gguf_file=x.gguf"])
    assert (r.max_steps, r.optimizer, r.optimizer_kwargs) == (7, "EmoSens", {"weight_decay": 0.1})
    assert r.lora_dropout == 0.1 and r.stop_after is None and r.gguf_file == "x.gguf"


@pytest.mark.parametrize("override,key", [
    ("max_stepz=3", "max_stepz"), ("max_steps=abc", "max_steps"), ("max_steps=0", "max_steps"),
    ("max_steps=true", "max_steps"), ("optimizer=AdamW", "optimizer"), ("lora_dropout=1.0", "lora_dropout"),
    ("compute_dtype=int8", "compute_dtype"), ("optimizer_kwargs={lr: -1}", "optimizer_kwargs"),
    ("optimizer_kwargs={state_precision: int3}", "optimizer_kwargs"), ("model=null", "model"),
    ("optimizer_kwargs=[1]", "optimizer_kwargs"), ("stop_after=0", "stop_after"),
    ("weight_decay=-1", "weight_decay"), ("quant_storage=int4", "quant_storage"),
    ("fsdp_config=[1]", "fsdp_config"), ("recheck=1", "recheck"), ("recheck=yes please", "recheck"),
])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, [override])
    message = str(err.value)
    assert f"'{key}'" in message and "\n" not in message


def test_fsdp_qlora_recipe_of_the_docs(tmp_path):
    import re
    from pathlib import Path

    import torch

    from emoq.recipes.model import quant_storage

    docs = (Path(__file__).resolve().parents[1] / "docs" / "finetune.md").read_text()
    block = re.search(r"```yaml\n(# torchrun.*?)```", docs, re.S).group(1)
    path = tmp_path / "fsdp.yaml"
    path.write_text(block)
    r = load_recipe(path)
    assert r.fsdp_config == {"transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]}
    assert quant_storage(r) == torch.bfloat16  # NF4 stored in the compute dtype under FSDP
    assert quant_storage(load_recipe(None)) == torch.uint8  # bitsandbytes' default otherwise
    with pytest.raises(RecipeError, match="'quant_storage'.*compute dtype"):
        load_recipe(path, ["quant_storage=uint8"])


def test_fsdp_is_refused_without_cuda(tmp_path):
    import torch

    from emoq.recipes.run import finetune

    if torch.cuda.is_available():
        pytest.skip("CUDA present: FSDP is allowed")
    with pytest.raises(RecipeError, match="'fsdp_config'.*CUDA"):
        finetune(load_recipe(None, ["fsdp_config={}", "pulse=v3.8", f"output_dir={tmp_path / 'out'}"]))
    assert list(tmp_path.iterdir()) == []


def test_adaptive_pulse_with_fsdp_is_refused_at_validation():
    # the adaptive pulse's probe is not sharded: refused in one line before any model loads
    with pytest.raises(RecipeError, match="'pulse': 'adaptive' does not support fsdp"):
        load_recipe(None, ["fsdp_config={}"])
    assert load_recipe(None, ["fsdp_config={}", "pulse=v3.9"]).pulse == "v3.9"


def test_bad_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "broken.yaml")
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(None, ["max_steps"])


def test_pydoc_pairs_are_real_documentation():
    pairs = pydoc_qa_pairs()
    assert len(pairs) > 500
    assert all(p["question"].startswith("In Python, ") and len(p["answer"]) >= 80 for p in pairs)
    assert any("assert" in p["question"] and "debugging assertions" in p["answer"] for p in pairs)
    # topics share sections: every answer appears once, so a held-out answer is never trained on
    assert len({p["answer"] for p in pairs}) == len(pairs)


def test_held_out_split_is_disjoint_and_stable():
    recipe = Recipe(eval_size=30)
    train, held = split(load_examples(recipe), recipe)
    assert len(held) == 30 and not {p["answer"] for p in held} & {p["answer"] for p in train}
    capped = Recipe(eval_size=30, max_train_samples=10)
    train2, held2 = split(load_examples(capped), capped)
    assert held2 == held and train2 == train[:10]  # capping training data never moves the held-out set
    with pytest.raises(RecipeError, match="eval_size"):
        load_examples(Recipe(eval_size=10**6))


def test_unknown_builtin_data():
    with pytest.raises(RecipeError, match="'data'"):
        load_examples(Recipe(data="builtin:nope"))


def test_tokenize_masks_the_prompt_and_pads():
    tok = char_tokenizer()
    rows = [{"question": "What is 2?", "answer": "Two."}, {"text": "plain text row"}]
    ds = tokenize(rows, tok, seq_len=48)
    first = ds[0]
    prompt_len = len(tok("Question: What is 2?\nAnswer: ")["input_ids"])
    assert first["labels"][:prompt_len] == [-100] * prompt_len
    answer = [t for t in first["labels"] if t != -100]
    assert tok.decode(answer[:-1]).replace(" ", "") == "Two."  # then eos
    assert len(first["input_ids"]) == 48 and first["attention_mask"].count(1) == prompt_len + len(answer)
    assert ds[1]["labels"][0] != -100  # a plain-text row is all target
    # a prompt longer than seq_len leaves nothing to learn: the row is dropped, not trained on padding
    assert len(tokenize([{"question": "x" * 100, "answer": "y"}], tok, seq_len=20)) == 0


def test_recheck_needs_the_adaptive_pulse():
    assert load_recipe(None, ["recheck=true"]).recheck is True
    for override in ("pulse=v3.9", "optimizer=EmoAiry8bit", "optimizer=EmoCats"):
        with pytest.raises(RecipeError, match="'recheck': needs pulse='adaptive' and an Adam-type rule"):
            load_recipe(None, ["recheck=true", override])
