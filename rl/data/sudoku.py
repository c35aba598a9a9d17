"""4x4 Sudoku in d1's format (dllm-reasoning/d1): a puzzle is a 16-character string read
left-to-right, top-to-bottom, '0' for an empty cell; the solution is the filled 16-digit grid.

`sudoku_row` builds the task row for both d1's files (rl/data/benchmarks.py) and the synthetic
generator (`generate`, registered as task `sudoku` in rl/data/tasks.py), so the two are scored and
prompted alike. d1's test puzzles (dataset/4x4_test_sudoku.csv) all have 8 empty cells; 376 of its
500 have one solution, the other 124 two to four, and d1 scores every answer against the file's one
solution. The generator makes 8-empty-cell puzzles with exactly one solution, so that a correct
answer is never scored as wrong; files are taken as they are (`check_pair` does not ask for
uniqueness).
"""
from __future__ import annotations

import functools
import random

# d1's SUDOKU_SYSTEM_PROMPT (diffu-grpo/data_utils.py and eval/sudoku.py, identical), verbatim.
SUDOKU_SYSTEM_PROMPT = (
    "\nPlease solve the following 4x4 Sudoku puzzle. The puzzle is provided as a 16-character string reading "
    "left-to-right, top-to-bottom, where '0' represents empty cells.\n"
    "\n"
    "Rules:\n"
    "- Fill empty cells with digits 1-4\n"
    "- Each row must contain digits 1-4 exactly once\n"
    "- Each column must contain digits 1-4 exactly once\n"
    "- Each 2x2 box must contain digits 1-4 exactly once\n"
    "\n"
    "Important: Your solution must be a COMPLETE 16-character string with only the digits 1-4, representing your "
    "final solved grid.\n"
    "\n"
    "Respond in this exact format:\n"
    "<reasoning>\n"
    "Your step-by-step solving process\n"
    "</reasoning>\n"
    "<answer>\n"
    "[16-character solution string with no spaces or separators]\n"
    "</answer>\n"
)

# Cell indices of each row, column and 2x2 box.
UNITS = (
    [[4 * r + c for c in range(4)] for r in range(4)]
    + [[4 * r + c for r in range(4)] for c in range(4)]
    + [[4 * (br + r) + bc + c for r in range(2) for c in range(2)] for br in (0, 2) for bc in (0, 2)]
)
PEERS = [sorted({j for unit in UNITS if i in unit for j in unit} - {i}) for i in range(16)]


def sudoku_prompt(puzzle: str) -> str:
    # As d1 builds it: the system prompt and the question in one user message, joined by "\n\n".
    return f"{SUDOKU_SYSTEM_PROMPT}\n\nSolve the following Sudoku puzzle: {puzzle}\n"


def is_solution(grid: str) -> bool:
    """A complete valid grid: 16 digits 1-4, each unit holding each digit once."""
    return (len(grid) == 16 and all(ch in "1234" for ch in grid)
            and all(sorted(grid[i] for i in unit) == list("1234") for unit in UNITS))


def count_solutions(puzzle: str, limit: int = 2) -> int:
    """Solutions of a puzzle string ('0' = empty), counting stops at `limit`."""
    cells = list(puzzle)

    def search() -> int:
        try:
            i = cells.index("0")
        except ValueError:
            return 1
        found = 0
        for d in "1234":
            if all(cells[j] != d for j in PEERS[i]):
                cells[i] = d
                found += search()
                cells[i] = "0"
                if found >= limit:
                    break
        return found

    # Givens that clash with each other make the puzzle unsolvable, whatever the search fills in.
    if any(ch != "0" and any(cells[j] == ch for j in PEERS[i]) for i, ch in enumerate(cells)):
        return 0
    return search()


@functools.cache
def all_solutions() -> tuple[str, ...]:
    """The 288 valid 4x4 grids, in a fixed order (so a seeded choice is reproducible)."""
    out: list[str] = []
    cells = ["0"] * 16

    def fill(i: int) -> None:
        if i == 16:
            out.append("".join(cells))
            return
        for d in "1234":
            if all(cells[j] != d for j in PEERS[i]):
                cells[i] = d
                fill(i + 1)
        cells[i] = "0"

    fill(0)
    return tuple(out)


def check_pair(puzzle: str, solution: str) -> str | None:
    """Why a (puzzle, solution) pair is not a d1 4x4 Sudoku, naming the column; None if it is."""
    if len(puzzle) != 16 or not all(ch in "01234" for ch in puzzle):
        return f"puzzle {puzzle!r:.40} is not 16 characters of 0-4 (0 = empty cell)"
    if "0" not in puzzle:
        return f"puzzle {puzzle!r} has no empty cell ('0')"
    if not is_solution(solution):
        return f"solution {solution!r:.40} is not a complete valid 4x4 grid (16 digits 1-4)"
    if any(p != "0" and p != s for p, s in zip(puzzle, solution)):
        return f"solution {solution!r} disagrees with the givens of puzzle {puzzle!r}"
    return None


def reference_completion(puzzle: str, solution: str) -> str:
    """A short d1-format answer (for SFT): the empty cells filled, row by row, then the grid."""
    steps = [f"row {r + 1} col {c + 1} = {solution[4 * r + c]}"
             for r in range(4) for c in range(4) if puzzle[4 * r + c] == "0"]
    return f"<reasoning>\n{', '.join(steps)}\n</reasoning>\n<answer>\n{solution}\n</answer>"


def sudoku_row(puzzle: str, solution: str) -> dict:
    """The task row: d1's prompt; `answer` the solved grid (the ground truth the `sudoku` reward
    reads, as column `answer`) and `puzzle` (which cells count); `solution` a reference completion,
    as every task row here has one (rewards never see it)."""
    return {"prompt": sudoku_prompt(puzzle), "answer": solution, "puzzle": puzzle,
            "solution": reference_completion(puzzle, solution)}


def generate(rng: random.Random, empty: int = 8) -> dict:
    """A uniquely solvable puzzle with `empty` blank cells (d1's test set: 8), as a task row."""
    solutions = all_solutions()
    while True:
        solution = rng.choice(solutions)
        blanks = set(rng.sample(range(16), empty))
        puzzle = "".join("0" if i in blanks else ch for i, ch in enumerate(solution))
        if count_solutions(puzzle) == 1:
            return sudoku_row(puzzle, solution)
