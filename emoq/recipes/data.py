"""Training data for recipes: the offline pydoc Q/A set, a user's local files, or any `datasets` source."""

from __future__ import annotations

import codecs
import random
import re
from pathlib import Path
from typing import Any

from emoq.recipes.config import BUILTIN_DATA, Recipe, RecipeError

_HEADING = re.compile(r"^(?P<title>[^\n]+)\n(?P<rule>[*=\-]{3,})$", re.M)


def pydoc_qa_pairs() -> list[dict[str, str]]:
    """Question/answer pairs from Python's own reference documentation (``pydoc_data.topics``).

    Each topic is cut at its section headings; every prose paragraph of a section becomes one
    answer, asked for by a question naming the section ("In Python, explain <section>." for the
    first paragraph, "... (part k)" for the next). Code blocks (indented) stay in the answers
    they follow. Topics repeat sections of one another (e.g. "if" and "compound"): an answer is
    kept once, so no held-out answer is also a training answer. Deterministic: same Python
    version, same pairs.
    """
    from pydoc_data.topics import topics

    pairs, seen = [], set()
    for key in sorted(topics):
        text = topics[key]
        marks = list(_HEADING.finditer(text))
        sections = []
        for i, mark in enumerate(marks):
            end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
            sections.append((mark["title"].strip(), text[mark.end():end]))
        if not marks:
            sections = [(key, text)]
        for title, body in sections:
            paragraphs = []
            for block in re.split(r"\n\s*\n", body):
                if not block.strip():
                    continue
                if block.startswith("   ") and paragraphs:  # a code block: keep it with its paragraph
                    paragraphs[-1] += "\n\n" + block.rstrip()
                elif not block.startswith("   "):
                    paragraphs.append(" ".join(block.split()))
            for k, para in enumerate(paragraphs):
                if len(para) < 80 or para in seen:
                    continue
                seen.add(para)
                question = f"In Python, explain {title}." if k == 0 else \
                    f"In Python, tell me more about {title} (part {k + 1})."
                pairs.append({"question": question, "answer": para})
    return pairs


DATA_FORMS = ("plain UTF-8 text of any extension (one example per line; see text_sample_by), .jsonl/.json, "
              ".csv, .parquet, or a folder of such files")
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def looks_like_path(value: str) -> bool:
    """Whether a model/data value is meant as a local path rather than a Hub name (``org/name``)."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value or \
        Path(value).suffix.lower() in (*_BUILDERS, ".txt")


def _builder(file: Path) -> str:
    """The `datasets` builder that reads ``file``: by extension, else plain text if it is UTF-8 text."""
    builder = _BUILDERS.get(file.suffix.lower())
    if builder:
        return builder
    try:
        with file.open("rb") as f:
            head = f.read(1 << 16)
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except (OSError, UnicodeDecodeError):
        head = b"\0"
    if b"\0" in head:
        raise RecipeError(f"recipe key 'data': {str(file)!r} is not a supported data file (supported: {DATA_FORMS})")
    return "text"


def local_files(path: Path) -> tuple[str, list[Path]]:
    """The `datasets` builder and the files of a local data file or folder (hidden entries skipped)."""
    if path.is_file():
        return _builder(path), [path]
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise RecipeError(f"recipe key 'data': the folder {str(path)!r} holds no data files (supported: {DATA_FORMS})")
    kinds = {f: _builder(f) for f in files}
    if len(set(kinds.values())) > 1:
        found = ", ".join(sorted({f"{k} ({f.name})" for f, k in kinds.items()}))
        raise RecipeError(f"recipe key 'data': the folder {str(path)!r} mixes kinds of files ({found}); use one kind")
    return kinds[files[0]], files


def _load_dataset(recipe: Recipe) -> tuple[Any, bool]:
    """The `datasets` table of a local path or a Hub name, and whether it is plain text."""
    import datasets

    local = Path(recipe.data).expanduser()
    try:
        if local.exists():
            builder, files = local_files(local)
            extra = {"sample_by": recipe.text_sample_by} if builder == "text" else {}
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split=recipe.data_split,
                                         **extra), builder == "text"
        if looks_like_path(recipe.data):
            raise RecipeError(f"recipe key 'data': {recipe.data!r} does not exist")
        return datasets.load_dataset(recipe.data, recipe.data_config, split=recipe.data_split), False
    except RecipeError:
        raise
    except Exception as err:  # datasets' errors are many; the user needs the one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RecipeError(f"recipe key 'data': cannot load {recipe.data!r}: {first}") from None


def load_examples(recipe: Recipe) -> list[dict[str, str]]:
    """Examples as dicts with ``question``/``answer`` (or ``text``), shuffled with the seed.

    A plain-text source gives one ``text`` example per line (``text_sample_by``: or per
    blank-line separated paragraph, or per file); empty ones are dropped.
    """
    if recipe.data == BUILTIN_DATA:
        rows = pydoc_qa_pairs()
    elif recipe.data.startswith("builtin:"):
        raise RecipeError(f"recipe key 'data': unknown builtin {recipe.data!r} (known: {BUILTIN_DATA})")
    else:
        ds, plain = _load_dataset(recipe)
        if plain and recipe.text_field not in (None, "text"):
            raise RecipeError(f"recipe key 'text_field': a plain-text source has one column, 'text' "
                              f"(got {recipe.text_field!r})")
        text_field = "text" if plain else recipe.text_field
        needed = [text_field] if text_field else [recipe.prompt_field, recipe.response_field]
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            raise RecipeError(f"recipe key '{'text_field' if text_field else 'prompt_field'}': column(s) "
                              f"{missing} not in {recipe.data!r} (columns: {ds.column_names})")
        if text_field:
            texts = (r[text_field] for r in ds)
            rows = [{"text": str(t)} for t in texts if t is not None and str(t).strip()]
        else:
            rows = [{"question": str(r[recipe.prompt_field]), "answer": str(r[recipe.response_field])} for r in ds]
    random.Random(recipe.seed).shuffle(rows)
    if len(rows) <= recipe.eval_size:
        raise RecipeError(f"recipe key 'eval_size': {recipe.eval_size} leaves no training example "
                          f"({len(rows)} examples in {recipe.data!r})")
    return rows


def split(rows: list[dict[str, str]], recipe: Recipe) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Held-out examples first (so a change of ``max_train_samples`` never moves them)."""
    held_out, train = rows[:recipe.eval_size], rows[recipe.eval_size:]
    if recipe.max_train_samples is not None:
        train = train[:recipe.max_train_samples]
    return train, held_out


def tokenize(rows: list[dict[str, str]], tokenizer: Any, seq_len: int):
    """A ``datasets.Dataset`` of input_ids/attention_mask/labels.

    Question/answer rows: one sequence each, cut at ``seq_len``, the prompt masked (-100); a row
    whose prompt alone fills ``seq_len`` is dropped. Plain-text rows are packed, as LM
    fine-tuning tools do: each document's tokens (then EOS) are concatenated and cut into
    ``seq_len`` blocks, so no text is thrown away; the last block is padded.
    """
    import datasets

    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def add(ids: list[int], labels: list[int]) -> None:
        n_pad = seq_len - len(ids)
        out["input_ids"].append(ids + [pad] * n_pad)
        out["attention_mask"].append([1] * len(ids) + [0] * n_pad)
        out["labels"].append(labels + [-100] * n_pad)

    stream: list[int] = []
    for row in rows:
        if "text" in row:
            doc = tokenizer(row["text"], add_special_tokens=True)["input_ids"]
            if tokenizer.eos_token_id is not None and (not doc or doc[-1] != tokenizer.eos_token_id):
                doc = doc + [tokenizer.eos_token_id]
            stream.extend(doc)
            continue
        if getattr(tokenizer, "chat_template", None):
            user = [{"role": "user", "content": row["question"]}]
            prompt_ids = _ids(tokenizer.apply_chat_template(user, tokenize=True, add_generation_prompt=True))
            full = _ids(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": row["answer"]}],
                                                      tokenize=True))
        else:
            prompt_ids = tokenizer(f"Question: {row['question']}\nAnswer: ")["input_ids"]
            full = prompt_ids + tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                full = full + [tokenizer.eos_token_id]
        full = full[:seq_len]
        n_prompt = min(len(prompt_ids), len(full))
        labels = [-100] * n_prompt + full[n_prompt:]
        if all(t == -100 for t in labels):
            continue  # the prompt alone fills seq_len: nothing to learn from this row
        add(full, labels)
    for start in range(0, len(stream), seq_len):
        block = stream[start:start + seq_len]
        if len(block) > 1:  # a lone last token has no next token to predict
            add(block, list(block))
    return datasets.Dataset.from_dict(out)


def _ids(encoded: Any) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)
