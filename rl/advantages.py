"""Group-relative advantages (GRPO): each reward is compared with the other answers to its prompt."""
from __future__ import annotations

import torch

BASELINES = ("mean", "leave_one_out")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4,
    baseline: str = "mean",
) -> torch.Tensor:
    """A_i = (r_i - b_i) / (std_g(r) + eps) over each contiguous group of `group_size` rows.

    baseline="mean": b_i = mean_g(r), GRPO's (TRL, MMaDA, d1).
    baseline="leave_one_out": b_i = mean of the other G-1 rewards of the group, (sum_g r - r_i)/(G-1),
    as DiffuCoder's coupled-GRPO trainer (its `leave_one_out = True` branch). No extra G/(G-1) factor
    is applied (their code has none): note r_i - b_i = G/(G-1) (r_i - mean_g r), so the
    leave-one-out advantage is the mean-centred one scaled up by G/(G-1).
    std is the sample (unbiased, n-1) standard deviation of the group's rewards with either baseline:
    TRL's GRPOTrainer, d1 and DiffuCoder all call `torch.std`, and MMaDA does not say otherwise.
    eps = 1e-4 is TRL's constant. A group of one answer has no spread (and no other answer to
    compare with), so its advantage is 0 rather than NaN. With scale_by_std=False this is the
    unscaled advantage d1, wd1, SPG and DiffuCoder (scale_rewards: false) train with.
    """
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected an integer >= 1, got {group_size!r}")
    if eps <= 0:
        raise ValueError(f"eps: expected a value > 0 (it keeps zero-spread groups finite), got {eps!r}")
    if baseline not in BASELINES:
        raise ValueError(f"adv_baseline: expected one of {BASELINES}, got {baseline!r}")
    if rewards.dim() != 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"group_size: rewards of shape {tuple(rewards.shape)} do not split into groups of "
            f"{group_size}; expected a 1-D tensor whose length is a multiple of group_size"
        )
    groups = rewards.float().view(-1, group_size)
    if baseline == "leave_one_out" and group_size > 1:
        adv = groups - (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    else:  # a single answer is its own mean: advantage 0 (and NaN still shows through)
        adv = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(adv[:, :1])
        adv = adv / (std + eps)
    return adv.reshape(-1)
