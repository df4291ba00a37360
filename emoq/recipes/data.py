"""Training data for recipes: the offline pydoc Q/A set, or any `datasets` source."""

from __future__ import annotations

import random
import re
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


def load_examples(recipe: Recipe) -> list[dict[str, str]]:
    """Examples as dicts with ``question``/``answer`` (or ``text``), shuffled with the seed."""
    if recipe.data == BUILTIN_DATA:
        rows = pydoc_qa_pairs()
    elif recipe.data.startswith("builtin:"):
        raise RecipeError(f"recipe key 'data': unknown builtin {recipe.data!r} (known: {BUILTIN_DATA})")
    else:
        import datasets

        ds = datasets.load_dataset(recipe.data, recipe.data_config, split=recipe.data_split)
        needed = [recipe.text_field] if recipe.text_field else [recipe.prompt_field, recipe.response_field]
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            raise RecipeError(f"recipe key '{'text_field' if recipe.text_field else 'prompt_field'}': column(s) "
                              f"{missing} not in {recipe.data!r} (columns: {ds.column_names})")
        if recipe.text_field:
            rows = [{"text": r[recipe.text_field]} for r in ds]
        else:
            rows = [{"question": r[recipe.prompt_field], "answer": r[recipe.response_field]} for r in ds]
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
    """A ``datasets.Dataset`` of input_ids/attention_mask/labels; the prompt is masked (-100)."""
    import datasets

    out = {"input_ids": [], "attention_mask": [], "labels": []}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for row in rows:
        if "text" in row:
            prompt_ids, full = [], tokenizer(row["text"], add_special_tokens=True)["input_ids"]
        elif getattr(tokenizer, "chat_template", None):
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
        n_pad = seq_len - len(full)
        out["input_ids"].append(full + [pad] * n_pad)
        out["attention_mask"].append([1] * len(full) + [0] * n_pad)
        out["labels"].append(labels + [-100] * n_pad)
    return datasets.Dataset.from_dict(out)


def _ids(encoded: Any) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)
