"""Reward worker: scores completions with a weighted sum of rewards. The driver runs it as a Ray
actor; the class is plain Python. Every math-verify call inside already has its own hard timeout."""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from rewards.combine import WeightedReward

# Row keys that are not reward columns.
_NOT_COLUMNS = ("prompt", "solution")


def columns_of(rows: Sequence[dict]) -> dict[str, list[Any]]:
    """Per-sample columns from task rows (a key missing in a row is None there)."""
    keys = sorted({k for r in rows for k in r if k not in _NOT_COLUMNS})
    return {k: [r.get(k) for r in rows] for k in keys}


def accuracy_of(components: dict[str, list[float]], keys: Sequence[str]) -> list[float]:
    """1.0/0.0 per sample from the first of `keys` that applies to it (not NaN); a score >= 0.5 is correct."""
    n = len(next(iter(components.values())))
    out = []
    for i in range(n):
        score = next((components[k][i] for k in keys if k in components and not math.isnan(components[k][i])), 0.0)
        out.append(float(score >= 0.5))
    return out


class RewardWorker:
    def __init__(self, functions: list[dict], accuracy: Sequence[str]):
        self.reward = WeightedReward(functions)
        missing = [k for k in accuracy if k not in self.reward.keys]
        if missing:
            raise ValueError(f"reward.accuracy names {missing}, which are not among reward.functions {self.reward.keys}")
        self.accuracy = list(accuracy)

    def pid(self) -> int:
        return os.getpid()

    def score(self, prompts: list[str], completions: list[str], rows: list[dict]) -> dict:
        out = self.reward(prompts, completions, **columns_of(rows))
        return {"total": out["total"], "components": out["components"],
                "accuracy": accuracy_of(out["components"], self.accuracy)}

    def close(self) -> None:
        self.reward.close()
