"""Held-out evaluation: sample k answers per prompt and report pass@1 and pass@k."""
from __future__ import annotations

from collections.abc import Callable

import torch

from rl.data.encode import decode_answers, encode_prompts
from rl.models.tokenizer import end_token_ids
from rollout.sampler import SamplerConfig, generate

# score(completions, rows) -> 1.0 / 0.0 per completion
Scorer = Callable[[list[str], list[dict]], list[float]]


@torch.no_grad()
def pass_at_k(model, tokenizer, rows: list[dict], k: int, sampler: SamplerConfig, score: Scorer,
              batch_size: int = 64, seed: int = 0) -> dict:
    """pass@1 = mean success over the k samples; pass@k = fraction of prompts with any success
    (the unbiased estimator with n = k samples)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    end_ids = end_token_ids(tokenizer)
    per_prompt = []
    expanded = [row for row in rows for _ in range(k)]
    for lo in range(0, len(expanded), batch_size):
        chunk = expanded[lo: lo + batch_size]
        ids, mask = encode_prompts(tokenizer, [r["prompt"] for r in chunk])
        out = generate(model, ids, mask, tokenizer.mask_token_id, sampler, gen)
        per_prompt += score(decode_answers(tokenizer, out.answer_ids, end_ids), chunk)
    model.train(was_training)
    hits = torch.tensor(per_prompt, dtype=torch.float64).view(len(rows), k) > 0.5
    return {"pass@1": hits.float().mean().item(), f"pass@{k}": hits.any(1).float().mean().item(), "n": len(rows)}
