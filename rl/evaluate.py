"""Held-out evaluation: sample k answers per prompt and report pass@1 and pass@k."""
from __future__ import annotations

from collections.abc import Callable

import torch

from rollout.rollout import rollout
from rollout.sampler import SamplerConfig

# score(completions, rows) -> 1.0 / 0.0 per completion
Scorer = Callable[[list[str], list[dict]], list[float]]


@torch.no_grad()
def pass_at_k(model, tokenizer, rows: list[dict], k: int, sampler: SamplerConfig, score: Scorer,
              batch_size: int = 64, seed: int = 0) -> dict:
    """pass@1 = mean success over the k samples; pass@k = fraction of prompts with any success
    (the unbiased estimator with n = k samples)."""
    was_training = model.training
    model.eval()
    batch = rollout(model, tokenizer, rows, k, sampler, torch.Generator().manual_seed(seed), micro_batch=batch_size)
    model.train(was_training)
    scores = score(batch.completions, batch.rows)
    hits = torch.tensor(scores, dtype=torch.float64).view(len(rows), k) > 0.5
    return {"pass@1": hits.float().mean().item(), f"pass@{k}": hits.any(1).float().mean().item(), "n": len(rows)}
