"""Reference text sampler: LLaDA's generation semantics, no caching, no early exit.

This is the exactness baseline faster samplers are measured against. Per block (left to right) and
per step: predict every position, sample each masked position (float64 Gumbel-max with temperature,
argmax at temperature 0), score it (the sampled token's probability, or a random number), and
commit the k highest-scoring masked positions of the current block. k spreads the block's masks
evenly over its steps, the earlier steps taking the remainder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rl.errors import fail

REMASKING = ("low_confidence", "random")


@dataclass
class SamplerConfig:
    gen_length: int = 64
    block_length: int = 32
    steps: int = 64
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0

    def __post_init__(self):
        def bad(key, why):
            fail(f"sampler.{key}", getattr(self, key), why)

        for key in ("gen_length", "block_length", "steps"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                bad(key, "expected a positive integer")
        if self.gen_length % self.block_length:
            bad("block_length", f"must divide gen_length={self.gen_length}")
        if self.steps % self.num_blocks:
            bad("steps", f"must be a multiple of the number of blocks gen_length/block_length={self.num_blocks}")
        if self.steps > self.gen_length:
            bad("steps", f"must be <= gen_length={self.gen_length} (at least one token is committed per step)")
        if self.temperature < 0:
            bad("temperature", "expected >= 0 (0 = greedy)")
        if self.remasking not in REMASKING:
            bad("remasking", f"expected one of {REMASKING}")
        if self.cfg_scale < 0:
            bad("cfg_scale", "expected >= 0 (0 = no classifier-free guidance)")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length


@dataclass
class SampleOutput:
    answer_ids: torch.Tensor  # [B, L]
    commit_step: torch.Tensor  # [B, L] global step at which each answer token was committed
    forward_passes: int  # model calls (a CFG step counts one call on a doubled batch)
    row_steps: torch.Tensor  # [B] denoising steps each row took part in
    sampled: torch.Tensor  # [B] answer tokens the model chose (the rest: end-of-text fill after early stop)
    row_tokens: int  # rows x positions computed, summed over model calls

    @property
    def tokens_per_step(self) -> torch.Tensor:
        """[B] mean tokens committed per step, per row."""
        return self.sampled.float() / self.row_steps.clamp_min(1).float()


def transfer_schedule(masked_per_row: torch.Tensor, steps: int) -> torch.Tensor:
    """[B] masked counts -> [B, steps] tokens to commit at each step (LLaDA's get_num_transfer_tokens)."""
    base = masked_per_row // steps
    extra = masked_per_row % steps
    sched = base[:, None].expand(-1, steps).clone()
    sched += (torch.arange(steps, device=masked_per_row.device)[None] < extra[:, None]).long()
    return sched


def exclude_non_text(logits: torch.Tensor, mask_id: int, text_vocab: int | None) -> None:
    """In place: the mask token is never a prediction, nor is an image code (or an unused row after the
    codes) in a text answer: only ids below text_vocab (= len(tokenizer) on a unified model)."""
    logits[..., mask_id] = float("-inf")
    if text_vocab is not None:
        logits[..., text_vocab:] = float("-inf")


def sample_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-max in float64: argmax(l - T*log(-log u)), which equals argmax(exp(l) / (-log u)^T)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.double()
    return (logits + temperature * gumbel(logits.shape, generator, logits.device)).argmax(-1)


def uniform(shape, generator, device, dtype=torch.float64) -> torch.Tensor:
    """U(0, 1) drawn on the generator's device (a CPU generator is the norm), then moved, so a seed
    gives the same samples whether the model runs on the CPU or a GPU."""
    src = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=src, dtype=dtype).to(device)


def gumbel(shape, generator, device) -> torch.Tensor:
    """Standard Gumbel noise, -log(-log u), in float64."""
    return -torch.log(-torch.log(uniform(shape, generator, device).clamp_min(1e-20)))


def score_tokens(logits, x0, remasking, generator):
    if remasking == "low_confidence":
        return torch.softmax(logits.double(), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
    return uniform(x0.shape, generator, x0.device)


def commit_top_k(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool mask selecting the k[j] highest-confidence positions of each row j."""
    order = confidence.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank < k[:, None]


def guided(model, x, attn, prompt_positions, mask_id, cfg_scale, **model_kw):
    """One model call under classifier-free guidance: (guided logits, the call's output). The
    unconditional rows are the same sequences with their prompt positions masked (none given: a
    window past the prompt, identical to the conditional rows)."""
    if cfg_scale == 0:
        out = model(input_ids=x, attention_mask=attn, **model_kw)
        return out.logits, out
    un_x = x if prompt_positions is None else x.masked_fill(prompt_positions, mask_id)
    out = model(input_ids=torch.cat([x, un_x]), attention_mask=torch.cat([attn, attn]), **model_kw)
    cond, uncond = out.logits.chunk(2)
    return uncond + (cfg_scale + 1) * (cond - uncond), out


def guided_logits(model, x, attn, prompt_positions, mask_id, cfg_scale, span=None):
    """Logits at positions span=(lo, hi) (all when None), with classifier-free guidance."""
    kw = {} if span is None else {"logits_span": span}
    return guided(model, x, attn, prompt_positions, mask_id, cfg_scale, **kw)[0]


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    mask_id: int,
    cfg: SamplerConfig,
    generator: torch.Generator | None = None,
    text_vocab: int | None = None,
) -> SampleOutput:
    """text_vocab: on a unified text+image model, the first image-code id (len(tokenizer)); answers draw
    from the ids below it only."""
    B, P = prompt_ids.shape
    L, bl = cfg.gen_length, cfg.block_length
    x = torch.cat([prompt_ids, torch.full((B, L), mask_id, dtype=prompt_ids.dtype, device=prompt_ids.device)], 1)
    attn = torch.cat([prompt_mask.long(), torch.ones(B, L, dtype=torch.long, device=x.device)], 1)
    prompt_positions = torch.zeros_like(x, dtype=torch.bool)
    prompt_positions[:, :P] = prompt_mask.bool()
    commit = torch.full((B, L), -1, dtype=torch.long, device=x.device)
    steps_per_block = cfg.steps // cfg.num_blocks
    step, passes = 0, 0
    for b in range(cfg.num_blocks):
        lo, hi = P + b * bl, P + (b + 1) * bl
        sched = transfer_schedule((x[:, lo:hi] == mask_id).sum(-1), steps_per_block)
        for i in range(steps_per_block):
            logits = guided_logits(model, x, attn, prompt_positions, mask_id, cfg.cfg_scale, (lo, hi))
            passes += 1
            exclude_non_text(logits, mask_id, text_vocab)
            x0 = sample_tokens(logits, cfg.temperature, generator)
            conf = score_tokens(logits, x0, cfg.remasking, generator)
            masked = x[:, lo:hi] == mask_id
            chosen = commit_top_k(torch.where(masked, conf, float("-inf")), sched[:, i]) & masked
            x[:, lo:hi] = torch.where(chosen, x0, x[:, lo:hi])
            commit[:, lo - P:hi - P][chosen] = step
            step += 1
    mult = 2 if cfg.cfg_scale else 1
    return SampleOutput(answer_ids=x[:, P:], commit_step=commit, forward_passes=passes,
                        row_steps=torch.full((B,), step, dtype=torch.long),
                        sampled=torch.full((B,), L, dtype=torch.long),
                        row_tokens=passes * mult * x.numel())


def answer_mask(answer_ids: torch.Tensor, end_ids: list[int]) -> torch.Tensor:
    """1.0 for tokens up to and including the first end token of each row, 0.0 after it."""
    is_end = torch.isin(answer_ids, torch.tensor(end_ids, device=answer_ids.device))
    after_end = (is_end.long().cumsum(-1) - is_end.long()) > 0
    return (~after_end).float()
