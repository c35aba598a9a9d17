"""Format reward: the completion is a reasoning block followed by a tagged answer.

Accepted shape (tags configurable, whitespace around and between the blocks allowed):

    <think> ... </think> <answer> ... </answer>

Each of the four tags must appear exactly once, in that order, nothing may precede `<think>` or
follow `</answer>`, and the answer must not be empty (the reasoning may be). With
`answer_tag=None` the reasoning block may be followed by any non-empty text (MMaDA-style
`<think>...</think>` then a free-form or boxed answer).

Score: 1.0 for that shape, else 0.0; with `partial_credit` a near miss earns 0.125 per tag that
appears exactly once (at most 0.5), the scheme of d1's `count_xml`, so the model gets a gradient
towards the format before it finds the whole of it.

Implemented with `str.count`/`find`/`strip` only, so it is linear in the length of the completion
(a backtracking regex such as `^\\s*<think>.*?</think>\\s*<answer>.*?</answer>\\s*$` goes
quadratic on inputs that repeat the tags many times).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rewards._common import check_batch, check_tag

PARTIAL_CREDIT_PER_TAG = 0.125


def format_score(
    text: str, think_tag: str = "think", answer_tag: str | None = "answer", partial_credit: bool = False
) -> float:
    think_open, think_close = f"<{think_tag}>", f"</{think_tag}>"
    tags = [think_open, think_close]
    if answer_tag is not None:
        tags += [f"<{answer_tag}>", f"</{answer_tag}>"]
    once = [text.count(tag) == 1 for tag in tags]
    if all(once) and _well_formed(text.strip(), tags):
        return 1.0
    return PARTIAL_CREDIT_PER_TAG * sum(once) if partial_credit else 0.0


def _well_formed(text: str, tags: list[str]) -> bool:
    # Each tag is known to occur exactly once, so find() locates the one occurrence.
    think_open, think_close = tags[0], tags[1]
    if not text.startswith(think_open):
        return False
    close = text.find(think_close)
    if close < 0:
        return False
    rest = text[close + len(think_close):].lstrip()
    if len(tags) == 2:
        return bool(rest)
    answer_open, answer_close = tags[2], tags[3]
    if not (rest.startswith(answer_open) and rest.endswith(answer_close)):
        return False
    return bool(rest[len(answer_open): len(rest) - len(answer_close)].strip())


class FormatReward:
    """Reward `format`: `reward(prompts, completions, **columns) -> list[float]` (columns unused)."""

    name = "format"

    def __init__(self, think_tag: str = "think", answer_tag: str | None = "answer", partial_credit: bool = False):
        self.think_tag = check_tag(think_tag, "think_tag", "FormatReward")
        self.answer_tag = None if answer_tag is None else check_tag(answer_tag, "answer_tag", "FormatReward")
        if self.answer_tag == self.think_tag:
            raise ValueError(f"FormatReward: think_tag and answer_tag must differ, both are {think_tag!r}")
        if not isinstance(partial_credit, bool):
            raise ValueError(f"FormatReward: partial_credit must be true or false, got {partial_credit!r}")
        self.partial_credit = partial_credit

    def __call__(
        self, prompts: Sequence[Any] | None, completions: Sequence[str], **columns: Sequence[Any]
    ) -> list[float]:
        check_batch(self.name, prompts, completions, columns)
        return [format_score(c, self.think_tag, self.answer_tag, self.partial_credit) for c in completions]
