"""Task rows for a run, and the cursor that hands out prompts in a seeded, resumable order."""
from __future__ import annotations

import random

from rl.data.tasks import load_jsonl, make_mixture, validate_rows


def load_split(task_cfg, split: str, seed: int) -> list[dict]:
    file = task_cfg[f"{split}_file"]
    if file is not None:
        return load_jsonl(file)
    rows = make_mixture(dict(task_cfg[split]), seed=seed, split="train" if split == "train" else "val")
    return validate_rows(rows, f"task.{split}")


class PromptCursor:
    """Epochs over the rows, each in a fresh seeded order; its state is two integers, so a resumed
    run continues with exactly the prompts it would have seen."""

    def __init__(self, rows: list[dict], seed: int, epoch: int = 0, index: int = 0):
        self.rows, self.seed, self.epoch, self.index = rows, seed, epoch, index
        self._order = self._shuffle(epoch)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            out.append(self.rows[self._order[self.index]])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}
