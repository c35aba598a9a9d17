"""A tiny SigLIP vision tower for the tiny LLaDA-V, pre-trained the way SigLIP is: image-caption pairs
under the pairwise sigmoid loss (Zhai et al. 2023), here on rendered scenes (rl/data/shapes.py).

LLaDA-V starts from a pre-trained SigLIP; so does its tiny counterpart. The text side exists only for
this pre-training (captions as word ids: every caption word is one entry) and is thrown away; the
vision side becomes the policy's `vision_tower`. Used by recipes/build_tiny_llada_v.py.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig

from rl.data import shapes

WORDS = ["<pad>", *sorted({*shapes.COLORS, *shapes.BACKGROUNDS, *shapes.SHAPES, "a", "and", "on", "background"})]
CAPTION_LEN = 16  # the longest caption (3 shapes) is 14 words and commas
# 32 px scenes in 4x4 patches: 64 image tokens, as many as the tiny VQ's 8x8 codes (tiny-mmada).
VISION = dict(image_size=shapes.IMAGE_SIZE, patch_size=4, hidden_size=64, intermediate_size=128,
              num_hidden_layers=3, num_attention_heads=4)


def caption_ids(text: str) -> list[int]:
    words = text.replace(",", " ,").split()
    ids = [WORDS.index(w) if w in WORDS else WORDS.index("a") for w in words if w != ","][:CAPTION_LEN]
    # SigLIP pools the last position and is trained on max_length padding: pad after the words.
    return ids + [0] * (CAPTION_LEN - len(ids))


def to_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> SigLIP's input: [B, 3, H, W] rescaled to [0, 1], mean 0.5, std 0.5."""
    return (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5


def pretrain(steps: int, seed: int, batch: int = 64, lr: float = 2e-3, log=print) -> SiglipVisionConfig:
    """Pre-train a tiny SiglipModel; returns (vision config, vision state dict, held-out top-1 of 10)."""
    torch.manual_seed(seed)
    text = dict(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=CAPTION_LEN, pad_token_id=0, bos_token_id=0,
                eos_token_id=0)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=VISION))
    # SigLIP starts its bias at -10 for batches of 32k (so the many negatives start near their target);
    # with 64 pairs that holds the positives down for thousands of steps. -log(batch) balances them.
    with torch.no_grad():
        model.logit_bias.fill_(-float(np.log(batch)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    model.train()
    for step in range(1, steps + 1):
        scenes = [shapes.make_scene(rng) for _ in range(batch)]
        pixels = np.stack([shapes.render(s) for s in scenes])
        ids = torch.tensor([caption_ids(shapes.caption(s)) for s in scenes])
        loss = model(input_ids=ids, pixel_values=to_input(pixels), return_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % 100 == 0:
            log(f"siglip step {step} loss {loss.item():.4f}")
    model.eval()
    top1 = held_out_top1(model, seed + 1_000_003)
    log(f"siglip held-out caption top-1 of 10: {top1:.3f}")
    return model.vision_model, model.config.vision_config, top1


@torch.no_grad()
def held_out_top1(model: SiglipModel, seed: int, n: int = 500) -> float:
    """Each held-out scene's caption against the captions of 9 other held-out scenes."""
    rng = random.Random(seed)
    scenes = [shapes.make_scene(rng) for _ in range(n)]
    img = model.get_image_features(pixel_values=to_input(np.stack([shapes.render(s) for s in scenes])))
    txt = model.get_text_features(input_ids=torch.tensor([caption_ids(shapes.caption(s)) for s in scenes]))
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    sim = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    hits = 0
    for i in range(n):
        others = [j for j in rng.sample(range(n), 10) if j != i][:9]
        hits += int(sim[i, i] > sim[i, others].max())
    return hits / n
