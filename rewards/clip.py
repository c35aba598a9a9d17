"""CLIP alignment reward: how well a generated image matches its caption (CLIPScore, Hessel et al. 2021).

`ClipScorer` loads `transformers.CLIPModel` and `CLIPProcessor` from a local directory (the shipped
tiny CLIP, recipes/build_tiny_clip.py, or e.g. a downloaded openai/clip-vit-large-patch14) and scores
in-memory uint8 images against texts: 100 x cosine of the image and text embeddings, in batches.
`ClipReward` is the built-in reward `clip`: it scores column `images` (decoded by the reward worker;
None = no image, NaN = does not apply) against the prompt, which for text-to-image is the caption.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

TINY_CLIP = Path(__file__).resolve().parents[1] / "recipes" / "assets" / "tiny-clip"


def check_clip_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"CLIP directory {str(path)!r} does not exist")
    missing = [name for name, ok in (
        ("config.json", (path / "config.json").is_file()),
        ("model weights (*.safetensors)", any(path.glob("*.safetensors"))),
        ("preprocessor_config.json / processor_config.json",
         (path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file()),
        ("tokenizer files (tokenizer.json or vocab.json + merges.txt)",
         (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()),
    ) if not ok]
    if missing:
        raise FileNotFoundError(f"CLIP directory {str(path)!r} is missing: {', '.join(missing)}")
    return path


class ClipScorer:
    def __init__(self, path: str | Path | None = None, device: str = "cpu", batch_size: int = 64):
        from transformers import CLIPModel, CLIPProcessor

        path = check_clip_dir(TINY_CLIP if path is None else path)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.device, self.batch_size = device, batch_size
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def embed(self, images: Sequence[Any], texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.processor(text=list(texts), images=[np.asarray(im) for im in images], return_tensors="pt",
                                padding=True, truncation=True, max_length=self.max_length)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img = img.pooler_output if hasattr(img, "pooler_output") else img
        txt = txt.pooler_output if hasattr(txt, "pooler_output") else txt
        return torch.nn.functional.normalize(img.float(), dim=-1), torch.nn.functional.normalize(txt.float(), dim=-1)

    def __call__(self, images: Sequence[Any], texts: Sequence[str]) -> list[float]:
        """100 x cosine(image i, text i) per pair."""
        if len(images) != len(texts):
            raise ValueError(f"CLIP score: {len(images)} images for {len(texts)} texts (expected one each)")
        out: list[float] = []
        for lo in range(0, len(images), self.batch_size):
            img, txt = self.embed(images[lo:lo + self.batch_size], texts[lo:lo + self.batch_size])
            out += (100 * (img * txt).sum(-1)).tolist()
        return out


class ClipReward:
    """Reward `clip`: `scale` x CLIP score of `images[i]` against `prompts[i]` (MMaDA weights it 0.1)."""

    name = "clip"

    def __init__(self, path: str | None = None, device: str = "cpu", batch_size: int = 64, scale: float = 1.0):
        self.scorer = ClipScorer(path, device, batch_size)
        self.scale = float(scale)

    def __call__(self, prompts, completions, **columns) -> list[float]:
        if "images" not in columns:
            raise ValueError(f"reward 'clip' needs column 'images' (the decoded images); the batch has {sorted(columns)}")
        images = columns["images"]
        idx = [i for i, im in enumerate(images) if im is not None]
        scores = [math.nan] * len(images)
        if idx:
            for i, s in zip(idx, self.scorer([images[i] for i in idx], [prompts[i] for i in idx])):
                scores[i] = self.scale * s
        return scores

    def close(self) -> None:
        pass
