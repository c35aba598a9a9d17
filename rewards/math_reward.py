"""Math correctness: extract the final answer and compare it with the ground truth via math-verify.

Extraction (`extract_answer`): the content of the last complete `<answer>...</answer>` (tag
configurable). If there is none and `fallback` is on, the content of the last `\\boxed{...}`, and
failing that the last number in the text (d1 and open-r1 reward only tagged answers; the fallback
keeps a truncated or untagged but correct answer from scoring 0; turn it off for strict tagging).

Safety. math-verify's `parse` does evaluate text with Python: its plain-expression extractor hands
the regex match to sympy's `parse_expr` (which compiles and `eval`s it), and its LaTeX path calls
`sympy.Number(token)`, which goes through `sympify` -> `parse_expr` as well. In math-verify 0.9 what
reaches those calls is a regex match of digits, whitespace and `. + - * / ^ ( ) × ÷`, or a LaTeX
number token (digits, `.`, `,`, an `E` exponent), so no name can reach `eval` (tests spy on every
string sympy is asked to parse); but that is a property of third-party regexes, not a promise. So the
completion itself never reaches math-verify: only the extracted answer span does, after
`normalize_answer` has rewritten it (see below) and `sanitize_answer` has bounded its length and
refused quotes, backticks, `#`, `@`, `__`, characters
outside a small math alphabet, and the few Python names that build code without quotes (`exec`,
`bytes`, `lambda`, ...). The ground truth comes from our own dataset: it is normalized the same way (so that both sides
spell numbers alike) but not sanitized.

Normalization (`normalize_answer`, before the sanitizer, so the sanitizer judges what math-verify
will see). Superscript and subscript runs become `^{...}` / `_{...}` first: NFKC alone would turn
`4²` into `42`, a wrong answer that looks right. Then NFKC (full-width digits, letters and
punctuation become ASCII; full-width code therefore meets the sanitizer as plain code), then every
remaining decimal digit (Arabic-Indic, Eastern Arabic-Indic, Devanagari, ...; NFKC leaves them) to
ASCII by its Unicode value, with the Arabic decimal and thousands separators. Last, a lower-case
exponent `1e3` / `2.5e-4` becomes `1E3` / `2.5E-4`: math-verify reads `1e3` as `1*e*3` (Euler's
number) but `1E3` as 1000. Only a bare number directly followed by `e` and digits is rewritten, so
`2e`, `e^3` and names stay as they are. Vulgar fractions are left alone: NFKC makes `1½` into
`11⁄2`, whose fraction slash the sanitizer refuses (scored incorrect, never misread).

Timeouts. math-verify's own timeouts use `signal.alarm`, which fails off the main thread (Ray actor
threads), so they are disabled (`parsing_timeout=None`, `timeout_seconds=None`) and every answer
is verified in a `SubprocessPool` worker that is killed when it overruns `timeout_s`; a spare
worker takes over at once. A whole call is bounded by `batch_timeout_s`: answers not verified by
then are cut off. A timed-out, crashed, raising or cut-off verification scores `failure_score` and
is counted; it never hangs the caller.
"""
from __future__ import annotations

import functools
import math
import re
import string
import threading
import unicodedata
from collections.abc import Sequence
from typing import Any

from rewards._common import check_batch, check_tag, get_column, last_boxed_content, last_number, last_tag_content
from rewards.sandbox import SubprocessPool

GROUND_TRUTH_COLUMNS = ("ground_truth", "answer")

_ALLOWED_CHARS = frozenset(string.ascii_letters + string.digits + " \\{}[]()^_+-*/=<>.,:;!|&%$~" + "πθ√×÷°·≤≥≠∞−")
# Python names that let text build and run code without any quote character.
_CODE_WORDS = re.compile(
    r"(?<![\\A-Za-z])(?:exec|eval|compile|open|import|lambda|getattr|setattr|delattr|globals|locals|vars"
    r"|breakpoint|input|bytes|bytearray|chr|memoryview|os|sys|subprocess|builtins)(?![A-Za-z])"
)


def extract_answer(text: str, answer_tag: str = "answer", fallback: bool = True) -> str | None:
    """The answer span of a completion (see the module docstring for the order), stripped; None if
    there is none."""
    span = last_tag_content(text, answer_tag)
    if span is None and fallback:
        span = last_boxed_content(text)
        if span is None:
            span = last_number(text)
    return None if span is None else span.strip()


_SUPERSCRIPT = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁼⁽⁾ⁿⁱ", "0123456789+-=()ni")
_SUBSCRIPT = str.maketrans("₀₁₂₃₄₅₆₇₈₉₊₋₌₍₎", "0123456789+-=()")
_SCRIPT_RUN = re.compile("([⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁼⁽⁾ⁿⁱ]+)|([₀₁₂₃₄₅₆₇₈₉₊₋₌₍₎]+)")
# Arabic decimal separator and thousands separator (NFKC keeps both).
_ARABIC_SEPARATORS = str.maketrans("\u066b\u066c", ".,")
# A bare number (not part of a name or of a longer number) with a lower-case exponent.
_LOWER_EXPONENT = re.compile(r"(?<![A-Za-z0-9_.\\])([0-9]+(?:\.[0-9]+)?|\.[0-9]+)e([+-]?[0-9]+)(?![A-Za-z0-9_.])")


def normalize_answer(span: str, max_chars: int | None = 1000) -> str:
    """The span with numbers spelled the ASCII way math-verify expects (module docstring). A span
    longer than `max_chars` is returned unchanged, for the sanitizer to refuse: NFKC can lengthen
    text, and untrusted text is bounded before any work on it (None: no bound, for ground truths)."""
    if max_chars is not None and len(span) > max_chars:
        return span
    if not span.isascii():
        span = _SCRIPT_RUN.sub(_script_to_latex, span)
        span = unicodedata.normalize("NFKC", span).translate(_ARABIC_SEPARATORS)
        span = "".join(str(unicodedata.decimal(ch)) if unicodedata.category(ch) == "Nd" else ch for ch in span)
    return _LOWER_EXPONENT.sub(r"\1E\2", span)


def _script_to_latex(match: re.Match) -> str:
    sup, sub = match.groups()
    return f"^{{{sup.translate(_SUPERSCRIPT)}}}" if sup else f"_{{{sub.translate(_SUBSCRIPT)}}}"


def sanitize_answer(span: str, max_chars: int = 1000) -> str | None:
    """The span with whitespace collapsed to single spaces, or None when it must not be parsed."""
    if len(span) > max_chars:
        return None
    span = " ".join(span.split())
    if not span or "__" in span or not all(ch in _ALLOWED_CHARS for ch in span) or _CODE_WORDS.search(span):
        return None
    return span


# ---- runs inside the worker process -------------------------------------------------------------


def _parse(text: str) -> list:
    from math_verify import parse

    # A bare span like "\sqrt{2}" matches none of math-verify's LaTeX anchors; "$...$" gives it one.
    if "\\boxed" not in text:
        inline = text.replace("\\$", "").replace("$", "").replace("\n", " ")
        parsed = parse(f"${inline}$", parsing_timeout=None)
        if any(not isinstance(p, str) for p in parsed):
            return parsed
    return parse(text, parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    # The G answers of one prompt share their ground truth.
    return _parse(gold)


def verify_answer(answer: str, gold: str) -> bool:
    """math-verify equivalence of an (already sanitized) answer span and a ground truth."""
    from math_verify import verify

    gold_parsed = _parse_gold(gold)
    answer_parsed = _parse(answer)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))


def warm_up() -> None:
    """Worker initializer: import sympy and build math-verify's regexes and parser before the
    first timed item, so start-up cost is never charged to an answer."""
    import logging

    # Its "timeout is disabled" warning is expected: the pool is the timeout.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    verify_answer("\\frac{1}{2}", "0.5")
    # sympy.simplify imports this on its first call (a second or so), inside someone's timed item.
    import sympy.physics.units  # noqa: F401


# ---- the reward ---------------------------------------------------------------------------------


def _check_score(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"MathReward: {param} must be a finite number, got {value!r}")
    return float(value)


class MathReward:
    """Reward `math`: `correct_score` when the answer is math-verify-equivalent to the ground truth.

    Call: `reward(prompts, completions, **columns) -> list[float]`; the ground truth is read from
    column `ground_truth` or, failing that, `answer` (a string or number per completion). A
    completion with no answer span, or one refused by `sanitize_answer`, scores `incorrect_score`;
    a verification that times out, crashes its worker, raises or is cut off by `batch_timeout_s`
    scores `failure_score`.

    `timeout_s` bounds each answer's verification; `batch_timeout_s` a whole call (None: 4 x
    `timeout_s` plus 0.1 s per answer to verify, so that a large batch of ordinary answers, a few
    ms each, is never cut off while 8 hanging ones cost 20 s, not 8 x 5 s); `max_answer_chars` the
    span handed to math-verify. The worker process (capped at `memory_limit_mb`) starts on the first call; pass
    `pool` to share one worker between rewards (its memory cap then applies). `close()` stops it.
    """

    name = "math"

    def __init__(
        self,
        answer_tag: str = "answer",
        fallback: bool = True,
        correct_score: float = 1.0,
        incorrect_score: float = 0.0,
        failure_score: float = 0.0,
        timeout_s: float = 5.0,
        batch_timeout_s: float | None = None,
        max_answer_chars: int = 1000,
        memory_limit_mb: int | None = 4096,
        pool: SubprocessPool | None = None,
    ):
        self.answer_tag = check_tag(answer_tag, "answer_tag", "MathReward")
        if not isinstance(fallback, bool):
            raise ValueError(f"MathReward: fallback must be true or false, got {fallback!r}")
        self.fallback = fallback
        self.correct_score = _check_score(correct_score, "correct_score")
        self.incorrect_score = _check_score(incorrect_score, "incorrect_score")
        self.failure_score = _check_score(failure_score, "failure_score")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"MathReward: timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        if batch_timeout_s is not None and not (
            isinstance(batch_timeout_s, (int, float)) and not isinstance(batch_timeout_s, bool) and batch_timeout_s > 0
        ):
            raise ValueError(
                f"MathReward: batch_timeout_s must be a positive number of seconds or None, got {batch_timeout_s!r}"
            )
        self.batch_timeout_s = None if batch_timeout_s is None else float(batch_timeout_s)
        if not (isinstance(max_answer_chars, int) and max_answer_chars > 0):
            raise ValueError(f"MathReward: max_answer_chars must be a positive int, got {max_answer_chars!r}")
        self.max_answer_chars = max_answer_chars
        if memory_limit_mb is not None and not (isinstance(memory_limit_mb, int) and memory_limit_mb > 0):
            raise ValueError(f"MathReward: memory_limit_mb must be a positive int or None, got {memory_limit_mb!r}")
        self.memory_limit_mb = memory_limit_mb
        if pool is not None and not isinstance(pool, SubprocessPool):
            raise ValueError(f"MathReward: pool must be a SubprocessPool or None, got {type(pool).__name__}")
        self._pool = pool
        self._owns_pool = pool is None
        self._lock = threading.Lock()
        self._counts = {"calls": 0, "no_answer": 0, "rejected": 0}

    @property
    def pool(self) -> SubprocessPool:
        # Created on first use so that building a reward (config validation) starts no process.
        with self._lock:
            if self._pool is None:
                self._pool = SubprocessPool(self.timeout_s, initializer=warm_up, memory_limit_mb=self.memory_limit_mb)
            return self._pool

    @property
    def counters(self) -> dict[str, int]:
        """calls (completions scored), no_answer, rejected (by the sanitizer), and the worker's
        timeouts, crashes, errors, over_budget (cut off by `batch_timeout_s`) and restarts (shared
        with other users of an injected pool)."""
        pool = self._pool.counters if self._pool is not None else {}
        keys = ("timeouts", "crashes", "errors", "over_budget", "restarts")
        return {**self._counts, **{k: pool.get(k, 0) for k in keys}}

    def __call__(
        self, prompts: Sequence[Any] | None, completions: Sequence[str], **columns: Sequence[Any]
    ) -> list[float]:
        n = check_batch(self.name, prompts, completions, columns)
        gold_column = get_column(self.name, columns, GROUND_TRUTH_COLUMNS)
        golds = [normalize_answer(_gold_text(g, i), None) for i, g in enumerate(gold_column)]
        scores = [self.incorrect_score] * n
        jobs: list[tuple[int, str]] = []
        for i, completion in enumerate(completions):
            span = extract_answer(completion, self.answer_tag, self.fallback)
            if span is None:
                self._counts["no_answer"] += 1
                continue
            clean = sanitize_answer(normalize_answer(span, self.max_answer_chars), self.max_answer_chars)
            if clean is None:
                self._counts["rejected"] += 1
                continue
            jobs.append((i, clean))
        self._counts["calls"] += n
        if jobs:
            budget = self.batch_timeout_s or 4 * self.timeout_s + 0.1 * len(jobs)
            results = self.pool.run(verify_answer, [(span, golds[i]) for i, span in jobs], timeout_s=self.timeout_s,
                                    batch_timeout_s=budget)
            for (i, _), result in zip(jobs, results):
                if result.status != "ok":
                    scores[i] = self.failure_score
                elif result.value:
                    scores[i] = self.correct_score
        return scores

    def close(self) -> None:
        """Stop the worker process this reward started (an injected pool is left to its owner)."""
        if self._owns_pool and self._pool is not None:
            self._pool.close()


def _gold_text(gold: Any, index: int) -> str:
    if isinstance(gold, str):
        return gold
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        return str(gold)
    raise ValueError(
        f"reward 'math': ground truth at index {index} is {type(gold).__name__} ({gold!r:.80}), "
        "expected a string or number"
    )
