"""Text <-> token tensors for prompts and fixed-length answers."""
from __future__ import annotations

import torch

from rl.models.tokenizer import EOT


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted, left-padded prompt ids and attention mask."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def encode_answers(tokenizer, completions: list[str], length: int) -> torch.Tensor:
    """Completion + end-of-turn, padded with end-of-text to `length` (LLaDA's SFT layout)."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    out = torch.full((len(completions), length), tokenizer.eos_token_id, dtype=torch.long)
    for i, text in enumerate(completions):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eot]
        if len(ids) > length:
            raise ValueError(f"answer {i} is {len(ids)} tokens, longer than the answer length {length}: {text[:80]!r}")
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def decode_answers(tokenizer, answer_ids: torch.Tensor, end_ids: list[int]) -> list[str]:
    """Text of each answer up to (not including) its first end token."""
    texts = []
    for row in answer_ids.tolist():
        cut = next((i for i, t in enumerate(row) if t in end_ids), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=False))
    return texts
