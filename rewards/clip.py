"""CLIP alignment reward: how well a generated image matches its caption (CLIPScore, Hessel et al. 2021).

`ClipScorer` loads `transformers.CLIPModel` and `CLIPProcessor` from a local directory (the shipped
tiny CLIP, recipes/build_tiny_clip.py, or e.g. a downloaded openai/clip-vit-large-patch14) and scores
in-memory uint8 images against texts: 100 x cosine of the image and text embeddings, in batches.
`ClipReward` is the built-in reward `clip`: it scores column `images` (decoded by the reward worker;
None = no image, scored None: does not apply) against the prompt, which for text-to-image is the caption.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rewards._common import check_batch

if TYPE_CHECKING:
    import torch

# torch is imported only when a CLIP model is built: `import rewards` happens in every math-verify
# worker process (rewards.sandbox), where torch would add seconds to each start and restart.

TINY_CLIP = Path(__file__).resolve().parents[1] / "recipes" / "assets" / "tiny-clip"


def check_clip_dir(path: str | Path) -> Path:
    """The directory, or a FileNotFoundError naming it and every file kind it lacks (checked up front so
    that from_pretrained never falls back to treating the path as a hub id)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"CLIP directory {str(path)!r} does not exist")
    has = lambda *patterns: any(any(path.glob(p)) for p in patterns)  # noqa: E731
    missing = [name for name, ok in (
        ("config.json", has("config.json")),
        ("model weights (*.safetensors or pytorch_model*.bin)", has("*.safetensors", "pytorch_model*.bin")),
        ("preprocessor_config.json or processor_config.json", has("preprocessor_config.json", "processor_config.json")),
        ("tokenizer files (tokenizer.json, or vocab.json + merges.txt)",
         has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))),
    ) if not ok]
    if missing:
        raise FileNotFoundError(f"CLIP directory {str(path)!r} is missing: {', '.join(missing)}")
    return path


def _pixels(image: Any, index: int) -> np.ndarray:
    torch = sys.modules.get("torch")  # an image can only be a tensor if torch is loaded
    if torch is not None and isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    # A float or channels-first array would be silently misread by the processor (rescaled by 1/255
    # or taken as a 3-pixel-high image), so only the decoder's own layout is accepted.
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"CLIP score: image {index} is {image.dtype} {list(image.shape)}; expected uint8 [H, W, 3]")
    return image


class ClipScorer:
    """`scorer(images, texts) -> list[float]`: 100 x cosine(image i, text i), not clamped.

    `path`: a local directory holding CLIPModel and CLIPProcessor files (None = the shipped tiny CLIP);
    nothing is downloaded. Images are uint8 [H, W, 3] numpy arrays or tensors, resized by the processor;
    texts longer than the model's text positions are truncated.
    """

    def __init__(self, path: str | Path | None = None, device: str = "cpu", batch_size: int = 64):
        from transformers import CLIPModel, CLIPProcessor

        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"ClipScorer: batch_size must be a positive int, got {batch_size!r}")
        self.path = check_clip_dir(TINY_CLIP if path is None else path)
        self.model = CLIPModel.from_pretrained(self.path, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(self.path, local_files_only=True)
        self.device, self.batch_size = device, batch_size
        self.max_length = self.model.config.text_config.max_position_embeddings

    def embed(self, images: Sequence[Any], texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm float32 image and text embeddings, on CPU (one processor call: batch it yourself)."""
        import torch

        with torch.no_grad():
            return self._embed(images, texts)

    def _embed(self, images: Sequence[Any], texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        inputs = self.processor(text=list(texts), images=[_pixels(im, i) for i, im in enumerate(images)],
                                return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        # transformers 5 may return a model output whose pooler_output is the projected embedding.
        img = img.pooler_output if hasattr(img, "pooler_output") else img
        txt = txt.pooler_output if hasattr(txt, "pooler_output") else txt
        normalize = torch.nn.functional.normalize
        return normalize(img.float(), dim=-1).cpu(), normalize(txt.float(), dim=-1).cpu()

    def __call__(self, images: Sequence[Any], texts: Sequence[str]) -> list[float]:
        if len(images) != len(texts):
            raise ValueError(f"CLIP score: {len(images)} images for {len(texts)} texts (expected one each)")
        # Checked before the first batch, so a bad entry fails fast and is named by its own index.
        images = [_pixels(im, i) for i, im in enumerate(images)]
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"CLIP score: text {i} is {type(t).__name__}, expected a caption string")
        out: list[float] = []
        for lo in range(0, len(images), self.batch_size):
            img, txt = self.embed(images[lo:lo + self.batch_size], texts[lo:lo + self.batch_size])
            out += (100 * (img * txt).sum(-1)).tolist()
        return out


class ClipReward:
    """Reward `clip`: `scale` x CLIP score of `images[i]` against `prompts[i]` (MMaDA weights it 0.1).

    Call: `reward(prompts, completions, **columns) -> list[float]`. Column `images` holds one uint8
    [H, W, 3] array per sample, or None where the sample has no image (scored None: does not apply).
    Completions are not read (an image sample's completion is empty text). `path` None = the shipped
    tiny CLIP; the model is loaded here, so a wrong path fails when the reward is built.
    """

    name = "clip"

    def __init__(self, path: str | None = None, device: str = "cpu", batch_size: int = 64, scale: float = 1.0):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"ClipReward: scale must be a finite number, got {scale!r}")
        self.scale = float(scale)
        self.scorer = ClipScorer(path, device, batch_size)

    def __call__(self, prompts: Sequence[Any] | None, completions: Sequence[str],
                 **columns: Sequence[Any]) -> list[float | None]:
        n = check_batch(self.name, prompts, completions, columns)
        if "images" not in columns:
            raise ValueError(
                f"reward 'clip' needs column 'images' (the decoded images); the batch has columns {sorted(columns)}")
        images = columns["images"]
        idx = [i for i, im in enumerate(images) if im is not None]
        for i in idx:
            _pixels(images[i], i)  # so that an error names the sample, not its place among the images
            if prompts is None or not isinstance(prompts[i], str):
                got = "prompts is None" if prompts is None else f"prompts[{i}] is {type(prompts[i]).__name__}"
                raise ValueError(f"reward 'clip' scores images[{i}] against its prompt (the caption), but {got}")
        scores: list[float | None] = [None] * n
        if idx:
            for i, s in zip(idx, self.scorer([images[i] for i in idx], [prompts[i] for i in idx])):
                scores[i] = self.scale * s
        return scores

    def close(self) -> None:
        pass
