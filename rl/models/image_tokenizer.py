"""What every image tokenizer here shares: the code grid, and the checks on images and codes coming in
(rl/models/vq.py, rl/models/magvit2.py). Subclasses set `config` (with image_size and downsample) and
`codebook_size`, and give the device and dtype of their weights through `_weight()`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn


class ImageTokenizer(nn.Module):
    @property
    def grid(self) -> int:
        return self.config.image_size // self.config.downsample

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    def to_input(self, images) -> torch.Tensor:
        """uint8 [B, H, W, 3] (numpy or torch) -> [B, 3, H, W] in [-1, 1], on the weights' device and dtype."""
        x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        size = self.config.image_size
        if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (size, size, 3):
            raise ValueError(
                f"image tokenizer: expected uint8 images [B, {size}, {size}, 3], got {x.dtype} {tuple(x.shape)}")
        w = self._weight()
        return (x.to(w.device).permute(0, 3, 1, 2).float() / 127.5 - 1).to(w.dtype)

    def checked_codes(self, codes) -> torch.Tensor:
        """Codes [B, tokens_per_image] as a long tensor on the weights' device; an error for any other shape
        or a code outside the codebook."""
        codes = torch.as_tensor(codes, dtype=torch.long, device=self._weight().device)
        if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
            raise ValueError(f"image tokenizer: expected codes [B, {self.tokens_per_image}], got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"image tokenizer: codes must lie in [0, {self.codebook_size}), got "
                             f"[{codes.min().item()}, {codes.max().item()}]")
        return codes


def read_config(path: Path) -> tuple[Path, object]:
    """(path/config.json, its parsed JSON) of an image tokenizer directory; errors name the file."""
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"image tokenizer directory {str(path)!r} is missing config.json")
    try:
        return config, json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config}: not valid JSON ({e})") from None
