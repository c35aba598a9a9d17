"""Group-relative advantages (GRPO): each reward is compared with the other answers to its prompt."""
from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """A_i = (r_i - mean_g(r)) / (std_g(r) + eps) over each contiguous group of `group_size` rows.

    std is the sample (unbiased, n-1) standard deviation: TRL's GRPOTrainer, d1 and DiffuCoder all
    call `torch.std`, and MMaDA does not say otherwise. eps = 1e-4 is TRL's constant. A group of one
    answer has no spread, so its advantage is 0 rather than NaN. With scale_by_std=False this is the
    mean-centred advantage d1, wd1 and SPG train with.
    """
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected an integer >= 1, got {group_size!r}")
    if eps <= 0:
        raise ValueError(f"eps: expected a value > 0 (it keeps zero-spread groups finite), got {eps!r}")
    if rewards.dim() != 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"group_size: rewards of shape {tuple(rewards.shape)} do not split into groups of "
            f"{group_size}; expected a 1-D tensor whose length is a multiple of group_size"
        )
    groups = rewards.float().view(-1, group_size)
    adv = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(adv[:, :1])
        adv = adv / (std + eps)
    return adv.reshape(-1)
