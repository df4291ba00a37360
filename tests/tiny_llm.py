"""A tiny Llama, a character tokenizer and a text dataset built offline, for integration tests."""

from __future__ import annotations

import string
from pathlib import Path

import torch

TEXTS = [f"Q: what is {a} plus {b}? A: {a + b}." for a in range(12) for b in range(8)]


def char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = ["<pad>", "<s>", "</s>", "<unk>"] + list(string.printable[:95])
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(alphabet)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64) with its tokenizer, saved as safetensors under ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tokenized_dataset(tokenizer, texts=TEXTS, max_len: int = 32):
    from datasets import Dataset

    enc = tokenizer(texts, truncation=True, max_length=max_len, padding="max_length")
    labels = [[t if m else -100 for t, m in zip(ids, mask)] for ids, mask in zip(enc["input_ids"],
                                                                                  enc["attention_mask"])]
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                              "labels": labels})
