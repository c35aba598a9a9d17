"""Fast text sampler: the reference sampler's semantics plus four switchable accelerations.

- cache: "prefix" or "dual" (Fast-dLLM). At each block start one full pass caches every layer's
  keys/values; the block's further steps recompute only the current block and everything after it
  (prefix) or the current block alone (dual) against the cache. Approximate: cached keys go stale
  as tokens are committed, until the next block start refreshes them.
- threshold / factor (Fast-dLLM parallel decoding): commit every masked token of the block whose
  confidence is >= threshold, or the longest run of the most confident tokens with
  c_(n) >= 1 - factor / (n + 1); always at least one. The block ends when it has no masks left, so
  `steps` no longer applies. Without either, the reference's fixed schedule (steps) is used.
- early_stop (dInfer): a row whose first end token is committed with no mask before it has a final
  answer; its remaining masks are filled with end-of-text (all that follows an end token in LLaDA's
  SFT layout) and the row leaves the batch, so it costs no more passes.
- share_prompt: identical inputs (the G answers of one prompt) make the first pass of the whole
  generation, prompt plus all-mask answer, identical too: it runs once per distinct prompt and its
  logits and cache are copied to the group.

With cache "none", no threshold/factor, early_stop and share_prompt off it is the reference sampler,
token for token (tests/test_fast_sampler.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rl.errors import fail
from rollout.sampler import (
    SampleOutput,
    SamplerConfig,
    commit_top_k,
    exclude_non_text,
    guided,
    sample_tokens,
    score_tokens,
    transfer_schedule,
)

CACHES = ("none", "prefix", "dual")


@dataclass
class FastSamplerConfig(SamplerConfig):
    cache: str = "dual"
    threshold: float | None = 0.9
    factor: float | None = None
    early_stop: bool = True
    share_prompt: bool = True

    def __post_init__(self):
        super().__post_init__()

        def bad(key, why):
            fail(f"sampler.{key}", getattr(self, key), why)

        if self.cache not in CACHES:
            bad("cache", f"expected one of {CACHES}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            bad("threshold", "expected a confidence in (0, 1], or null for the fixed schedule")
        if self.factor is not None and not self.factor > 0:
            bad("factor", "expected > 0, or null")
        if self.threshold is not None and self.factor is not None:
            bad("factor", "set threshold or factor, not both (set threshold=null to use the factor rule)")

    @property
    def parallel(self) -> bool:
        return self.threshold is not None or self.factor is not None


def parallel_count(conf: torch.Tensor, threshold: float | None, factor: float | None) -> torch.Tensor:
    """[B, bl] confidences (-inf where not masked) -> [B] tokens to commit this step, >= 1 where any mask."""
    if threshold is not None:
        n = (conf >= threshold).sum(-1)
    else:
        ranked = conf.sort(-1, descending=True).values
        bar = 1 - factor / torch.arange(2, ranked.shape[-1] + 2, device=conf.device, dtype=ranked.dtype)
        n = (ranked >= bar).long().cumprod(-1).sum(-1)
    return n.clamp_min(1) * torch.isfinite(conf).any(-1)


def finished_rows(answer: torch.Tensor, mask_id: int, end_ids: torch.Tensor) -> torch.Tensor:
    """[B] True where the first end token is committed and every position before it is too."""
    is_end = torch.isin(answer, end_ids)
    L = answer.shape[1]
    first_end = torch.where(is_end.any(-1), is_end.long().argmax(-1), L)
    before = torch.arange(L, device=answer.device)[None] < first_end[:, None]
    return is_end.any(-1) & ~((answer == mask_id) & before).any(-1)


class _Model:
    """The policy as the sampler calls it. Classifier-free guidance doubles the batch (the rows, then
    the same rows with their prompt tokens masked) and the cache follows the doubled batch."""

    def __init__(self, model, cfg_scale: float, mask_id: int, prompt_len: int):
        self.model, self.g, self.mask_id, self.P = model, cfg_scale, mask_id, prompt_len
        self.passes = 0
        self.row_tokens = 0  # rows x positions computed, summed over passes: the compute spent

    def _run(self, ids, attn, prompt_positions, **kw):
        logits, out = guided(self.model, ids, attn, prompt_positions, self.mask_id, self.g, **kw)
        self.passes += 1
        self.row_tokens += ids.numel() * (2 if self.g else 1)
        return logits, getattr(out, "kv", None)

    def full(self, x, attn, return_kv: bool, span):
        prompt = (torch.arange(x.shape[1], device=x.device) < self.P) & attn.bool()
        return self._run(x, attn, prompt, logits_span=span, return_kv=return_kv)

    def window(self, x, attn, kv, lo: int, hi: int, span):
        # A window lies in the answer, past the prompt: nothing to mask for the unconditional rows.
        return self._run(x[:, lo:hi], attn, None, kv_cache=kv, cache_span=(lo, hi), logits_span=span)[0]

    def take(self, kv, index):
        """Cache rows for batch rows `index` (both halves under guidance)."""
        if self.g:
            index = torch.cat([index, index + kv[0][0].shape[0] // 2])
        return [(k[index], v[index]) for k, v in kv]


@torch.no_grad()
def generate_fast(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    mask_id: int,
    cfg: FastSamplerConfig,
    generator: torch.Generator | None = None,
    end_ids: list[int] | None = None,
    fill_id: int | None = None,
    text_vocab: int | None = None,
) -> SampleOutput:
    """end_ids (early stop) are the tokens that end an answer; fill_id what pads after them;
    text_vocab as in rollout.sampler.generate."""
    if cfg.early_stop and (not end_ids or fill_id is None):
        raise ValueError("sampler.early_stop=true needs the tokenizer's end token ids and an end-of-text fill id")
    B, P = prompt_ids.shape
    L, bl = cfg.gen_length, cfg.block_length
    dev = prompt_ids.device
    x = torch.cat([prompt_ids, torch.full((B, L), mask_id, dtype=prompt_ids.dtype, device=dev)], 1)
    attn = torch.cat([prompt_mask.long(), torch.ones(B, L, dtype=torch.long, device=dev)], 1)
    commit = torch.full((B, L), -1, dtype=torch.long, device=dev)
    row_steps = torch.zeros(B, dtype=torch.long, device=dev)
    filled = torch.zeros(B, dtype=torch.long, device=dev)
    ends = torch.tensor(end_ids or [], dtype=torch.long, device=dev)
    net = _Model(model, cfg.cfg_scale, mask_id, P)
    steps_per_block = cfg.steps // cfg.num_blocks
    rows = torch.arange(B, device=dev)  # the rows still generating
    kv = None
    step = 0
    first_pass = True
    for b in range(cfg.num_blocks):
        if len(rows) == 0:
            break
        lo, hi = P + b * bl, P + (b + 1) * bl
        sched = None if cfg.parallel else transfer_schedule((x[rows, lo:hi] == mask_id).sum(-1), steps_per_block)
        i = 0
        while True:
            xa = x[rows]
            masked = xa[:, lo:hi] == mask_id
            if (sched is None and not masked.any()) or (sched is not None and i == steps_per_block):
                break
            if cfg.cache == "none" or i == 0:
                if first_pass and cfg.share_prompt:
                    uniq, inverse = torch.unique(torch.cat([xa, attn[rows]], 1), dim=0, return_inverse=True)
                    logits, kv = net.full(uniq[:, :P + L], uniq[:, P + L:], cfg.cache != "none", (lo, hi))
                    logits = logits[inverse]
                    kv = net.take(kv, inverse) if kv is not None else None
                else:
                    logits, kv = net.full(xa, attn[rows], cfg.cache != "none", (lo, hi))
            else:
                w_hi = hi if cfg.cache == "dual" else P + L
                logits = net.window(xa, attn[rows], kv, lo, w_hi, (0, bl))
            first_pass = False
            exclude_non_text(logits, mask_id, text_vocab)
            x0 = sample_tokens(logits, cfg.temperature, generator)
            conf = torch.where(masked, score_tokens(logits, x0, cfg.remasking, generator), float("-inf"))
            k = sched[:, i] if sched is not None else parallel_count(conf, cfg.threshold, cfg.factor)
            chosen = commit_top_k(conf, k) & masked
            block = torch.where(chosen, x0, xa[:, lo:hi])
            x[rows, lo:hi] = block
            commit[rows, lo - P:hi - P] = torch.where(chosen, step, commit[rows, lo - P:hi - P])
            row_steps[rows] += 1
            step += 1
            i += 1
            if cfg.early_stop:
                done = finished_rows(x[rows, P:], mask_id, ends)
                if done.any():
                    gone = rows[done]
                    rest = x[gone, P:] == mask_id
                    filled[gone] = rest.sum(-1)
                    x[gone, P:] = x[gone, P:].masked_fill(rest, fill_id)
                    commit[gone] = torch.where(rest, step - 1, commit[gone])
                    keep = (~done).nonzero().squeeze(-1)
                    rows = rows[keep]
                    if sched is not None:
                        sched = sched[keep]
                    if kv is not None:
                        kv = net.take(kv, keep)
                    if len(rows) == 0:
                        break
    return SampleOutput(answer_ids=x[:, P:], commit_step=commit, forward_passes=net.passes,
                        row_steps=row_steps, sampled=L - filled, row_tokens=net.row_tokens)
