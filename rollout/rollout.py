"""Turn task rows into a RolloutBatch: G sampled answers per prompt, decoded, with loss masks."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

import torch

from rl.batch import RolloutBatch
from rl.data.encode import decode_answers, encode_prompts
from rl.models.tokenizer import end_token_ids
from rollout.fast import FastSamplerConfig, generate_fast
from rollout.sampler import SamplerConfig, answer_mask, generate

SAMPLERS = {"reference": SamplerConfig, "fast": FastSamplerConfig}
# rollout.* keys that configure the workers, not the sampler
WORKER_KEYS = {"sampler", "num_workers", "micro_batch", "val_temperature"}


def sampler_config(rollout_cfg: Mapping) -> SamplerConfig:
    """The sampler named by rollout.sampler, built from the rest of the rollout keys."""
    name = rollout_cfg.get("sampler", "reference")
    if name not in SAMPLERS:
        raise ValueError(f"rollout.sampler={name!r}: expected one of {sorted(SAMPLERS)}")
    takes = {f.name for f in fields(SAMPLERS[name])}
    extra = sorted(set(rollout_cfg) - takes - WORKER_KEYS)
    if extra:
        raise ValueError(f"rollout.sampler={name!r} takes no {extra} (they belong to another sampler, e.g. rollout=fast)")
    return SAMPLERS[name](**{k: rollout_cfg[k] for k in takes if k in rollout_cfg})


def sample(model, tokenizer, ids, mask, sampler: SamplerConfig, generator=None):
    if isinstance(sampler, FastSamplerConfig):
        return generate_fast(model, ids, mask, tokenizer.mask_token_id, sampler, generator,
                             end_ids=end_token_ids(tokenizer), fill_id=tokenizer.eos_token_id)
    return generate(model, ids, mask, tokenizer.mask_token_id, sampler, generator)


@torch.no_grad()
def rollout(model, tokenizer, rows: list[dict], group_size: int, sampler: SamplerConfig,
            generator: torch.Generator | None = None, micro_batch: int = 0) -> RolloutBatch:
    """Rows of one group are contiguous: row i*G + g is answer g to prompt i."""
    expanded = [row for row in rows for _ in range(group_size)]
    ids, mask = encode_prompts(tokenizer, [r["prompt"] for r in expanded])
    step = micro_batch or len(expanded)
    answers, commits, per_step = [], [], []
    for lo in range(0, len(expanded), step):
        out = sample(model, tokenizer, ids[lo:lo + step], mask[lo:lo + step], sampler, generator)
        answers.append(out.answer_ids)
        commits.append(out.commit_step)
        per_step.append(out.tokens_per_step)
    answer_ids = torch.cat(answers)
    end_ids = end_token_ids(tokenizer)
    return RolloutBatch(
        prompt_ids=ids,
        prompt_mask=mask,
        answer_ids=answer_ids,
        answer_mask=answer_mask(answer_ids, end_ids),
        group_size=group_size,
        extras={"rows": expanded, "completions": decode_answers(tokenizer, answer_ids, end_ids),
                "commit_step": torch.cat(commits), "tokens_per_step": torch.cat(per_step)},
    )
