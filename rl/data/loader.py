"""Task rows for a run, and the cursor that hands out prompts in a seeded, resumable order."""
from __future__ import annotations

import random

import numpy as np

from rl.data.shapes import render
from rl.data.tasks import IMAGE_MODES, load_jsonl, make_mixture, validate_rows


def load_split(task_cfg, split: str, seed: int) -> list[dict]:
    """The rows of task.train or task.val (a DictConfig or rl.config.TaskConfig): a JSONL file's rows, or
    synthetic rows generated in code."""
    file = getattr(task_cfg, f"{split}_file")
    if file is not None:
        return load_jsonl(file)
    rows = make_mixture(dict(getattr(task_cfg, split)), seed=seed, split="train" if split == "train" else "val")
    return validate_rows(rows, f"task.{split}")


def _is_image_row(row: dict) -> bool:
    return row.get("mode") in IMAGE_MODES


def has_images(rows: list[dict]) -> bool:
    return any(_is_image_row(r) for r in rows)


def attach_image_codes(rows: list[dict], image_tokenizer, source: str, batch: int = 256) -> list[dict]:
    """Give every image row its `image_codes` (the prompt image of an mmu row, the ground truth of a
    t2i row), encoded once here rather than on every rollout. The image is the row's `scene`
    (rendered), or `image`, a file path, read with PIL."""
    todo = [(i, r) for i, r in enumerate(rows) if _is_image_row(r) and "image_codes" not in r]
    size = image_tokenizer.config.image_size
    for lo in range(0, len(todo), batch):
        pixels = [_pixels(r, i, source, size) for i, r in todo[lo:lo + batch]]
        codes = image_tokenizer.encode(np.stack(pixels)).tolist()
        for (_, row), c in zip(todo[lo:lo + batch], codes):
            row["image_codes"] = c
    for i, r in enumerate(rows):
        codes = r.get("image_codes")
        if codes is not None and (not isinstance(codes, list) or len(codes) != image_tokenizer.tokens_per_image
                                  or not all(isinstance(c, int) and 0 <= c < image_tokenizer.codebook_size
                                             for c in codes)):
            raise ValueError(f"{source}: row {i} image_codes must be {image_tokenizer.tokens_per_image} integers in "
                             f"[0, {image_tokenizer.codebook_size})")
    return rows


def _pixels(row: dict, i: int, source: str, size: int) -> np.ndarray:
    if "scene" in row:
        return render(row["scene"], size)
    from PIL import Image
    try:
        with Image.open(row["image"]) as im:
            img = np.asarray(im.convert("RGB"))
    except (OSError, KeyError) as e:
        raise ValueError(f"{source}: row {i}: cannot read image {row.get('image')!r} ({e})") from None
    if img.shape[:2] != (size, size):
        raise ValueError(f"{source}: row {i}: image {row['image']!r} is {img.shape[1]}x{img.shape[0]}, the image "
                         f"tokenizer takes {size}x{size}")
    return img


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
