"""Countdown: write an equation over the given numbers that equals the target.

Scoring mirrors d1's `compute_score` (dllm-reasoning/d1, diffu-grpo/reward_func.py, itself from
TinyZero):

- no complete `<answer>...</answer>` in the completion: 0.0;
- the answer is an equation that uses exactly the given numbers, each exactly once (as a multiset,
  d1's `sorted(numbers_in_eq) == sorted(available)`), and equals the target: `correct_score` (1.0);
- anything else inside the answer tag (wrong numbers, wrong value, not an equation, too long):
  `format_score` (0.1), d1's credit for answering in the right place.

Where we differ from d1, on purpose: the equation is never `eval`ed. A small AST walker accepts
integer literals, binary `+ - * /`, unary minus and parentheses (the character set d1 allows, minus
the decimal point), over exact fractions, so the target must be hit exactly rather than within
1e-5. Length, nesting depth and every intermediate numerator and denominator are bounded, and
division by zero is simply a wrong equation.
"""
from __future__ import annotations

import ast
import math
import numbers as numbers_abc
import operator
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from rewards._common import check_batch, check_tag, get_column, last_tag_content

_EQUATION_CHARS = frozenset("0123456789+-*/() \t\n")
_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class _Rejected(Exception):
    pass


def evaluate_equation(
    equation: str, max_chars: int = 256, max_depth: int = 64, max_abs: int = 10**12
) -> tuple[Fraction, list[int]] | None:
    """(exact value, integer literals in order of appearance), or None if the text is not a
    bounded arithmetic expression."""
    if not equation.strip() or len(equation) > max_chars or any(ch not in _EQUATION_CHARS for ch in equation):
        return None
    # ast.parse is recursive too; refuse deep nesting before handing it over.
    depth = 0
    for ch in equation:
        depth += (ch == "(") - (ch == ")")
        if depth > max_depth:
            return None
    try:
        tree = ast.parse(equation, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    literals: list[int] = []
    try:
        value = _evaluate(tree.body, literals, 0, max_depth, max_abs)
    except _Rejected:
        return None
    return value, literals


def _evaluate(node: ast.AST, literals: list[int], depth: int, max_depth: int, max_abs: int) -> Fraction:
    if depth > max_depth:
        raise _Rejected
    if isinstance(node, ast.Constant) and type(node.value) is int:
        literals.append(node.value)
        value = Fraction(node.value)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = -_evaluate(node.operand, literals, depth + 1, max_depth, max_abs)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left = _evaluate(node.left, literals, depth + 1, max_depth, max_abs)
        right = _evaluate(node.right, literals, depth + 1, max_depth, max_abs)
        if isinstance(node.op, ast.Div) and right == 0:
            raise _Rejected
        value = _BINARY_OPS[type(node.op)](left, right)
    else:
        raise _Rejected
    if abs(value.numerator) > max_abs or value.denominator > max_abs:
        raise _Rejected
    return value


def countdown_score(
    text: str,
    target: int,
    numbers: Sequence[int],
    answer_tag: str = "answer",
    correct_score: float = 1.0,
    format_score: float = 0.1,
    max_equation_chars: int = 256,
) -> float:
    equation = last_tag_content(text, answer_tag)
    if equation is None:
        return 0.0
    result = evaluate_equation(equation.strip(), max_chars=max_equation_chars)
    if result is None:
        return format_score
    value, literals = result
    if sorted(literals) != sorted(numbers) or value != target:
        return format_score
    return correct_score


class CountdownReward:
    """Reward `countdown`: `reward(prompts, completions, **columns) -> list[float]`.

    Per completion it needs the target and the numbers: columns `target` and `numbers` (or
    `nums`), as in d1 and this project's task rows; or, verl/TinyZero style, a `ground_truth`
    column of dicts with keys `target` and `numbers`.
    """

    name = "countdown"

    def __init__(
        self,
        answer_tag: str = "answer",
        correct_score: float = 1.0,
        format_score: float = 0.1,
        max_equation_chars: int = 256,
    ):
        self.answer_tag = check_tag(answer_tag, "answer_tag", "CountdownReward")
        for param, value in (("correct_score", correct_score), ("format_score", format_score)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"CountdownReward: {param} must be a finite number, got {value!r}")
        self.correct_score = float(correct_score)
        self.format_score = float(format_score)
        if not (isinstance(max_equation_chars, int) and max_equation_chars > 0):
            raise ValueError(f"CountdownReward: max_equation_chars must be a positive int, got {max_equation_chars!r}")
        self.max_equation_chars = max_equation_chars

    def __call__(
        self, prompts: Sequence[Any] | None, completions: Sequence[str], **columns: Sequence[Any]
    ) -> list[float]:
        n = check_batch(self.name, prompts, completions, columns)
        if "target" in columns:
            targets = columns["target"]
            number_lists = get_column(self.name, columns, ("numbers", "nums"))
        else:
            truths = get_column(self.name, columns, ("target", "ground_truth"))
            targets, number_lists = [], []
            for i, truth in enumerate(truths):
                if not isinstance(truth, dict) or "target" not in truth or "numbers" not in truth:
                    raise ValueError(
                        f"reward 'countdown': ground_truth[{i}] must be a dict with keys 'target' and 'numbers', "
                        f"got {truth!r:.80}"
                    )
                targets.append(truth["target"])
                number_lists.append(truth["numbers"])
        return [
            countdown_score(
                completions[i],
                _as_int(targets[i], f"target[{i}]"),
                [_as_int(x, f"numbers[{i}]") for x in _as_list(number_lists[i], f"numbers[{i}]")],
                self.answer_tag,
                self.correct_score,
                self.format_score,
                self.max_equation_chars,
            )
            for i in range(n)
        ]


def _as_list(value: Any, where: str) -> list:
    if hasattr(value, "tolist"):  # numpy arrays and tensors from a data loader
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(
            f"reward 'countdown': {where} must be a list of integers, got {type(value).__name__} ({value!r:.80})"
        )
    return list(value)


def _as_int(value: Any, where: str) -> int:
    if isinstance(value, numbers_abc.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"reward 'countdown': {where} must be an integer, got {type(value).__name__} ({value!r:.80})")
