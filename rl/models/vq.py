"""Image tokenizer: pixels <-> a grid of discrete codes, the image vocabulary of a unified model.

The interface every image tokenizer here offers (MMaDA uses MAGVIT-v2 behind the same idea):

    tok.codebook_size      number of codes (the model's image vocabulary rows)
    tok.tokens_per_image   codes per image (row-major grid)
    tok.encode(images)     uint8 [B, H, W, 3] (numpy or torch) -> long [B, tokens_per_image]
    tok.decode(codes)      long [B, tokens_per_image] -> uint8 [B, H, W, 3] torch tensor

`load_image_tokenizer` picks the class by the directory's config.json: this project's `{"type": "vq"}` is a
`VQImageTokenizer`; the published MAGVIT-v2 one (`{"_class_name": "MAGVITv2", ...}`, Hugging Face showlab/magvitv2,
the 8,192-code tokenizer MMaDA-8B uses) is a `MAGVITv2Tokenizer` (rl/models/magvit2.py).

`VQImageTokenizer` is a small convolutional VQ-VAE (van den Oord et al. 2017): a strided encoder,
nearest-codebook quantisation with a straight-through gradient, a transposed-conv decoder. The
shipped one (recipes/build_tiny_vq.py) turns 32x32 synthetic scenes into 8x8 = 64 codes.
Everything stays in memory: decoding for rewards never writes an image file.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .image_tokenizer import ImageTokenizer, read_config
from .magvit2 import MAGVITv2Tokenizer, is_magvit2_config

TINY_VQ = Path(__file__).resolve().parents[2] / "recipes" / "assets" / "tiny-vq"


@dataclass
class VQConfig:
    image_size: int = 32
    downsample: int = 4  # a power of two: one stride-2 conv per halving
    hidden: int = 64
    embed_dim: int = 16
    codebook_size: int = 128
    beta: float = 0.25  # commitment weight

    def __post_init__(self):
        d = self.downsample
        if d < 2 or d & (d - 1) or self.image_size % d:
            raise ValueError(
                f"VQConfig.downsample={d}: expected a power of two >= 2 dividing image_size={self.image_size}")
        if self.codebook_size < 2:
            raise ValueError(f"VQConfig.codebook_size={self.codebook_size}: expected at least 2 codes")


def _encoder(hidden: int, out: int, halvings: int) -> nn.Sequential:
    # Strided convs from the first layer: no full-resolution hidden maps, which cost most of the time.
    layers: list[nn.Module] = []
    for i in range(halvings):
        layers += [nn.Conv2d(3 if i == 0 else hidden, hidden, 4, stride=2, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, out, 1))


def _decoder(inp: int, hidden: int, halvings: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(inp, hidden, 3, padding=1), nn.ReLU()]
    for i in range(halvings):
        last = i == halvings - 1
        layers += [nn.ConvTranspose2d(hidden, 3 if last else hidden, 4, stride=2, padding=1)]
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VQImageTokenizer(ImageTokenizer):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        halvings = config.downsample.bit_length() - 1
        self.encoder = _encoder(config.hidden, config.embed_dim, halvings)
        self.decoder = _decoder(config.embed_dim, config.hidden, halvings)
        self.codebook = nn.Embedding(config.codebook_size, config.embed_dim)
        nn.init.uniform_(self.codebook.weight, -1 / config.codebook_size, 1 / config.codebook_size)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def _weight(self) -> torch.Tensor:
        return self.codebook.weight

    # ---- pixels <-> latents ----------------------------------------------------------------------
    @staticmethod
    def to_pixels(x: torch.Tensor) -> torch.Tensor:
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, D, h, w] latents -> (codes [B, h*w], quantised latents [B, D, h, w])."""
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)
        book = self.codebook.weight
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.T + book.pow(2).sum(1)[None]
        codes = dist.argmin(1)
        return codes.view(B, h * w), self.lookup(codes.view(B, h * w))

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        B = codes.shape[0]
        return self.codebook(codes).view(B, self.grid, self.grid, -1).permute(0, 3, 1, 2)

    # ---- the interface -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        return self.quantize(self.encoder(self.to_input(images)))[0].cpu()

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        return self.to_pixels(self.decoder(self.lookup(self.checked_codes(codes))))

    # ---- training ----------------------------------------------------------------------------------
    def loss(self, images) -> tuple[torch.Tensor, dict]:
        x = self.to_input(images)
        z = self.encoder(x)
        codes, q = self.quantize(z)
        commit = F.mse_loss(z, q.detach())
        book = F.mse_loss(q, z.detach())
        recon = F.mse_loss(self.decoder(z + (q - z).detach()), x)  # straight-through estimator
        return recon + book + self.config.beta * commit, {"recon": recon.item(), "codes": codes, "latents": z}

    # ---- files ---------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"type": "vq", **asdict(self.config)}, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / "model.safetensors")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "VQImageTokenizer":
        path = Path(path)
        for name in ("config.json", "model.safetensors"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"image tokenizer directory {str(path)!r} is missing {name}")
        raw = json.loads((path / "config.json").read_text())
        kind = raw.pop("type", None)
        if kind != "vq":
            raise ValueError(f"{path / 'config.json'}: type={kind!r}, expected 'vq'")
        try:
            config = VQConfig(**raw)
        except TypeError as e:
            raise ValueError(f"{path / 'config.json'}: {e}") from None
        model = cls(config)
        model.load_state_dict(load_file(path / "model.safetensors"))
        return model.eval()


def load_image_tokenizer(path: str | Path | None = None) -> VQImageTokenizer | MAGVITv2Tokenizer:
    """The image tokenizer in `path` (None: the shipped tiny VQ), of the kind its config.json names."""
    path = Path(TINY_VQ if path is None else path)
    config, raw = read_config(path)
    if isinstance(raw, dict) and raw.get("type") == "vq":
        return VQImageTokenizer.from_pretrained(path)
    if is_magvit2_config(raw):
        return MAGVITv2Tokenizer.from_pretrained(path)
    got = {k: raw.get(k) for k in ("type", "_class_name")} if isinstance(raw, dict) else type(raw).__name__
    raise ValueError(f"{config}: not an image tokenizer config: expected type='vq' (this project's VQ) or "
                     f"_class_name='MAGVITv2' (MAGVIT-v2, showlab/magvitv2), got {got}")
