"""The one batch type that flows through a training step."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RolloutBatch:
    """G answers per prompt, prompts left-padded to a common length P, answers of fixed length L.

    Row i of every tensor is one (prompt, answer) sample; rows of one group are contiguous.
    """

    prompt_ids: torch.Tensor  # [B, P] long, left-padded
    prompt_mask: torch.Tensor  # [B, P] long, 1 = real prompt token, 0 = padding
    answer_ids: torch.Tensor  # [B, L] long, generated tokens (end-of-text padding included)
    answer_mask: torch.Tensor  # [B, L] float, 1 = token counted in the loss (up to the first end token)
    advantages: torch.Tensor | None = None  # [B] float
    rewards: torch.Tensor | None = None  # [B] float
    group_size: int = 1
    extras: dict = field(default_factory=dict)  # per-sample lists (texts, tasks, ground truths)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.answer_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        ones = torch.ones_like(self.answer_ids)
        return torch.cat([self.prompt_mask.to(ones.dtype), ones], dim=1)

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @staticmethod
    def left_pad(parts: list[torch.Tensor], pad_value: int) -> torch.Tensor:
        """Stack [b_i, P_i] tensors into [sum b_i, max P_i], padding on the left."""
        width = max(p.shape[1] for p in parts)
        return torch.cat([torch.nn.functional.pad(p, (width - p.shape[1], 0), value=pad_value) for p in parts])
