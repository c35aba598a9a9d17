"""Per-step metrics from a scored batch (verl's names where they exist). Plain functions, no Ray."""
from __future__ import annotations

import math
import numbers
import time

import torch

from rewards.worker import Scores
from rl.batch import RolloutBatch


def accuracies(rows: list[dict], accuracy: list[float], prefix: str) -> dict:
    """`prefix`/accuracy over all rows and `prefix`/<task>/accuracy per task, each over the rows a
    correctness reward applies to (accuracy not NaN); a key with no such row is left out."""
    acc = torch.tensor(accuracy)
    groups = {"": list(range(len(accuracy)))}
    for i, r in enumerate(rows):
        if r.get("task") is not None:
            groups.setdefault(f"{r['task']}/", []).append(i)
    return {f"{prefix}/{name}accuracy": acc[idx].nanmean().item()
            for name, idx in sorted(groups.items()) if (~acc[idx].isnan()).any()}


def batch_metrics(batch: RolloutBatch, scores: Scores, gen_length: int, step_seconds: float) -> dict:
    """Per-step rollout and reward metrics. Length metrics cover text answers."""
    text = torch.tensor([x is None for x in batch.images])
    lengths = batch.answer_mask.sum(-1)[text] if text.any() else batch.answer_mask.sum(-1)
    # A text answer is clipped when its last position (gen_length; image answers may be longer) is
    # still inside the answer mask: no end token came before it.
    clipped = batch.answer_mask[:, min(gen_length, batch.answer_mask.shape[1]) - 1] > 0
    gen_tokens = batch.answer_ids.numel()
    out = {
        "reward/mean": float(batch.rewards.mean()),
        "reward/std": float(batch.rewards.std()),
        "response_length/mean": float(lengths.float().mean()),
        "response_length/max": float(lengths.max()),
        "response_length/clip_ratio": float(clipped[text].float().mean()) if text.any() else 0.0,
        "perf/rollout_tokens_per_s": gen_tokens / max(batch.seconds, 1e-9),
        "rollout/tokens_per_step": float(batch.tokens_per_step.mean()),
        "perf/throughput": (batch.attention_mask.sum().item()) / max(step_seconds, 1e-9),
    }
    out.update(accuracies(batch.rows, scores.accuracy, "train"))
    for key, values in scores.components.items():
        vals = [v for v in values if not math.isnan(v)]  # NaN = not applicable to that row
        if vals:
            out[f"reward/{key}/mean"] = sum(vals) / len(vals)
    out.update(extras_metrics(scores.extras))
    out.update({f"reward/{k}": v for k, v in scores.events.items()})  # math-verify timeouts, crashes, ...
    out["reward/frac_zero_std"] = frac_zero_std(batch.rewards, batch.group_size)
    return out


def staleness(batch: RolloutBatch, step: int) -> dict:
    """How many updates the weights that wrote the batch lag behind the weights step `step`'s update
    starts from (those of step - 1): 0 when rollouts wait for the learner, 1 at trainer.rollout_ahead=1."""
    if batch.policy_version is None:
        return {}
    lag = (step - 1 - batch.policy_version).float()
    return {"rollout/staleness": float(lag.mean()), "rollout/staleness_max": float(lag.max())}


def extras_metrics(extras: dict[str, list]) -> dict:
    """reward/<component>/<key>: the mean of the numeric values of each extra key of verl-style reward
    results (verl logs them as reward_extra_info); keys with no numeric value are left out."""
    out = {}
    for key, values in extras.items():
        vals = [float(v) for v in values if isinstance(v, numbers.Real) and math.isfinite(v)]
        if vals:
            out[f"reward/{key}"] = sum(vals) / len(vals)
    return out


def frac_zero_std(rewards: torch.Tensor, group_size: int) -> float:
    """TRL's frac_reward_zero_std: the fraction of groups whose rewards are all equal. Their advantages
    are all 0, so they give no gradient."""
    groups = rewards.view(-1, group_size)
    return float((groups.max(1).values == groups.min(1).values).float().mean())


class timer:
    """`with timer(out, "gen"):` stores the block's wall time in out["gen"]."""

    def __init__(self, out: dict, key: str):
        self.out, self.key = out, key

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.out[self.key] = time.perf_counter() - self.t0
