"""Task rows for a run, and the cursor that hands out prompts in a seeded, resumable order."""
from __future__ import annotations

import io
import logging
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from rl.data.encode import image_prompt
from rl.data.files import load_file
from rl.data.shapes import render
from rl.data.tasks import IMAGE_MODES, make_mixture, validate_rows

log = logging.getLogger("dllm_rl")

# Rows read by the config check (rl/config.py: _check_tasks), handed to the driver's load_split with the
# same settings instead of reading the files a second time. Keyed by everything the rows depend on.
_LOADED: dict[tuple, list[dict]] = {}
_LOADED_MAX = 4  # train and val of the last two configs


def load_split(task_cfg, split: str, seed: int, model_dir: str | None = None) -> list[dict]:
    """The rows of task.train or task.val: a dataset file's rows (rl/data/files.py), or synthetic rows
    generated in code; with task.max_prompt_length, without the overlong prompts, counted with the
    tokenizer of `model_dir`. `task_cfg` is an rl.config.TaskConfig, its DictConfig or a plain dict.
    Each call gets its own row dicts (the driver adds image codes to them). For a model that reads
    continuous image features (LLaDA-V), image rows carry their `pixels` (attach_pixels)."""
    file = _setting(task_cfg, f"{split}_file")
    reading = {"prompt_key": _setting(task_cfg, "prompt_key", "prompt"),
               "answer_key": _setting(task_cfg, "answer_key", "answer"),
               "format": _setting(task_cfg, "format")}
    max_len = _setting(task_cfg, "max_prompt_length")
    filter_overlong = _setting(task_cfg, "filter_overlong_prompts", True)
    counts = dict(_setting(task_cfg, split) or {})
    source_key = _fingerprint(Path(file).expanduser()) if file is not None else (tuple(sorted(counts.items())), seed)
    from rl.models import vision_input_size

    vision_size = vision_input_size(model_dir) if model_dir is not None else None
    key = (split, source_key, *reading.values(), max_len, filter_overlong,
           model_dir if max_len is not None else None, vision_size)
    if key not in _LOADED:
        if file is not None:
            rows, source = load_file(file, split, **reading), str(file)
        else:
            source = f"task.{split}"
            rows = validate_rows(make_mixture(counts, seed=seed, split="train" if split == "train" else "val"), source)
        if max_len is not None:
            rows = drop_overlong(rows, source, max_len, filter_overlong, model_dir)
        if vision_size is not None:  # LLaDA-V: the images as its tower's pixels, read and checked once
            attach_pixels(rows, vision_size, source)
        else:
            bad = next((i for i, r in enumerate(rows) if r.get("images")), None)
            if bad is not None:
                raise ValueError(f"{source}: row {bad} has prompt images ('images', verl's multimodal layout), which "
                                 "need a model that reads image features (LLaDA-V, e.g. model=tiny_llada_v); a "
                                 "unified-token model (MMaDA) takes mode: mmu with image: a file path")
        while len(_LOADED) >= _LOADED_MAX:
            del _LOADED[next(iter(_LOADED))]
        _LOADED[key] = rows
    return [dict(r) for r in _LOADED[key]]


def _setting(task_cfg, key: str, default=None):
    if isinstance(task_cfg, Mapping):  # a dict or DictConfig
        return task_cfg.get(key, default)
    return getattr(task_cfg, key, default)


def _fingerprint(path: Path) -> tuple:
    # Path, size and modification time of the file, or of every file in a save_to_disk folder: an edited
    # file is read again.
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    return (str(path.resolve()), *((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def drop_overlong(rows: list[dict], source: str, max_len: int, filter_overlong: bool,
                  model_dir: str | None) -> list[dict]:
    """Rows whose chat-templated prompt is at most `max_len` tokens (verl's data.filter_overlong_prompts);
    the dropped ones are counted in a warning. Without filtering, an overlong prompt is an error. Image
    rows count their text only: their image codes are a fixed number of tokens added later."""
    if model_dir is None:
        raise ValueError("task.max_prompt_length: counting prompt tokens needs the model's tokenizer "
                         "(load_split(..., model_dir=...))")
    from rl.data.encode import encode_prompts
    from rl.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    lengths = []
    for lo in range(0, len(rows), 256):  # in chunks, so padding stays small
        _, mask = encode_prompts(tokenizer, [r["prompt"] for r in rows[lo:lo + 256]])
        lengths += mask.sum(1).tolist()
    over = [i for i, n in enumerate(lengths) if n > max_len]
    if not over:
        return rows
    if not filter_overlong:
        i = over[0]
        raise ValueError(f"{source}: row {i} prompt is {lengths[i]} tokens, longer than task.max_prompt_length="
                         f"{max_len} ({len(over)} such rows; task.filter_overlong_prompts=true drops them)")
    if len(over) == len(rows):
        raise ValueError(f"{source}: every prompt is longer than task.max_prompt_length={max_len} tokens (the "
                         f"shortest is {min(lengths)})")
    log.warning("%s: dropped %d of %d rows whose prompt is longer than task.max_prompt_length=%d tokens (the "
                "longest is %d)", source, len(over), len(rows), max_len, max(lengths))
    dropped = set(over)
    return [r for i, r in enumerate(rows) if i not in dropped]


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


def attach_pixels(rows: list[dict], size: int, source: str) -> list[dict]:
    """Give every row that shows images its `pixels`: uint8 [size, size, 3] arrays, one per image, for a
    model fed continuous image features (LLaDA-V). Images come from a row's `scene` (rendered), `image`
    (a file path) or `images` (a list of file paths, of verl's {"bytes", "path"} dicts, or of HxWx3
    arrays), and are resized to the vision tower's input as LLaDA-V's processor does (bicubic, the whole
    image). Read once here; a missing, unreadable or misshapen image is an error naming the row."""
    for i, row in enumerate(rows):
        if row.get("mode") == "t2i":
            raise ValueError(f"{source}: row {i} is a text-to-image row (mode 't2i'); this model reads images but "
                             "does not write them (LLaDA-V): text-to-image needs a unified-token model (MMaDA)")
        if "pixels" in row:
            continue
        sources = _image_sources(row, f"{source}: row {i}")
        if sources:
            row["pixels"] = [_resized(x, size, f"{source}: row {i} image {j}") for j, x in enumerate(sources)]
        image_prompt(row, f"{source}: row {i}")  # as many <image> placeholders as images
    return rows


def _image_sources(row: dict, where: str) -> list:
    if "scene" in row:
        return [render(row["scene"])]
    if "image" in row:
        return [row["image"]]
    images = row.get("images")
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"{where}: 'images' is {type(images).__name__}, expected a list of images")
    return list(images)


def _resized(image, size: int, where: str) -> np.ndarray:
    """An image source as uint8 [size, size, 3]."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, dict):  # verl / datasets' Image feature: {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    try:
        if isinstance(image, (bytes, bytearray)):
            im = Image.open(io.BytesIO(image))
        elif isinstance(image, (str, Path)):
            im = Image.open(Path(image).expanduser())
        else:
            arr = np.asarray(image)
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape:
                raise ValueError(f"{where}: expected uint8 pixels [H, W, 3], a file path or encoded bytes, got "
                                 f"{arr.dtype} {tuple(arr.shape)}")
            im = Image.fromarray(arr)
        with im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise ValueError(f"{where}: image file {str(image)!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: cannot read the image ({e})") from None


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
