"""The one batch type that flows through a training step."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

# The placeholder id of a model's image-newline embedding (LLaDA-V): the same in every image, never renumbered.
IMAGE_NEWLINE = -(2**31)


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
    # Per sample, for rewards and metrics (the learner needs none of them).
    rows: list[dict] = field(default_factory=list)  # the task row each answer is to
    completions: list[str] = field(default_factory=list)  # decoded text answers ("" for an image answer)
    images: list[list[int] | None] = field(default_factory=list)  # image codes of an image answer, else None
    commit_step: torch.Tensor | None = None  # [B, L] long, denoising step that committed each token (-1: none)
    tokens_per_step: torch.Tensor | None = None  # [B] float, answer tokens committed per denoising step
    policy_version: torch.Tensor | None = None  # [B] long, the training step whose weights wrote each answer
    seconds: float = 0.0  # wall time of the generation (of the slowest worker, after concat)
    # Continuous image inputs (LLaDA-V): prompt id -(1 + k) is row k of the image features, i.e. token
    # k % image_tokens of image k // image_tokens (and IMAGE_NEWLINE, where the model appends its newline
    # embedding). The images of a batch are its prompts' (each once, whatever G is), so they are
    # batch-wide, not per sample: select() keeps them whole.
    pixels: torch.Tensor | None = None  # [n_images, H, W, 3] uint8, at the vision tower's input size
    image_tokens: int = 0  # feature rows per image (the tower's tokens)

    BATCH_WIDE = ("pixels", "image_tokens", "group_size", "seconds")

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

    def select(self, rows: slice) -> RolloutBatch:
        """The samples `rows` of every per-sample field."""
        def part(name):
            x = getattr(self, name)
            return x[rows] if isinstance(x, (torch.Tensor, list)) and name not in self.BATCH_WIDE else x
        return RolloutBatch(**{f.name: part(f.name) for f in fields(self)})

    def own_images(self) -> RolloutBatch:
        """The batch with its image table cut to the images its own prompts show, placeholders renumbered:
        a learner rank's shard of a batch would otherwise run the tower on every rank's images."""
        if self.pixels is None:
            return self
        n = self.image_tokens
        rows = (self.prompt_ids < 0) & (self.prompt_ids != IMAGE_NEWLINE)
        k = -self.prompt_ids[rows] - 1
        used = torch.unique(k // n)
        position = torch.zeros(len(self.pixels), dtype=torch.long)
        position[used] = torch.arange(len(used))
        ids = self.prompt_ids.clone()
        ids[rows] = -(position[k // n] * n + k % n + 1)
        return replace(self, prompt_ids=ids, pixels=self.pixels[used])

    def to(self, device) -> RolloutBatch:
        """The tensors on `device`."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    @staticmethod
    def concat(parts: list[RolloutBatch], pad_id: int) -> RolloutBatch:
        """Batches of consecutive prompts (one per rollout worker) joined in order: prompts left-padded
        to the widest, everything else concatenated; image placeholders renumbered into the joined
        image table."""
        parts = _shared_images(parts)

        def cat(name):
            values = [getattr(p, name) for p in parts]
            if any(v is None for v in values):
                return None
            return torch.cat(values) if isinstance(values[0], torch.Tensor) else [x for v in values for x in v]
        return RolloutBatch(
            prompt_ids=RolloutBatch.left_pad([p.prompt_ids for p in parts], pad_id),
            prompt_mask=RolloutBatch.left_pad([p.prompt_mask for p in parts], 0),
            group_size=parts[0].group_size, seconds=max(p.seconds for p in parts),
            pixels=cat("pixels"), image_tokens=max(p.image_tokens for p in parts),
            **{name: cat(name) for name in ("answer_ids", "answer_mask", "advantages", "rewards", "rows",
                                            "completions", "images", "commit_step", "tokens_per_step",
                                            "policy_version")})

    @staticmethod
    def left_pad(parts: list[torch.Tensor], pad_value: int) -> torch.Tensor:
        """Stack [b_i, P_i] tensors into [sum b_i, max P_i], padding on the left."""
        width = max(p.shape[1] for p in parts)
        return torch.cat([torch.nn.functional.pad(p, (width - p.shape[1], 0), value=pad_value) for p in parts])


def _shared_images(parts: list[RolloutBatch]) -> list[RolloutBatch]:
    """Parts with their placeholder ids shifted past the image rows of the parts before them."""
    if all(p.pixels is None for p in parts):
        return parts
    some = next(p for p in parts if p.pixels is not None)
    out, offset = [], 0
    for p in parts:
        if p.pixels is None:  # a text-only part beside image parts: an empty table, so cat() keeps the rest
            out.append(replace(p, pixels=some.pixels[:0], image_tokens=some.image_tokens))
            continue
        rows = (p.prompt_ids < 0) & (p.prompt_ids != IMAGE_NEWLINE)
        shifted = torch.where(rows, p.prompt_ids - offset, p.prompt_ids)
        out.append(replace(p, prompt_ids=shifted))
        offset += len(p.pixels) * p.image_tokens
    return out
