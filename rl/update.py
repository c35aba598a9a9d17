"""One policy update on a rollout batch: mu inner steps of an estimator's loss (plain torch).

The learner passes its DeepSpeed backward/step as `step` (and `accumulate` when passes run in
micro-batches); the loop itself knows nothing of DeepSpeed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from rl.batch import RolloutBatch
from rl.errors import fail
from rl.estimators import SPG, WD1, ClippedGRPO, Estimator, MaskPlan, TokenLogps


def loss_share(estimator: Estimator, batch: RolloutBatch, plan: MaskPlan) -> float:
    """The count that normalises `estimator`'s loss on `batch`: its loss is a sum of per-row (or
    per-group) terms divided by this count, so a micro-batch's loss times share(chunk)/share(batch)
    is that chunk's part of the whole batch's loss, and the parts add up to it."""
    if isinstance(estimator, ClippedGRPO):
        weight = estimator.token_estimate(batch, plan, torch.zeros(plan.score.shape, device=plan.score.device))[1]
        if estimator.aggregation == "token_mean":  # tokens pooled over the batch
            return float(weight.sum())
        return float((weight.sum(-1) > 0).sum())  # seq_mean_token_mean: rows with a counted token
    if isinstance(estimator, WD1):  # the mean over groups
        return len(batch) / batch.group_size
    if isinstance(estimator, SPG):  # sum_i (...) c_i / sum_i c_i
        return float((batch.answer_mask > 0).sum())
    raise ValueError(f"trainer.micro_batch: no micro-batch weighting is known for estimator {estimator.name!r}; "
                     "use trainer.micro_batch=0")


def _chunks(rows: int, micro_batch: int, group_size: int, name: str) -> list[slice]:
    if micro_batch < 0:
        fail("trainer.micro_batch", micro_batch, "expected an integer >= 0 (0 = the whole shard)")
    if micro_batch == 0 or micro_batch >= rows:
        return [slice(0, rows)]
    if name == WD1.name and micro_batch % group_size:
        fail("trainer.micro_batch", micro_batch, f"expected 0 or a multiple of algorithm.group_size={group_size} "
             "(wd1's loss weighs whole groups)")
    return [slice(i, min(i + micro_batch, rows)) for i in range(0, rows, micro_batch)]


def _plan_rows(plan: MaskPlan, rows: slice, device=None) -> MaskPlan:
    noise, score = plan.noise[:, rows], plan.score[:, rows]
    if device is not None:
        noise, score = noise.to(device), score.to(device)
    return MaskPlan(noise, score, plan.t)


def _logp_rows(lp: TokenLogps | None, rows: slice) -> TokenLogps | None:
    if lp is None:
        return None
    return TokenLogps(lp.logp[:, rows], None if lp.entropy is None else lp.entropy[:, rows])


def _no_grad_logps(model, estimator: Estimator, batch: RolloutBatch, plan: MaskPlan, mask_id: int,
                   chunks: list[slice], device=None) -> TokenLogps:
    """Log-probs of the whole batch, one chunk of rows per forward, computed on `device` (the model's,
    when it is not the batch's) and returned on the batch's device."""
    if len(chunks) == 1 and device is None:
        return estimator.token_logps(model, batch, plan, mask_id)
    parts = []
    for rows in chunks:
        part = batch.select(rows)
        lp = estimator.token_logps(model, part if device is None else part.to(device),
                                   _plan_rows(plan, rows, device), mask_id)
        parts.append(lp)
    home = batch.answer_ids.device
    entropy = None if parts[0].entropy is None else torch.cat([p.entropy for p in parts], 1).to(home)
    return TokenLogps(torch.cat([p.logp for p in parts], 1).to(home), entropy)


def policy_update(policy, ref, estimator: Estimator, batch: RolloutBatch, mu: int, mask_id: int,
                  step: Callable[[torch.Tensor], dict], generator: torch.Generator | None = None,
                  micro_batch: int = 0, accumulate: Callable[[torch.Tensor], None] | None = None,
                  ref_device: torch.device | None = None) -> dict:
    """Rollouts stay fixed for all mu inner steps; old and reference log-probs are computed once per
    inner-step mask, before any weight changes, so every inner step's ratio is against pi_old (the
    first step's old log-probs are its own, detached).

    micro_batch > 0: every forward (old, reference, policy) takes at most that many rows. A chunk's
    loss is weighted by its loss_share, so the chunk losses add up to the one-pass loss and so do their
    gradients: accumulate(loss) backpropagates each chunk but the last, step(loss) the last one and
    applies the optimizer, once per inner step. Metrics are the same weighted sums (entropy weighted
    by scored tokens), i.e. the one-pass metrics up to rounding.
    ref_device: where `ref` runs when that is not the batch's device (a reference kept on the CPU).
    """
    plans = estimator.plan(batch, mu, generator)
    chunks = _chunks(len(batch), micro_batch, batch.group_size, estimator.name)
    if len(chunks) > 1 and accumulate is None:
        raise ValueError("policy_update: micro_batch needs accumulate (a backward without an optimizer step)")
    with torch.no_grad():
        # Before the first inner step the policy is pi_old, on the same input: its old log-probs are
        # that step's own policy log-probs, detached (the loss reads old=None so). One pass fewer.
        old = ([None] + [_no_grad_logps(policy, estimator, batch, p, mask_id, chunks) for p in plans[1:]]
               if estimator.needs_old else [None] * mu)
        ref_lp = ([_no_grad_logps(ref, estimator, batch, p, mask_id, chunks, ref_device) for p in plans]
                  if estimator.needs_ref else [None] * mu)
    totals: dict[str, float] = {}
    for n, plan in enumerate(plans):
        if len(chunks) == 1:
            logp = estimator.token_logps(policy, batch, plan, mask_id)
            loss, metrics = estimator.loss(batch, plan, logp, old[n], ref_lp[n])
            metrics.update(step(loss))
        else:
            metrics = _chunked_step(policy, estimator, batch, plan, mask_id, chunks, old[n], ref_lp[n],
                                    step, accumulate)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v / mu
    totals["skipped_steps"] = totals.get("skipped_steps", 0.0) * mu  # a count, not a mean
    return totals


def _chunked_step(policy, estimator, batch, plan, mask_id, chunks, old, ref, step, accumulate) -> dict:
    total = max(loss_share(estimator, batch, plan), 1.0)  # the estimators clamp an empty count to 1 too
    scored = max(float(plan.score.sum()), 1.0)
    metrics: dict[str, float] = {}
    for i, rows in enumerate(chunks):
        part, part_plan = batch.select(rows), _plan_rows(plan, rows)
        logp = estimator.token_logps(policy, part, part_plan, mask_id)
        loss, m = estimator.loss(part, part_plan, logp, _logp_rows(old, rows), _logp_rows(ref, rows))
        share = loss_share(estimator, part, part_plan) / total
        ent_share = float(part_plan.score.sum()) / scored
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v * (ent_share if k == "entropy" else share)
        if i < len(chunks) - 1:
            accumulate(loss * share)
        else:
            metrics.update(step(loss * share))
    return metrics
