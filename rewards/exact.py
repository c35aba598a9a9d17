"""Exact match: the content of the last complete `<answer>...</answer>` equals the ground truth.

For answers that are strings rather than single numbers (a list, a sequence of steps, a word), where
math-verify would read only a number or an expression out of them. Whitespace runs are collapsed
and the ends stripped on both sides, so "1 2  3\\n" matches "1 2 3"; nothing else is normalised.
Score 1.0 on a match, else 0.0 (no answer tag: 0.0). With `prefix=True` the answer only has to
begin with the ground truth's words and nothing after them is scored, the closing tag included: a
last `<answer>` that the generation length cut off before its `</answer>` is read to the end of the
text. Task `long` scores its chain of numbers so, because its tiny model does not stop at b: it
counts on until the length runs out, and whether its closing tag still fits depends on the decoding
order, not on the numbers (docs/TINY_MODEL.md). The answer is only compared as a string; nothing in
it is evaluated, and the comparison is linear in its length.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rewards._common import check_batch, check_tag, get_column, last_tag_content

GROUND_TRUTH_COLUMNS = ("ground_truth", "answer")


def _norm(text: str) -> str:
    return " ".join(text.split())


def answer_span(text: str, answer_tag: str = "answer", cut_off: bool = False) -> str | None:
    """The last complete <tag>...</tag>'s content; with `cut_off`, a last <tag> that the generation
    length cut off before its closing tag counts too, read to the end of the text."""
    if cut_off:
        opening = f"<{answer_tag}>"
        start = text.rfind(opening)
        # Cut off: the last opening tag comes after every closing one.
        if start >= 0 and text.find(f"</{answer_tag}>", start) < 0:
            return text[start + len(opening):]
    return last_tag_content(text, answer_tag)


def exact_score(text: str, truth: str, answer_tag: str = "answer", prefix: bool = False) -> float:
    span = answer_span(text, answer_tag, cut_off=prefix)
    if span is None:
        return 0.0
    got, want = _norm(span), _norm(truth)
    return float(got == want or (prefix and got.startswith(want + " ")))


class ExactReward:
    """Reward `exact`: `reward(prompts, completions, **columns) -> list[float]`; the ground truth is
    column `ground_truth` or `answer`, a string (an integer is compared as its decimal text)."""

    name = "exact"

    def __init__(self, answer_tag: str = "answer", prefix: bool = False):
        self.answer_tag = check_tag(answer_tag, "answer_tag", "ExactReward")
        if not isinstance(prefix, bool):
            raise ValueError(f"ExactReward: prefix must be true or false, got {prefix!r}")
        self.prefix = prefix

    def __call__(
        self, prompts: Sequence[Any] | None, completions: Sequence[str], **columns: Sequence[Any]
    ) -> list[float]:
        n = check_batch(self.name, prompts, completions, columns)
        truths = get_column(self.name, columns, GROUND_TRUTH_COLUMNS)
        scores = []
        for i in range(n):
            truth = truths[i]
            if isinstance(truth, bool) or not isinstance(truth, (str, int)) or not str(truth).strip():
                # The dataset's own value: a data error to report, not a wrong answer.
                raise ValueError(f"reward 'exact': ground truth [{i}] must be a non-empty string, got {truth!r:.80}")
            scores.append(exact_score(completions[i], str(truth), self.answer_tag, self.prefix))
        return scores
