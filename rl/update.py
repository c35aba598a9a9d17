"""One policy update on a rollout batch: mu inner steps of an estimator's loss (plain torch).

The learner actor wraps this with DeepSpeed; the loop itself is the same in both.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from rl.batch import RolloutBatch
from rl.estimators import Estimator


def torch_step(model, optimizer, max_grad_norm: float) -> Callable[[torch.Tensor], dict]:
    """backward + clip + step; a non-finite grad norm skips the step (and is reported)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(loss: torch.Tensor) -> dict:
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        skipped = not math.isfinite(norm)
        if not skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm, "skipped_steps": float(skipped)}

    return step


def policy_update(policy, ref, estimator: Estimator, batch: RolloutBatch, mu: int, mask_id: int,
                  step: Callable[[torch.Tensor], dict], generator: torch.Generator | None = None) -> dict:
    """Rollouts stay fixed for all mu inner steps; old and reference log-probs are computed once per
    inner-step mask, before any weight changes, so every inner step's ratio is against pi_old."""
    plans = estimator.plan(batch, mu, generator)
    with torch.no_grad():
        old = [estimator.token_logps(policy, batch, p, mask_id) for p in plans] if estimator.needs_old else [None] * mu
        ref_lp = [estimator.token_logps(ref, batch, p, mask_id) for p in plans] if estimator.needs_ref else [None] * mu
    totals: dict[str, float] = {}
    for n, plan in enumerate(plans):
        logp = estimator.token_logps(policy, batch, plan, mask_id)
        loss, metrics = estimator.loss(batch, plan, logp, old[n], ref_lp[n])
        metrics.update(step(loss))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v / mu
    totals["skipped_steps"] = totals.get("skipped_steps", 0.0) * mu  # a count, not a mean
    return totals
