"""Benchmark record layouts (GSM8K, MATH-500, d1's Countdown and 4x4 Sudoku): each turns one record
of the user's file into a task row with d1's prompt and the ground truth its reward checks."""
from __future__ import annotations

from collections.abc import Callable

# task.format -> record (a dict read from the file) -> task row ({"prompt", "answer", "task", ...}).
# A bad record raises ValueError naming the column; the loader adds the file and row.
FORMATS: dict[str, Callable[[dict], dict]] = {}
