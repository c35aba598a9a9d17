"""Benchmark record layouts (GSM8K, MATH-500, d1's Countdown and 4x4 Sudoku): each turns one record
of the user's file into a task row with d1's prompt and the ground truth its reward checks.

Prompts are d1's (dllm-reasoning/d1), verbatim, each one user message as d1 builds it (for GSM8K,
MATH-500 and Sudoku the instruction, "\\n\\n", the question: eval/gsm8k.py `create_prompt`). GSM8K and MATH-500 use d1's
eval prompts, which ask for `\\boxed{}` inside `<answer>` tags (the `math` reward reads the answer
tag, and math-verify the box in it). Countdown uses d1's training prompt
(diffu-grpo/data_utils.py), which asks for the bare expression in `<answer>` tags: that is what the
`countdown` reward (d1's training `compute_score`) reads; d1's eval prompt asks for a `\\boxed{}`
expression instead, which that reward would score as a wrong equation. Sudoku's prompt is the same
in both (rl/data/sudoku.py).

d1's eval also appends "<reasoning>" after the chat template, so the model starts inside its
reasoning; rows here carry the user message only, and the model writes the tag itself.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from rewards._common import last_boxed_content
from rl.data.sudoku import check_pair, sudoku_row

# The two eval prompts share these parts (pieced together: d1's texts have lines too long and
# trailing spaces, which a source file should not).
_MATH_EXPERT = ("You are a math expert. You will be given a question to solve. Solve it step by step. "
                "Wrap the final answer in a \\boxed{}.")
_BOXED_FORMAT = ("Respond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n"
                 "<answer>\n\\boxed{...}\n</answer>")

# eval/gsm8k.py GSM_SYSTEM_PROMPT (the space before the first newline is d1's).
GSM8K_PROMPT = f"{_MATH_EXPERT} \n{_BOXED_FORMAT}"

# eval/math500.py MATH500_SYSTEM_PROMPT (the stray '" ' after </answer> is d1's).
MATH500_PROMPT = f'{_MATH_EXPERT}\n{_BOXED_FORMAT}" \n'

# diffu-grpo/data_utils.py SYSTEM_PROMPT, which its Countdown prompt starts with.
XML_SYSTEM_PROMPT = """
Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""

# diffu-grpo/data_utils.py get_countdown_questions; {numbers} is the Python list, e.g. [2, 3, 4].
COUNTDOWN_PROMPT = (
    XML_SYSTEM_PROMPT + "\nUsing only the numbers {numbers}, create an arithmetic expression that evaluates to "
    "exactly {target}. You must use all numbers from the list, and each number must be used exactly once. You may "
    "use the operations +, -, *, and / as needed. After reasoning, provide only your final expression inside "
    "<answer></answer> tags without including an equals sign or the target number. For example, if the numbers are "
    "[2, 3, 4] and the target is 5, a valid answer is: <answer>\n2*4-3\n</answer>"
)

_GSM8K_FINAL = re.compile(r"-?\d+(?:\.\d+)?")


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"column {key!r}: expected a non-empty string, got {value!r:.80}")
    return value


def _int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise ValueError(f"column {key!r}: expected an integer, got {value!r:.80}")


def _pick(record: dict, *keys: str) -> str:
    """The first of `keys` the record has (a layout's column); an error naming them all otherwise."""
    for key in keys:
        if key in record:
            return key
    raise ValueError(f"column {' or '.join(repr(k) for k in keys)} is missing (the record has {sorted(record)})")


def gsm8k(record: dict) -> dict:
    """openai/gsm8k: `question`, `answer` (the worked solution ending "#### N"); the ground truth is
    N without thousands separators, as d1's Parser.extract_answer_gsm8k reads it."""
    question, solution = _text(record, "question"), _text(record, "answer")
    if "####" not in solution:
        raise ValueError(f"column 'answer': expected a solution ending '#### N', got {solution[-80:]!r}")
    final = solution.split("####", 1)[1].strip().lstrip("$").replace(",", "").strip()
    if not _GSM8K_FINAL.fullmatch(final):
        raise ValueError(f"column 'answer': expected a number after '####', got {final[:80]!r}")
    return {"prompt": f"{GSM8K_PROMPT}\n\n{question}", "answer": final, "task": "gsm8k"}


def math500(record: dict) -> dict:
    """HuggingFaceH4/MATH-500: `problem`, `answer` (the final answer, LaTeX). A MATH record with
    `solution` and no `answer` (d1 trains on such: ankner/math-500's train split) has the last
    `\\boxed{}` of its solution as the answer, as d1's correctness_reward_func_math reads it."""
    problem = _text(record, "problem")
    if "answer" in record or "solution" not in record:
        answer = _text(record, "answer").strip()
    else:
        answer = last_boxed_content(_text(record, "solution"))
        if answer is None or not answer.strip():
            raise ValueError("column 'solution': no \\boxed{...} answer in it (and no 'answer' column)")
    return {"prompt": f"{MATH500_PROMPT}\n\n{problem}", "answer": answer.strip(), "task": "math500"}


def countdown(record: dict) -> dict:
    """d1's two layouts: `nums` (or `numbers`) and `target` (Jiayi-Pan/Countdown-Tasks-3to4, its
    training set), or `input` "30,100,93" and `output` "23" (its dataset/countdown_cd3_test.jsonl)."""
    if "input" in record or "output" in record:
        raw, target = _text(record, "input"), _int(record.get("output"), "output")
        try:
            numbers = [int(x) for x in raw.split(",")]
        except ValueError:
            raise ValueError(f"column 'input': expected comma-separated integers, got {raw!r:.80}") from None
    else:
        key = _pick(record, "nums", "numbers")
        raw = record[key]
        if not isinstance(raw, (list, tuple)) or not raw:
            raise ValueError(f"column {key!r}: expected a non-empty list of integers, got {raw!r:.80}")
        numbers = [_int(x, key) for x in raw]
        target = _int(record.get("target"), "target")
    prompt = COUNTDOWN_PROMPT.format(numbers=numbers, target=target)
    return {"prompt": prompt, "answer": str(target), "task": "countdown", "numbers": numbers, "target": target}


def _sudoku_string(record: dict, key: str) -> str:
    value = record[key]
    # A CSV read without string types turns "0140432014020000" into 140432014020000; d1 reads it
    # with dtype=str. Padding back to 16 digits restores it.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**16:
        return f"{value:016d}"
    if not isinstance(value, str):
        raise ValueError(f"column {key!r}: expected a 16-character string, got {value!r:.80}")
    return value.strip()


def sudoku(record: dict) -> dict:
    """d1's CSVs (dataset/4x4_test_sudoku.csv): `Puzzle`, `Solution`, 16 characters each, read
    left-to-right, top-to-bottom, '0' for an empty cell; lower-case `puzzle`/`solution` too."""
    puzzle_key, solution_key = _pick(record, "Puzzle", "puzzle"), _pick(record, "Solution", "solution")
    puzzle, solution = _sudoku_string(record, puzzle_key), _sudoku_string(record, solution_key)
    problem = check_pair(puzzle, solution)
    if problem is not None:
        key = puzzle_key if problem.startswith("puzzle") else solution_key
        raise ValueError(f"column {key!r}: {problem}")
    return {**sudoku_row(puzzle, solution), "task": "sudoku"}


# task.format -> record (a dict read from the file) -> task row ({"prompt", "answer", "task", ...}).
# A bad record raises ValueError naming the column; the loader adds the file and row.
FORMATS: dict[str, Callable[[dict], dict]] = {
    "gsm8k": gsm8k,
    "math500": math500,
    "countdown": countdown,
    "sudoku": sudoku,
}
