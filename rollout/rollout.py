"""Turn task rows into a RolloutBatch: G sampled answers per prompt, decoded, with loss masks."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

import torch

from rl.batch import RolloutBatch
from rl.data.encode import decode_answers, encode_image_prompts, encode_rows, mode_of
from rl.models.tokenizer import end_token_ids, image_token_offset
from rollout.fast import FastSamplerConfig, generate_fast
from rollout.image import ImageSamplerConfig, generate_image
from rollout.sampler import SamplerConfig, answer_mask, generate

SAMPLERS = {"reference": SamplerConfig, "fast": FastSamplerConfig}
# rollout.* keys that configure the workers, not the sampler
WORKER_KEYS = {"sampler", "num_workers", "micro_batch", "val_temperature", "val_n", "image"}


def sampler_config(rollout_cfg: Mapping) -> SamplerConfig:
    """The sampler named by rollout.sampler, built from the rest of the rollout keys."""
    name = rollout_cfg.get("sampler", "reference")
    if name not in SAMPLERS:
        raise ValueError(f"rollout.sampler={name!r}: expected one of {sorted(SAMPLERS)}")
    takes = {f.name for f in fields(SAMPLERS[name])}
    extra = sorted(set(rollout_cfg) - takes - WORKER_KEYS)
    if extra:
        raise ValueError(
            f"rollout.sampler={name!r} takes no {extra} (they belong to another sampler, e.g. rollout=fast)")
    return SAMPLERS[name](**{k: rollout_cfg[k] for k in takes if k in rollout_cfg})


def image_offset(config, tokenizer) -> int | None:
    """Token id of image code 0 on a unified text+image model (len(tokenizer), MMaDA's layout; also the
    end of the text vocabulary); None for a text-only model."""
    return image_token_offset(tokenizer) if getattr(config, "codebook_size", 0) else None


def sample(model, tokenizer, ids, mask, sampler: SamplerConfig, generator=None):
    """Text answers; on a unified model they never draw image codes nor the unused rows after them
    (out of distribution for a text answer, and their reference log-probs are tiny, which spikes the
    KL term): only ids below len(tokenizer)."""
    text_vocab = image_offset(model.config, tokenizer)
    if isinstance(sampler, FastSamplerConfig):
        return generate_fast(model, ids, mask, tokenizer.mask_token_id, sampler, generator,
                             end_ids=end_token_ids(tokenizer), fill_id=tokenizer.eos_token_id,
                             text_vocab=text_vocab)
    return generate(model, ids, mask, tokenizer.mask_token_id, sampler, generator, text_vocab=text_vocab)


def takes_images(model) -> bool:
    """A model fed continuous image features in its prompt (LLaDA-V), not image codes."""
    return callable(getattr(model, "encode_images", None))


class WithImages:
    """`model` with one batch's image features bound to every call: the samplers and estimators call it
    as they call any model, and prompt ids < 0 take their rows (rl.data.encode.encode_image_prompts)."""

    def __init__(self, model, image_features: torch.Tensor):
        self._model, self._features = model, image_features

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        return self._model(*args, image_features=self._features, **kwargs)


def _merge(parts: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]], n: int, pad: int, fill: int):
    """Scatter per-mode (indices, prompt ids, prompt mask, answer ids) back into row order: prompts
    left-padded to one width, answers right-padded with end-of-text to one length."""
    P = max(p[1].shape[1] for p in parts)
    L = max(p[3].shape[1] for p in parts)
    ids = torch.full((n, P), pad, dtype=torch.long)
    mask = torch.zeros((n, P), dtype=torch.long)
    answers = torch.full((n, L), fill, dtype=torch.long)
    for idx, p_ids, p_mask, a_ids in parts:
        rows = torch.tensor(idx)
        ids[rows, P - p_ids.shape[1]:] = p_ids
        mask[rows, P - p_ids.shape[1]:] = p_mask.long()
        answers[rows, :a_ids.shape[1]] = a_ids
    return ids, mask, answers


@torch.no_grad()
def rollout(model, tokenizer, rows: list[dict], group_size: int, sampler: SamplerConfig,
            generator: torch.Generator | None = None, micro_batch: int = 0,
            image_sampler: ImageSamplerConfig | None = None) -> RolloutBatch:
    """Rows of one group are contiguous: row i*G + g is answer g to prompt i. Text and image-conditioned
    rows go through the text sampler, text-to-image rows through the image sampler; the batch keeps
    the rows' order, with answers right-padded to the longest (padding is outside the answer mask)."""
    expanded = [row for row in rows for _ in range(group_size)]
    config = model.config
    offset = image_offset(config, tokenizer)
    end_ids = end_token_ids(tokenizer)
    is_image = [mode_of(r) == "t2i" for r in expanded]
    continuous = takes_images(model)
    if any(is_image) and continuous:
        raise ValueError("text-to-image rows need a unified-token model (MMaDA); this one reads images but "
                         "does not write them (LLaDA-V)")
    if any(is_image) and not (config.codebook_size and config.num_vq_tokens):
        raise ValueError(
            "text-to-image rows need a model with image codes (config codebook_size and num_vq_tokens > 0)")
    step = micro_batch or len(expanded)
    parts, lengths, pixels = [], {}, None
    commits, per_step = [None] * len(expanded), [None] * len(expanded)
    for image in (False, True):
        idx = [i for i, flag in enumerate(is_image) if flag == image]
        if not idx:
            continue
        policy = model
        if continuous:
            ids, mask, pixels = encode_image_prompts(tokenizer, [expanded[i] for i in idx],
                                                     model.image_placeholder_ids, model.config.system_prompt)
            if pixels is not None:  # each prompt's images through the vision tower once, for all G answers
                policy = WithImages(model, model.encode_images(pixels))
        else:
            ids, mask = encode_rows(tokenizer, [expanded[i] for i in idx], offset)
        answers = []
        for lo in range(0, len(idx), step):
            if image:
                out = generate_image(model, ids[lo:lo + step], mask[lo:lo + step], tokenizer.mask_token_id,
                                     config.num_vq_tokens, offset, config.codebook_size,
                                     image_sampler or ImageSamplerConfig(), generator)
            else:
                out = sample(policy, tokenizer, ids[lo:lo + step], mask[lo:lo + step], sampler, generator)
            answers.append(out.answer_ids)
            for j, i in enumerate(idx[lo:lo + step]):
                commits[i], per_step[i] = out.commit_step[j], out.tokens_per_step[j]
        answer_ids = torch.cat(answers)
        parts.append((idx, ids, mask, answer_ids))
        lengths[image] = answer_ids.shape[1]
    ids, mask, answer_ids = _merge(parts, len(expanded), tokenizer.pad_token_id, tokenizer.eos_token_id)
    L = answer_ids.shape[1]
    loss_mask = answer_mask(answer_ids, end_ids)
    texts = decode_answers(tokenizer, answer_ids, end_ids)
    loss_mask[:, lengths.get(False, L):] *= torch.tensor(is_image)[:, None]  # a text answer ends at its length
    images = [None] * len(expanded)
    for i, flag in enumerate(is_image):
        if flag:  # an image answer is all its codes, and only those
            loss_mask[i] = (torch.arange(L) < lengths[True]).float()
            texts[i] = ""
            images[i] = (answer_ids[i, :lengths[True]] - offset).tolist()
    commit_step = torch.stack([torch.nn.functional.pad(c, (0, L - len(c)), value=-1) for c in commits])
    return RolloutBatch(
        prompt_ids=ids,
        prompt_mask=mask,
        answer_ids=answer_ids,
        answer_mask=loss_mask,
        group_size=group_size,
        rows=expanded,
        completions=texts,
        images=images,
        commit_step=commit_step,
        tokens_per_step=torch.stack(per_step),
        pixels=pixels,
        image_tokens=model.tokens_per_image if pixels is not None else 0,
    )
