"""Masked-diffusion SFT loss (LLaDA's supervised objective)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sft_loss(model, prompt_ids, prompt_mask, answer_ids, mask_id: int, generator=None, eps: float = 1e-3):
    """Mask each answer token with probability t ~ U(eps, 1) (one t per row), prompt left clean; cross-entropy
    on the masked tokens weighted 1/t, summed and divided by the answer length, averaged over rows."""
    B, L = answer_ids.shape
    t = torch.rand(B, 1, generator=generator, device=answer_ids.device)
    p_mask = (1 - eps) * t + eps
    masked = torch.rand(B, L, generator=generator, device=answer_ids.device) < p_mask
    noisy = torch.where(masked, torch.full_like(answer_ids, mask_id), answer_ids)
    input_ids = torch.cat([prompt_ids, noisy], 1)
    attn = torch.cat([prompt_mask.long(), torch.ones_like(answer_ids)], 1)
    logits = model(input_ids=input_ids, attention_mask=attn).logits[:, prompt_ids.shape[1]:]
    ce = F.cross_entropy(logits[masked].float(), answer_ids[masked], reduction="none")
    return (ce / p_mask.expand(B, L)[masked]).sum() / (B * L)
