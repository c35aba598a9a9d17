"""Turn task rows into a RolloutBatch: G sampled answers per prompt, decoded, with loss masks."""
from __future__ import annotations

import torch

from rl.batch import RolloutBatch
from rl.data.encode import decode_answers, encode_prompts
from rl.models.tokenizer import end_token_ids
from rollout.sampler import SamplerConfig, answer_mask, generate


@torch.no_grad()
def rollout(model, tokenizer, rows: list[dict], group_size: int, sampler: SamplerConfig,
            generator: torch.Generator | None = None, micro_batch: int = 0) -> RolloutBatch:
    """Rows of one group are contiguous: row i*G + g is answer g to prompt i."""
    expanded = [row for row in rows for _ in range(group_size)]
    ids, mask = encode_prompts(tokenizer, [r["prompt"] for r in expanded])
    step = micro_batch or len(expanded)
    answers, commits = [], []
    for lo in range(0, len(expanded), step):
        out = generate(model, ids[lo:lo + step], mask[lo:lo + step], tokenizer.mask_token_id, sampler, generator)
        answers.append(out.answer_ids)
        commits.append(out.commit_step)
    answer_ids = torch.cat(answers)
    end_ids = end_token_ids(tokenizer)
    return RolloutBatch(
        prompt_ids=ids,
        prompt_mask=mask,
        answer_ids=answer_ids,
        answer_mask=answer_mask(answer_ids, end_ids),
        group_size=group_size,
        extras={"rows": expanded, "completions": decode_answers(tokenizer, answer_ids, end_ids),
                "commit_step": torch.cat(commits)},
    )
