"""MAGVIT-v2 image tokenizer of Show-o and MMaDA-8B, in plain torch, loading the published checkpoint.

The published tokenizer is the Hugging Face repo `showlab/magvitv2`: a `config.json` and the weights in
`pytorch_model.safetensors` (an earlier `pytorch_model.bin` was deleted from the repo). Its reference code is
Show-o's `models/modeling_magvitv2.py` (class `MAGVITv2`; MMaDA ships the same file), written with a
diffusers-style `ModelMixin`/`ConfigMixin`. Its constructor takes no arguments, so the published config.json
holds only that mixin's metadata (`_class_name`, `_diffusers_version`); every size is fixed in code:

    encoder   conv_in 3->128, 5 levels ch_mult (1, 2, 2, 4, 4) with (4, 3, 4, 3, 4) ResNet blocks, a stride-2
              downsample after each level but the last (16x), mid block (ResNet, attention, ResNet),
              GroupNorm + swish, conv_out 512->13, quant_conv 13->13 (1x1)
    quantize  lookup-free (LFQ): each of the 13 latent channels is one bit, so 2**13 = 8,192 codes
    decoder   post_quant_conv 13->13 (1x1), conv_in 13->512, mid block, 5 levels ch_mult (1, 1, 2, 2, 4)
              with (4, 4, 3, 4, 3) blocks and nearest x2 upsampling + conv, GroupNorm + swish, conv_out ->3

The convolutions do not depend on the image size: MMaDA feeds 512x512 images, giving a 32x32 = 1,024 code grid
(row-major). The attention in the down/up levels that the reference code allows is never built (its
attn_resolutions=[5] matches no level), so only the two mid blocks attend.

Conventions, as in the reference code and in how MMaDA calls it (`vq_model.get_code`, `vq_model.decode_code`):
  * pixels in: uint8 -> [-1, 1] (torchvision ToTensor then Normalize(0.5, 0.5)); resizing is the caller's job.
  * LFQ: a latent channel > 0 is bit 1, else bit 0 (exactly 0 is 0). Channel 0 is the most significant bit:
    code = sum_c bit_c * 2**(C-1-c). Decoding looks code k up in a table whose row is k's bits mapped
    1 -> +1.0, 0 -> -1.0 (no scale), and feeds that grid to the decoder.
  * pixels out: clamp((x + 1) / 2, 0, 1) * 255, truncated to uint8, as MMaDA's inference_t2i.py does.

Parameter and buffer names reproduce the published state dict, so `load_state_dict(strict=True)` holds.
Sizes other than the published ones (used by the tests for a small random model) are extra config.json keys that
`save_pretrained` writes only when they differ from the published values, so the real model saves exactly the
published two-key config.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .image_tokenizer import ImageTokenizer, read_config

CLASS_NAMES = ("MAGVITv2", "MAGViTv2")  # Show-o's class, and its older spelling that uploaded the repo
WEIGHTS_NAME = "pytorch_model.safetensors"  # what showlab/magvitv2 ships (Show-o's ModelMixin file name)
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"  # the same weights pickled, as the repo first had them
# The mixin records the diffusers version next to the class name; Show-o pins diffusers==0.30.1. The published
# config.json is 66 bytes, exactly these two keys as diffusers formats them (its text itself was not readable here,
# and the repo was uploaded as "MAGViTv2", so either spelling is accepted on load).
DIFFUSERS_VERSION = "0.30.1"
# The LFQ tables are fixed by the bit convention, not learned: a checkpoint may carry them or not.
DERIVED_BUFFERS = ("quantize.embedding", "quantize.power_vals")


def is_magvit2_config(raw) -> bool:
    """Whether a parsed config.json is the published MAGVIT-v2 one (by its `_class_name`)."""
    return isinstance(raw, dict) and raw.get("_class_name") in CLASS_NAMES


@dataclass
class MAGVITv2Config:
    # Defaults are the published model's (fixed in Show-o's code, absent from its config.json).
    ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    encoder_num_res_blocks: tuple[int, ...] = (4, 3, 4, 3, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_num_res_blocks: tuple[int, ...] = (4, 4, 3, 4, 3)
    z_channels: int = 13  # latent channels = LFQ bits: codebook_size = 2 ** z_channels
    image_size: int = 512  # MMaDA's resolution (the model itself is fully convolutional)

    def __post_init__(self):
        for f in ("encoder_ch_mult", "encoder_num_res_blocks", "decoder_ch_mult", "decoder_num_res_blocks"):
            setattr(self, f, tuple(int(v) for v in getattr(self, f)))
        levels = len(self.encoder_ch_mult)
        if not (levels == len(self.encoder_num_res_blocks) == len(self.decoder_ch_mult)
                == len(self.decoder_num_res_blocks)) or levels < 1:
            raise ValueError("MAGVITv2Config: encoder/decoder ch_mult and num_res_blocks need one entry per level, "
                             f"the same number of levels on both sides; got {self}")
        if min(self.encoder_num_res_blocks + self.decoder_num_res_blocks) < 1:
            raise ValueError(f"MAGVITv2Config: every level needs at least one ResNet block; got {self}")
        # GroupNorm with 32 groups (as published) needs channel counts divisible by 32.
        widths = [self.ch * m for m in (1,) + self.encoder_ch_mult + self.decoder_ch_mult]
        if min(widths) < 32 or any(w % 32 for w in widths):
            raise ValueError(f"MAGVITv2Config: ch * ch_mult must be positive multiples of 32 (GroupNorm(32)); "
                             f"got widths {sorted(set(widths))}")
        if not 1 <= self.z_channels <= 24:
            raise ValueError(f"MAGVITv2Config.z_channels={self.z_channels}: expected 1..24 LFQ bits")
        if self.image_size < 1 or self.image_size % self.downsample:
            raise ValueError(f"MAGVITv2Config.image_size={self.image_size}: expected a positive multiple of the "
                             f"downsampling factor {self.downsample}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    # ---- config.json -------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The published keys, plus any size that differs from the published model (only for other models)."""
        out = {"_class_name": CLASS_NAMES[0], "_diffusers_version": DIFFUSERS_VERSION}
        default = MAGVITv2Config()
        for f in fields(self):
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, raw, where: str | Path = "config.json") -> "MAGVITv2Config":
        if not is_magvit2_config(raw):
            got = raw.get("_class_name") if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"{where}: _class_name={got!r}, expected one of {list(CLASS_NAMES)} (showlab/magvitv2)")
        # Underscored keys are the mixin's metadata (_class_name, _diffusers_version, _name_or_path).
        sizes = {k: v for k, v in raw.items() if not k.startswith("_")}
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(sizes) - known):
            raise ValueError(f"{where}: unknown MAGVIT-v2 config keys {unknown}; known: {sorted(known)}")
        try:
            return cls(**sizes)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


# ---- building blocks (names follow the published state dict) ---------------------------------------------
def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice plus a skip; a 1x1 `nin_shortcut` when the width changes (no time embedding)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all grid positions, with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, 1, HW, C]: one head whose width is all channels (softmax(q k^T / sqrt(C)) v).
        q, k, v = (p(h).reshape(B, 1, C, H * W).transpose(2, 3) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pad right and bottom only (torch convs pad symmetrically), as the reference does.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution: `block` (ResNet blocks), then `downsample` or `upsample` if given."""

    def __init__(self, blocks: list[nn.Module], resample: tuple[str, nn.Module] | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = None if resample is None else resample[0]
        if resample is not None:
            self.add_module(*resample)  # registered under its published name: downsample / upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.resample_name is None else getattr(self, self.resample_name)(x)


class Encoder(nn.Module):
    def __init__(self, c: MAGVITv2Config):
        super().__init__()
        self.conv_in = nn.Conv2d(3, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        width = c.ch
        last = len(c.encoder_ch_mult) - 1
        for level, (mult, n) in enumerate(zip(c.encoder_ch_mult, c.encoder_num_res_blocks)):
            blocks = [ResnetBlock(width if i == 0 else c.ch * mult, c.ch * mult) for i in range(n)]
            width = c.ch * mult
            self.down.append(_Level(blocks, None if level == last else ("downsample", Downsample(width))))
        self.mid = _Mid(width)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, c.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.conv_out(F.silu(self.norm_out(self.mid(x))))
        return self.quant_conv(x)


class Decoder(nn.Module):
    def __init__(self, c: MAGVITv2Config):
        super().__init__()
        width = c.ch * c.decoder_ch_mult[-1]
        self.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)
        self.conv_in = nn.Conv2d(c.z_channels, width, 3, padding=1)
        self.mid = _Mid(width)
        # Built from the coarsest level down, stored by level index (up.0 is the finest), as published.
        levels: list[_Level] = []
        for level in reversed(range(len(c.decoder_ch_mult))):
            out = c.ch * c.decoder_ch_mult[level]
            n = c.decoder_num_res_blocks[level]
            blocks = [ResnetBlock(width if i == 0 else out, out) for i in range(n)]
            width = out
            levels.insert(0, _Level(blocks, None if level == 0 else ("upsample", Upsample(width))))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class LFQuantizer(nn.Module):
    """Lookup-free quantizer: the sign of each latent channel is one bit of the code (channel 0 = MSB)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        power_vals = 2 ** torch.arange(bits - 1, -1, -1, dtype=torch.long)  # [2**(C-1), ..., 2, 1]
        codes = torch.arange(2**bits, dtype=torch.long)
        embedding = ((codes[:, None] // power_vals) % 2).float() * 2 - 1  # row k: k's bits, 1 -> +1, 0 -> -1
        # Persistent buffers: the published state dict has these names (Show-o registers them the same way).
        self.register_buffer("embedding", embedding)
        self.register_buffer("power_vals", power_vals)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> codes [B, h*w] (row-major)."""
        bits = (z > 0).long()
        return (bits * self.power_vals.view(1, -1, 1, 1)).sum(1).flatten(1)

    def latents(self, codes: torch.Tensor, grid: int) -> torch.Tensor:
        """Codes [B, grid*grid] -> the decoder's input [B, C, grid, grid] of +-1."""
        return self.embedding[codes].view(codes.shape[0], grid, grid, self.bits).permute(0, 3, 1, 2)


class MAGVITv2Tokenizer(ImageTokenizer):
    def __init__(self, config: MAGVITv2Config | None = None):
        super().__init__()
        self.config = config if config is not None else MAGVITv2Config()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quantize = LFQuantizer(self.config.z_channels)

    @property
    def codebook_size(self) -> int:
        return 2**self.config.z_channels

    def _weight(self) -> torch.Tensor:
        return self.encoder.conv_in.weight  # its device and dtype are the model's

    # ---- pixels <-> network ------------------------------------------------------------------------------
    @staticmethod
    def to_pixels(x: torch.Tensor) -> torch.Tensor:
        # MMaDA: clamp((x + 1) / 2, 0, 1) * 255, then a truncating cast to uint8.
        return (((x.float() + 1) / 2).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()

    # ---- the interface -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        return self.quantize.codes(self.encoder(self.to_input(images))).cpu()

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        z = self.quantize.latents(self.checked_codes(codes), self.grid).to(self._weight().dtype)
        return self.to_pixels(self.decoder(z))

    # ---- files -------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """config.json and pytorch_model.safetensors, laid out as showlab/magvitv2 is."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # diffusers' ConfigMixin writes sorted keys with a 2-space indent and a final newline.
        (path / "config.json").write_text(json.dumps(self.config.to_json(), indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, path / WEIGHTS_NAME, metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "MAGVITv2Tokenizer":
        """The tokenizer in a showlab/magvitv2-style directory, on the CPU in float32, in eval mode."""
        path = Path(path)
        config_file, raw = read_config(path)
        config = MAGVITv2Config.from_json(raw, config_file)
        weights = next((path / n for n in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME) if (path / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"image tokenizer directory {str(path)!r} is missing {WEIGHTS_NAME} "
                                    f"(or {LEGACY_WEIGHTS_NAME})")
        state = _read_weights(weights)
        model = cls(config)  # weights are checked against it before any copy
        model.load_state_dict(_checked_state(model, state, weights), strict=True)
        return model.eval()


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            state = load_file(file)
        else:  # tensors only: a pickled checkpoint must not run code
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or corrupt file: say which, whatever the reader raised
        raise ValueError(f"{file}: cannot read the weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: expected a flat state dict of tensors, got {type(state).__name__}")
    return state


def _few(names: list[str], n: int = 8) -> str:
    return "[" + ", ".join(names[:n]) + (f", ... {len(names) - n} more" if len(names) > n else "") + "]"


def _checked_state(model: MAGVITv2Tokenizer, state: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """`state` completed with the LFQ tables, after checking names, shapes and the bit convention."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - set(DERIVED_BUFFERS))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{file}: state dict does not match MAGVIT-v2 ({model.config}): "
                         f"{len(missing)} missing keys {_few(missing)}, {len(unexpected)} unexpected keys "
                         f"{_few(unexpected)}")
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{file}: {len(wrong)} tensors have the wrong shape for MAGVIT-v2 ({model.config}): "
                         f"{_few(wrong)}")
    for name in DERIVED_BUFFERS:
        if name in state and not torch.equal(state[name].to(expected[name].dtype), expected[name]):
            raise ValueError(f"{file}: {name} differs from the LFQ convention (channel 0 = most significant bit, "
                             "bit 1 -> +1, bit 0 -> -1)")
    return {**{k: expected[k] for k in DERIVED_BUFFERS}, **state}
