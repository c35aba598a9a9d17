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
# MMaDA's multimodal markers (Gen-Verse/MMaDA training/prompting_utils.py, use_reserved_token=True, as
# every MMaDA script runs it): LLaDA's <|reserved_token_0|> .. <|reserved_token_10|>, in this order
# (126084 .. 126094 in LLaDA-8B's tokenizer). Nothing is added to LLaDA's tokenizer. Image codes are
# not tokenizer entries either: code c is token len(tokenizer) + c (image_token_offset).
MMADA_MARKERS = ("<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>", "<|mmu|>", "<|t2v|>", "<|v2v|>", "<|lvg|>",
                 "[iPAD]", "<|r2i|>")
SOI, EOI, SOV, EOV, T2I, MMU, T2V, V2V, LVG, IPAD, R2I = MMADA_MARKERS
RESERVED = "<|reserved_token_{}|>"

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


def add_reserved_tokens(tokenizer, n: int = len(MMADA_MARKERS)) -> None:
    """Append <|reserved_token_0|> .. <|reserved_token_{n-1}|> as special tokens, as LLaDA's tokenizer
    has them, so a tiny tokenizer carries MMaDA's markers where LLaDA-8B's does."""
    names = [RESERVED.format(i) for i in range(n)]
    if any(_token_id(tokenizer, t) is not None for t in names):
        raise ValueError(f"tokenizer already has reserved tokens among {names[0]} .. {names[-1]}")
    tokenizer.add_tokens(names, special_tokens=True)


def _token_id(tokenizer, token: str) -> int | None:
    i = tokenizer.convert_tokens_to_ids(token)
    return None if i is None or (i == tokenizer.unk_token_id and token != tokenizer.unk_token) else i


def multimodal_ids(tokenizer) -> dict[str, int]:
    """Ids of MMaDA's markers: fixed offsets from the tokenizer's <|reserved_token_0|> (<|soi|> +0, <|eoi|>
    +1, ..., <|r2i|> +10). A tokenizer without reserved tokens 0..10 at consecutive ids is an error."""
    names = [RESERVED.format(i) for i in range(len(MMADA_MARKERS))]
    ids = [_token_id(tokenizer, t) for t in names]
    if None in ids or ids != list(range(ids[0], ids[0] + len(ids))):
        missing = [t for t, i in zip(names, ids) if i is None]
        found = ("it has none of them" if len(missing) == len(names) else f"it lacks {', '.join(missing)}" if missing
                 else f"it has them at ids {ids}")
        raise ValueError(
            f"image rows need MMaDA's markers: the tokenizer's {names[0]} .. {names[-1]} at consecutive ids "
            f"({MMADA_MARKERS[0]} = {names[0]}, ..., {MMADA_MARKERS[-1]} = {names[-1]}; LLaDA-8B's tokenizer has "
            f"them at 126084 .. 126094), but {found}")
    return {marker: ids[0] + k for k, marker in enumerate(MMADA_MARKERS)}


def image_token_offset(tokenizer) -> int:
    """Token id of image code 0: MMaDA puts image code c at len(text tokenizer) + c (126,349 + c with
    LLaDA-8B's tokenizer), right after the text tokens; the ids below it are the text vocabulary."""
    return len(tokenizer)


def check_image_vocab(config, tokenizer, where: str) -> None:
    """A model with image codes (config.codebook_size > 0) needs a vocabulary row for every code after the
    tokenizer's tokens, and MMaDA's markers in the tokenizer."""
    codes = getattr(config, "codebook_size", 0)
    if not codes:
        return
    need = image_token_offset(tokenizer) + codes
    if config.vocab_size < need:
        raise ValueError(
            f"{where}: config.json vocab_size={config.vocab_size} is too small for the image codes: code c is token "
            f"len(tokenizer) + c, so it needs len(tokenizer)={len(tokenizer)} + codebook_size={codes} = {need} rows")
    try:
        multimodal_ids(tokenizer)
    except ValueError as e:
        raise ValueError(f"{where}: config.json codebook_size={codes}, but {e}") from None


def end_token_ids(tokenizer) -> list[int]:
    """Ids that end an answer: end-of-text and, where the tokenizer has it, end-of-turn."""
    ids = [tokenizer.eos_token_id]
    eot = tokenizer.convert_tokens_to_ids(EOT)
    if eot is not None and eot != tokenizer.unk_token_id and eot not in ids:
        ids.append(eot)
    return ids
