"""Recipe schema: a YAML file of known keys, validated before anything is loaded or written."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

BUILTIN_MODEL = "builtin:smollm2-135m-instruct"
BUILTIN_DATA = "builtin:pydoc-qa"


class RecipeError(ValueError):
    """A recipe key is unknown or has a bad value (the message names the key)."""


@dataclass
class Recipe:
    """A QLoRA fine-tune. Every key of a recipe YAML is a field here."""

    # model
    model: str = BUILTIN_MODEL  # builtin:smollm2-135m-instruct, a Hub id, or a local directory
    gguf_file: str | None = None  # load `model` (a directory) from this GGUF file
    cache_dir: str = "~/.cache/emoq"  # where a GGUF model is re-saved as safetensors, once
    load_in_4bit: bool = True  # NF4 base weights (bitsandbytes)
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU | float32 | bfloat16 | float16
    quant_storage: str = "auto"  # bnb_4bit_quant_storage: auto (uint8; the compute dtype under fsdp) | uint8 | ...
    gradient_checkpointing: bool = False
    # LoRA
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target: str = "all-linear"
    # data
    data: str = BUILTIN_DATA  # builtin:pydoc-qa, a local file or folder (docs/finetune.md), or a `datasets` name
    data_config: str | None = None
    data_split: str = "train"
    prompt_field: str = "question"  # for `datasets` sources with prompt/response columns
    response_field: str = "answer"
    text_field: str | None = None  # or one plain-text column (no prompt masking; packed into seq_len blocks)
    text_sample_by: str = "line"  # plain-text files: one example per line | paragraph (blank-line separated) | document
    eval_size: int = 48  # held-out examples (taken before any training example)
    max_train_samples: int | None = None
    seq_len: int = 128
    # optimisation
    optimizer: str = "EmoSens8bit"  # any emoq optimizer class name
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    pulse: str = "adaptive"  # the optimizer's pulse= variant: v3.8 | v3.9 | adaptive (docs/pulse.md)
    recheck: bool = False  # adaptive only: one more forward per micro-batch feeds its growth veto (docs/pulse.md)
    weight_decay: float = 0.0  # passed to the Trainer (it sets every group's weight decay)
    batch_size: int = 4
    eval_batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 60
    stop_after: int | None = None  # stop when the pulse's stop signal holds this many updates
    seed: int = 0
    logging_steps: int = 1
    fsdp_config: dict[str, Any] | None = None  # FSDP2 (CUDA only): the Trainer's fsdp_config, e.g. {}
    # output
    output_dir: str = "runs/smollm2-pydoc"
    overwrite: bool = False

    def validate(self) -> Recipe:
        positive = ("lora_r", "lora_alpha", "eval_size", "seq_len", "batch_size", "eval_batch_size", "grad_accum",
                    "max_steps", "logging_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise RecipeError(f"recipe key '{key}' must be >= 1, got {getattr(self, key)!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise RecipeError(f"recipe key 'lora_dropout' must be in [0, 1), got {self.lora_dropout!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise RecipeError(f"recipe key 'weight_decay' must be a finite number >= 0, got {self.weight_decay!r}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise RecipeError(f"recipe key 'compute_dtype' must be auto, float32, bfloat16 or float16, "
                              f"got {self.compute_dtype!r}")
        if self.text_sample_by not in ("line", "paragraph", "document"):
            raise RecipeError(f"recipe key 'text_sample_by' must be line, paragraph or document, "
                              f"got {self.text_sample_by!r}")
        if self.quant_storage not in ("auto", "uint8", "float32", "bfloat16", "float16"):
            raise RecipeError(f"recipe key 'quant_storage' must be auto, uint8, float32, bfloat16 or float16, "
                              f"got {self.quant_storage!r}")
        fsdp_dtype = "bfloat16" if self.compute_dtype == "auto" else self.compute_dtype  # fsdp runs on CUDA
        if self.fsdp_config is not None and self.load_in_4bit and self.quant_storage not in ("auto", fsdp_dtype):
            # FSDP shards parameters of one floating dtype: NF4 weights packed in uint8 next to the LoRA
            # weights fail (bitsandbytes' FSDP-QLoRA guide: store them in the compute dtype)
            raise RecipeError(f"recipe key 'quant_storage': under fsdp the NF4 weights must be stored in the compute "
                              f"dtype ({fsdp_dtype}), got {self.quant_storage!r}; leave it auto")
        if self.fsdp_config is not None and self.pulse == "adaptive":
            raise RecipeError("recipe key 'pulse': 'adaptive' does not support fsdp yet (its probe is not sharded, "
                              "docs/distributed.md); set pulse=v3.9 or v3.8 with fsdp_config")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise RecipeError(f"recipe key 'max_train_samples' must be >= 1, got {self.max_train_samples!r}")
        if self.stop_after is not None and self.stop_after < 1:
            raise RecipeError(f"recipe key 'stop_after' must be >= 1 or null, got {self.stop_after!r}")
        for key in ("model", "data", "output_dir", "cache_dir", "lora_target", "data_split"):
            if not getattr(self, key).strip():
                raise RecipeError(f"recipe key '{key}' cannot be empty")
        import emoq

        cls = getattr(emoq, self.optimizer, None)
        if not (isinstance(cls, type) and issubclass(cls, emoq.EmoOptimizer) and cls is not emoq.EmoOptimizer):
            known = sorted(n for n in emoq.__all__ if n.startswith("Emo") and n not in ("EmoOptimizer", "EmoPulse",
                                                                                      "EmoPulseScheduler"))
            raise RecipeError(f"recipe key 'optimizer': {self.optimizer!r} is not an emoq optimizer "
                              f"(known: {', '.join(known)})")
        bad_keys = [str(k) for k in self.optimizer_kwargs if not isinstance(k, str)]
        if bad_keys:
            raise RecipeError(f"recipe key 'optimizer_kwargs': keys must be names, got {bad_keys}")
        if "pulse" in self.optimizer_kwargs:
            raise RecipeError("recipe key 'optimizer_kwargs': set the pulse variant with the recipe key 'pulse'")
        if self.pulse not in emoq.EmoPulse.names():
            raise RecipeError(f"recipe key 'pulse' must be one of {', '.join(emoq.EmoPulse.names())}, "
                              f"got {self.pulse!r}")
        try:
            probe = cls([_probe_param()], **self.full_optimizer_kwargs)
        except (TypeError, ValueError, NotImplementedError) as err:
            raise RecipeError(f"recipe key 'optimizer_kwargs': {err}") from None
        from emoq.integrations import scope_problem

        problem = scope_problem(self.optimizer, probe.emo_pulse.initial_scope)
        if problem:
            raise RecipeError(f"recipe key 'optimizer_kwargs': {problem}")
        if self.recheck and not probe.emo_pulse.uses_recheck:
            raise RecipeError(f"recipe key 'recheck': needs {probe.emo_pulse.RECHECK_NEEDS}; the recipe has pulse "
                              f"{self.pulse!r} and {self.optimizer}; set recheck=false")
        return self

    @property
    def full_optimizer_kwargs(self) -> dict[str, Any]:
        """``optimizer_kwargs`` with the recipe's ``pulse``: what the optimizer is built with."""
        return {**self.optimizer_kwargs, "pulse": self.pulse}

    @property
    def optimizer_cls(self):
        import emoq

        return getattr(emoq, self.optimizer)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _probe_param():
    import torch

    return torch.nn.Parameter(torch.zeros(1))


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """Check ``value`` against the field's annotation (a string under postponed annotations)."""
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise RecipeError(f"recipe key '{key}' cannot be null")
    base = annotation.replace(" | None", "")
    if base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base == "str":
        if isinstance(value, str):
            return value
    elif base.startswith("dict"):
        if isinstance(value, dict):
            return value
    raise RecipeError(f"recipe key '{key}' must be {base}, got {value!r}")


def _yaml_loader():
    """PyYAML's safe loader that also reads ``5e-5`` and ``1e3`` as numbers (YAML 1.2), not strings.

    PyYAML implements YAML 1.1, whose floats need a dot (``5.0e-5``): ``lr: 5e-5`` would be the
    string ``"5e-5"``. Users mean a number; YAML 1.2's float pattern is added to the resolver.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    pattern = re.compile(r"^[-+]?(?:(?:[0-9][0-9_]*)\.[0-9_]*|\.[0-9_]+|[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$"
                         r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")
    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for first in "-+0123456789.":
        resolvers = [(tag, regexp) for tag, regexp in Loader.yaml_implicit_resolvers.get(first, [])
                     if tag != "tag:yaml.org,2002:float"]
        Loader.yaml_implicit_resolvers[first] = resolvers
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FloatOnly(pattern), list("-+0123456789."))
    return Loader


class _FloatOnly:
    """A float pattern that leaves integers to the int resolver (``1`` stays ``int``)."""

    def __init__(self, pattern: re.Pattern) -> None:
        self.pattern = pattern

    def match(self, text: str) -> bool:
        return bool(self.pattern.match(text)) and not re.fullmatch(r"[-+]?[0-9][0-9_]*", text)


def _yaml_load(text: str) -> Any:
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)


def _parse_override(item: str) -> tuple[str, Any]:
    import yaml

    if "=" not in item:
        raise RecipeError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = _yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe key '{key}': cannot parse {raw!r} ({err.__class__.__name__})") from None
    return key.strip(), value


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML (or none: the defaults), apply ``key=value`` overrides, validate."""
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise RecipeError(f"recipe file {str(path)!r} is not UTF-8 text (byte {err.start})") from None
        except OSError as err:
            raise RecipeError(f"recipe file {str(path)!r} cannot be read: {err.strerror or err}") from None
        try:
            raw = _yaml_load(text) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise RecipeError(f"recipe file {str(path)!r} must hold a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        key, value = _parse_override(item)
        raw[key] = value
    known = {f.name: f for f in fields(Recipe)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise RecipeError(f"recipe key '{key}' is unknown (known: {', '.join(sorted(known))})")
        values[key] = _coerce(key, value, str(known[key].type))
    return Recipe(**values).validate()
