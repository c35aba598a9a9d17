"""One policy update on a rollout batch: mu inner steps of an estimator's loss (plain torch).

The learner passes its DeepSpeed backward/step as `step`; the loop itself knows nothing of DeepSpeed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from rl.batch import RolloutBatch
from rl.estimators import Estimator


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
