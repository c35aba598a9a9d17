"""Image sampler: MaskGIT decoding of image codes with a unified diffusion LM (MMaDA's text-to-image).

All image positions start masked. At step s of S the model predicts every position; each masked
position draws a code (Gumbel-max over the image codebook only, so no text token can appear in an
image); then the mask ratio cos(pi/2 * (s+1)/S) of the image is kept masked: the positions with the
lowest confidence, where confidence is the sampled code's log-probability plus Gumbel noise scaled
by remask_temperature * (1 - ratio) (MaskGIT; Chang et al. 2022). Committed positions stay. The
last step's ratio is 0, so every position ends committed. Classifier-free guidance is the text
sampler's (rollout.sampler.guided): unconditional rows have their prompt masked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rl.errors import fail
from rollout.sampler import SampleOutput, commit_top_k, guided, gumbel, sample_tokens


@dataclass
class ImageSamplerConfig:
    steps: int = 8
    temperature: float = 1.0  # of the code draw; 0 = argmax
    remask_temperature: float = 4.5  # of the Gumbel noise on confidence (MaskGIT's choice temperature)
    cfg_scale: float = 0.0

    def __post_init__(self):
        def bad(key, why):
            fail(f"rollout.image.{key}", getattr(self, key), why)

        if not isinstance(self.steps, int) or self.steps < 1:
            bad("steps", "expected a positive integer")
        for key in ("temperature", "remask_temperature", "cfg_scale"):
            if not isinstance(getattr(self, key), (int, float)) or getattr(self, key) < 0:
                bad(key, "expected a number >= 0")


def mask_schedule(step: int, steps: int) -> float:
    """Fraction of the image still masked after step `step` (0-based): cos(pi/2 * (step+1)/steps)."""
    return math.cos(math.pi / 2 * (step + 1) / steps)


@torch.no_grad()
def generate_image(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, mask_id: int, num_tokens: int,
                   image_offset: int, codebook_size: int, cfg: ImageSamplerConfig,
                   generator: torch.Generator | None = None) -> SampleOutput:
    """`num_tokens` image codes per prompt, returned as model token ids (image_offset + code)."""
    B, P = prompt_ids.shape
    N, dev = num_tokens, prompt_ids.device
    steps = min(cfg.steps, N)
    x = torch.cat([prompt_ids, torch.full((B, N), mask_id, dtype=prompt_ids.dtype, device=dev)], 1)
    attn = torch.cat([prompt_mask.long(), torch.ones(B, N, dtype=torch.long, device=dev)], 1)
    prompt_positions = torch.zeros_like(x, dtype=torch.bool)
    prompt_positions[:, :P] = prompt_mask.bool()
    commit = torch.full((B, N), -1, dtype=torch.long, device=dev)
    for s in range(steps):
        logits = guided(model, x, attn, prompt_positions, mask_id, cfg.cfg_scale, logits_span=(P, P + N))[0]
        logp = torch.log_softmax(logits[..., image_offset:image_offset + codebook_size].double(), -1)
        unknown = x[:, P:] == mask_id
        draw = image_offset + sample_tokens(logp, cfg.temperature, generator)
        x0 = torch.where(unknown, draw, x[:, P:])
        chosen_logp = logp.gather(-1, (x0 - image_offset)[..., None]).squeeze(-1)
        ratio = mask_schedule(s, steps)
        # Keep at least one position masked until the last step, and always commit at least one.
        n_masked = int(unknown[0].sum())
        keep_masked = 0 if s == steps - 1 else max(1, min(n_masked - 1, math.floor(N * ratio)))
        noise = cfg.remask_temperature * (1 - ratio) * gumbel(chosen_logp.shape, generator, dev)
        confidence = torch.where(unknown, chosen_logp + noise, torch.inf)
        remask = commit_top_k(-confidence, torch.full((B,), keep_masked, device=dev))  # the least confident
        newly = unknown & ~remask
        commit[newly] = s
        x[:, P:] = torch.where(remask, torch.full_like(x0, mask_id), x0)
    mult = 2 if cfg.cfg_scale else 1
    return SampleOutput(answer_ids=x[:, P:], commit_step=commit, forward_passes=steps,
                        row_steps=torch.full((B,), steps, dtype=torch.long),
                        sampled=torch.full((B,), N, dtype=torch.long), row_tokens=steps * mult * x.numel())
