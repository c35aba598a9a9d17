"""A byte-level BPE tokenizer with LLaDA's special tokens and chat template.

Built with `tokenizers`, saved as a `transformers` fast tokenizer, so a tiny checkpoint directory
and a real LLaDA directory load through the same `AutoTokenizer.from_pretrained` call.
"""
from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"  # also the padding token, as in LLaDA
MASK = "<|mdm_mask|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, MASK, START_HEADER, END_HEADER, EOT]
# MMaDA's multimodal markers: start/end of image, and the task tokens of text-to-image and
# multimodal understanding. Image codes themselves are not tokenizer entries: they are the model's
# last vocabulary rows (LLaDAConfig.image_token_offset + code).
SOI, EOI, T2I, MMU = "<|soi|>", "<|eoi|>", "<|t2i|>", "<|mmu|>"
MULTIMODAL_TOKENS = [SOI, EOI, T2I, MMU]

# LLaDA-8B-Instruct's conversation layout.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # Single digits keep arithmetic learnable by a tiny model (as LLaMA-family tokenizers do).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        mask_token=MASK,
        additional_special_tokens=[START_HEADER, END_HEADER, EOT],
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def add_multimodal_tokens(tokenizer) -> None:
    """Append MMaDA's markers as special tokens (ids after the existing vocabulary)."""
    tokenizer.add_tokens([t for t in MULTIMODAL_TOKENS if t not in tokenizer.get_vocab()], special_tokens=True)


def multimodal_ids(tokenizer) -> dict[str, int]:
    """Ids of the multimodal markers; a clear error for a tokenizer that lacks them."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in MULTIMODAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer has no {missing}: image rows need a multimodal checkpoint (e.g. model=tiny_mm)")
    return ids


def end_token_ids(tokenizer) -> list[int]:
    """Ids that end an answer: end-of-text and, where the tokenizer has it, end-of-turn."""
    ids = [tokenizer.eos_token_id]
    eot = tokenizer.convert_tokens_to_ids(EOT)
    if eot is not None and eot != tokenizer.unk_token_id and eot not in ids:
        ids.append(eot)
    return ids
