"""4x4 Sudoku: fill the empty cells of a 16-character puzzle string ('0' = empty).

Scoring mirrors d1's `sudoku_reward_func` (dllm-reasoning/d1, diffu-grpo/reward_func.py; its eval,
eval/parse_and_get_acc.py, counts the same cells):

- the answer is the content of the last complete `<answer>...</answer>`, keeping only its digits
  (d1's `extract_answer_sudoku`); no answer tag, or no digit in it: 0.0;
- the digits are padded with '0' to 16 or cut to 16, and the score is the fraction of the puzzle's
  empty cells whose digit equals the ground-truth solution's (given cells are not counted).

With `exact=True` the score is 1.0 only when every empty cell is right, else 0.0: the puzzles
solved, for `reward.accuracy` (which counts a score of at least 0.5 as correct, so the cell fraction
would call a half-filled grid correct).

The answer is only compared character by character; nothing in it is evaluated. Only the first 16
digits are looked at, so a long answer costs no more than a short one.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rewards._common import check_batch, check_tag, get_column, last_tag_content

GROUND_TRUTH_COLUMNS = ("ground_truth", "answer")


def extract_grid(text: str, answer_tag: str = "answer") -> str | None:
    """The first 16 digits inside the last complete answer tag ('' if it holds none); None without
    one. Like d1 (`str.isdigit`), any Unicode digit is kept: it just never matches a ground truth."""
    span = last_tag_content(text, answer_tag)
    if span is None:
        return None
    digits = []
    for ch in span:
        if ch.isdigit():
            digits.append(ch)
            if len(digits) == 16:
                break
    return "".join(digits)


def sudoku_score(text: str, puzzle: str, solution: str, answer_tag: str = "answer", exact: bool = False) -> float:
    grid = extract_grid(text, answer_tag)
    empty = [i for i in range(16) if puzzle[i] == "0"]
    if not grid or not empty:
        return 0.0
    grid = grid.ljust(16, "0")
    correct = sum(grid[i] == solution[i] for i in empty)
    if exact:
        return float(correct == len(empty))
    return correct / len(empty)


class SudokuReward:
    """Reward `sudoku`: `reward(prompts, completions, **columns) -> list[float]`.

    Needs per completion the puzzle (column `puzzle`, 16 characters of 0-4) and the solved grid
    (column `ground_truth` or `answer`, 16 digits), as rl/data/sudoku.py's rows carry them.
    """

    name = "sudoku"

    def __init__(self, answer_tag: str = "answer", exact: bool = False):
        self.answer_tag = check_tag(answer_tag, "answer_tag", "SudokuReward")
        if not isinstance(exact, bool):
            raise ValueError(f"SudokuReward: exact must be true or false, got {exact!r}")
        self.exact = exact

    def __call__(
        self, prompts: Sequence[Any] | None, completions: Sequence[str], **columns: Sequence[Any]
    ) -> list[float]:
        n = check_batch(self.name, prompts, completions, columns)
        puzzles = get_column(self.name, columns, ("puzzle",))
        solutions = get_column(self.name, columns, GROUND_TRUTH_COLUMNS)
        return [
            sudoku_score(completions[i], _grid(puzzles[i], f"puzzle[{i}]", "01234"),
                         _grid(solutions[i], f"ground truth [{i}]", "1234"), self.answer_tag, self.exact)
            for i in range(n)
        ]


def _grid(value: Any, where: str, alphabet: str) -> str:
    # The dataset's own values: a malformed one is a data error to report, not a wrong answer.
    if not (isinstance(value, str) and len(value) == 16 and all(ch in alphabet for ch in value)):
        raise ValueError(f"reward 'sudoku': {where} must be a 16-character string of {alphabet}, got {value!r:.80}")
    return value
