"""Text <-> token tensors for prompts and fixed-length answers."""
from __future__ import annotations

import numpy as np
import torch

from rl.batch import RolloutBatch
from rl.models.tokenizer import EOI, EOT, MMU, SOI, T2I, multimodal_ids


def encode_prompts(tokenizer, prompts: list[str | list[dict]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted, left-padded prompt ids and attention mask. A prompt is the user's message, or
    a whole chat message list (verl/TRL datasets: [{"role": ..., "content": ...}, ...]) as it stands."""
    texts = [tokenizer.apply_chat_template(p if isinstance(p, list) else [{"role": "user", "content": p}],
                                           add_generation_prompt=True, tokenize=False)
             for p in prompts]
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def mode_of(row: dict) -> str:
    return row.get("mode") or "text"


def encode_rows(tokenizer, rows: list[dict], image_offset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids and mask for task rows of any mode, left-padded, in MMaDA's sequence layouts
    (Gen-Verse/MMaDA training/prompting_utils.py: t2i_gen_prompt, mmu_gen_prompt):

    text  chat(user: prompt) assistant header                                     -> text answer
    t2i   <|t2i|> BOS caption EOS <|soi|>                                          -> image codes
    mmu   <|mmu|> <|soi|> image codes <|eoi|> chat(user: prompt) assistant header   -> text answer

    chat(...) is the tokenizer's chat template, which starts with BOS (added when it does not). MMaDA's
    t2i input also has <|eoi|> after the image codes; here a sequence is prompt + answer, with nothing
    after the answer (docs/MULTIMODAL.md). Image codes come from the row's `image_codes`
    (rl.data.loader.attach_image_codes), code c as token `image_offset + c`
    (rl.models.tokenizer.image_token_offset). Text-only batches give exactly `encode_prompts`."""
    modes = [mode_of(r) for r in rows]
    if all(m == "text" for m in modes):
        return encode_prompts(tokenizer, [r["prompt"] for r in rows])
    if image_offset is None:
        raise ValueError("image rows need a model with image codes (LLaDAConfig.codebook_size > 0)")
    ids = multimodal_ids(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    seqs = []
    for row, mode in zip(rows, modes):
        if mode == "t2i":
            caption = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            seq = [ids[T2I], bos] + caption + [eos, ids[SOI]]
        else:
            prompt = row["prompt"]
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            seq = tokenizer(text, add_special_tokens=False)["input_ids"]
            if mode == "mmu":
                seq = seq if seq[:1] == [bos] else [bos] + seq
                seq = [ids[MMU], ids[SOI]] + [image_offset + c for c in row["image_codes"]] + [ids[EOI]] + seq
        seqs.append(torch.tensor([seq]))
    return (RolloutBatch.left_pad(seqs, tokenizer.pad_token_id),
            RolloutBatch.left_pad([torch.ones_like(s) for s in seqs], 0))


IMAGE = "<image>"  # where a prompt's image goes (LLaVA's and LLaDA-V's DEFAULT_IMAGE_TOKEN)


def image_prompt(row: dict, where: str = "row") -> list[dict]:
    """The row's prompt as chat messages with one <image> per image: where the text puts them, or,
    when it names none, the images first in the first user message, each on its own line (LLaVA's
    layout). Any other count is an error naming the row."""
    prompt, n = row["prompt"], len(row.get("pixels") or ())
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    marked = sum(str(m.get("content", "")).count(IMAGE) for m in messages)
    if marked == 0 and n:
        user = next((m for m in messages if m.get("role") == "user"), messages[0])
        user["content"] = (IMAGE + "\n") * n + str(user.get("content", ""))
    elif marked != n:
        raise ValueError(f"{where}: the prompt has {marked} {IMAGE} placeholder(s) but the row has {n} image(s)")
    return messages


def encode_image_prompts(tokenizer, rows: list[dict], placeholder_ids, system: str | None = None):
    """Prompt ids, mask and image table for a model fed continuous image features (LLaDA-V): the k-th
    image of the table is spelled `placeholder_ids(k)` (negative ids, LLaDAVModelLM.image_placeholder_ids)
    in place of its <image>. As LLaVA's tokenizer_image_token, the chat-formatted text is split at each
    <image> and the pieces tokenized apart. A prompt shared by several rows (the G answers of one prompt
    share one row dict) puts its images in the table once. Rows without `pixels` are plain text.
    `system`: the system message of the model's conversation template, unless a row brings its own."""
    seqs, images, done = [], [], {}  # done: id(row) -> its sequence, templated and tokenized once
    for i, row in enumerate(rows):
        if id(row) not in done:
            pixels = row.get("pixels") or []
            messages = image_prompt(row, f"row {i}")
            if system and messages[0].get("role") != "system":
                messages = [{"role": "system", "content": system}, *messages]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            pieces = text.split(IMAGE) if pixels else [text]
            seq = tokenizer(pieces[0], add_special_tokens=False)["input_ids"]
            for j, piece in enumerate(pieces[1:]):
                seq += placeholder_ids(len(images) + j)
                seq += tokenizer(piece, add_special_tokens=False)["input_ids"]
            images.extend(pixels)
            done[id(row)] = torch.tensor([seq])
        seqs.append(done[id(row)])
    ids = RolloutBatch.left_pad(seqs, tokenizer.pad_token_id)
    mask = RolloutBatch.left_pad([torch.ones_like(s) for s in seqs], 0)
    pixels = torch.from_numpy(np.stack(images)) if images else None
    return ids, mask, pixels


def encode_answers(tokenizer, completions: list[str], length: int) -> torch.Tensor:
    """Completion + end-of-turn, padded with end-of-text to `length` (LLaDA's SFT layout)."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    out = torch.full((len(completions), length), tokenizer.eos_token_id, dtype=torch.long)
    for i, text in enumerate(completions):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eot]
        if len(ids) > length:
            raise ValueError(f"answer {i} is {len(ids)} tokens, longer than the answer length {length}: {text[:80]!r}")
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def decode_answers(tokenizer, answer_ids: torch.Tensor, end_ids: list[int]) -> list[str]:
    """Text of each answer up to (not including) its first end token."""
    texts = []
    for row in answer_ids.tolist():
        cut = next((i for i, t in enumerate(row) if t in end_ids), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=False))
    return texts
