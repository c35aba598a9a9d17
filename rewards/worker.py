"""Reward worker: scores completions with a weighted sum of rewards. The driver runs it as a Ray
actor; the class is plain Python. Every math-verify call inside already has its own hard timeout."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.combine import WeightedReward

# Row keys that are not reward columns: the prompt is passed on its own, and `images` is the column of
# generated images (decoded here). `solution` is one: TRL's math datasets keep the ground truth there.
_NOT_COLUMNS = ("prompt", "images")


def columns_of(rows: Sequence[dict]) -> dict[str, list[Any]]:
    """Per-sample columns from task rows (a key missing in a row is None there)."""
    keys = sorted({k for r in rows for k in r if k not in _NOT_COLUMNS})
    return {k: [r.get(k) for r in rows] for k in keys}


def accuracy_of(components: dict[str, list[float]], keys: Sequence[str]) -> list[float]:
    """1.0/0.0 per sample from the first of `keys` that applies to it (not NaN); a score >= 0.5 is correct.
    NaN where none applies (e.g. a text-to-image sample has no correct answer)."""
    n = len(next(iter(components.values())))
    out = []
    for i in range(n):
        score = next((components[k][i] for k in keys if k in components and not math.isnan(components[k][i])), None)
        out.append(math.nan if score is None else float(score >= 0.5))
    return out


@dataclass
class Scores:
    """What a reward worker returns for a batch; every list has one entry per sample.

    total: the weighted sum; accuracy: 1.0/0.0 from the accuracy reward (NaN where none applies);
    components: each reward's unweighted score by component key (NaN = not applicable);
    extras: the extra keys of verl-style dict results as "<component>/<key>" (None where missing);
    events: what the rewards counted while scoring this batch (RewardWorker.counters), summed over workers.
    """

    total: list[float]
    accuracy: list[float]
    components: dict[str, list[float]]
    extras: dict[str, list[Any]] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.total)

    @staticmethod
    def concat(parts: Sequence["Scores"]) -> "Scores":
        """Scores of consecutive slices of one batch, joined in order."""
        keys = list(parts[0].components)
        extra_keys = sorted({k for p in parts for k in p.extras})
        return Scores(
            total=[x for p in parts for x in p.total],
            accuracy=[x for p in parts for x in p.accuracy],
            components={k: [x for p in parts for x in p.components[k]] for k in keys},
            extras={k: [x for p in parts for x in p.extras.get(k, [None] * len(p))] for k in extra_keys},
            events={k: sum(p.events.get(k, 0) for p in parts) for k in sorted({k for p in parts for k in p.events})},
        )


class RewardWorker:
    """`functions`: reward specs (rewards.combine.RewardSpec); `accuracy`: the component keys that
    decide accuracy (see `accuracy_of`); `on_call`: passed to WeightedReward, called with a
    component's key before it runs and None after (the driver names a hung or dead reward with it)."""

    def __init__(self, functions: list[dict], accuracy: Sequence[str], image_tokenizer: str | None = None,
                 on_call: Callable[[str | None], None] | None = None):
        self.reward = WeightedReward(functions, on_call=on_call)
        self.image_tokenizer_path = image_tokenizer
        self._image_tokenizer = None
        missing = [k for k in accuracy if k not in self.reward.keys]
        if missing:
            raise ValueError(
                f"reward.accuracy names {missing}, which are not among reward.functions {self.reward.keys}"
            )
        self.accuracy = list(accuracy)

    def decode(self, images: Sequence[list[int] | None]) -> list:
        """Generated image codes -> uint8 [H, W, 3] pixels in memory (None stays None)."""
        idx = [i for i, codes in enumerate(images) if codes is not None]
        out = [None] * len(images)
        if idx:
            if self._image_tokenizer is None:
                from rl.models.vq import load_image_tokenizer
                self._image_tokenizer = load_image_tokenizer(self.image_tokenizer_path)
            pixels = self._image_tokenizer.decode([images[i] for i in idx])
            for j, i in enumerate(idx):
                out[i] = pixels[j].numpy()
        return out

    def score(self, prompts: list[str], completions: list[str], rows: list[dict],
              images: Sequence[list[int] | None] | None = None) -> Scores:
        """`images`: per sample, the generated image codes (None for text answers); reward functions
        see them decoded, as column `images`."""
        columns = columns_of(rows)
        if images is not None and any(codes is not None for codes in images):
            columns["images"] = self.decode(images)
        before = self.counters()
        out = self.reward(prompts, completions, **columns)
        events = {k: v - before.get(k, 0) for k, v in self.counters().items()}
        return Scores(out["total"], accuracy_of(out["components"], self.accuracy), out["components"], out["extras"],
                      events)

    def counters(self) -> dict[str, int]:
        """Running totals of the rewards that count events, as "<component>/<name>": MathReward's
        timeouts, crashes, errors, over_budget (cut off by its batch_timeout_s), restarts, ... so
        that the driver can log what scored `failure_score` and why."""
        out: dict[str, int] = {}
        for key, reward in zip(self.reward.keys, self.reward.rewards):
            counts = getattr(reward.fn, "counters", None)
            if isinstance(counts, Mapping):
                out.update({f"{key}/{name}": value for name, value in counts.items()})
        return out

    def close(self) -> None:
        self.reward.close()
