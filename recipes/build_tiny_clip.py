"""Train the shipped tiny CLIP (a `transformers.CLIPModel`) contrastively on synthetic scenes.

Rebuild recipes/assets/tiny-clip/ (about 2 minutes on two CPU threads, no download):

    python -m recipes.build_tiny_clip [--out DIR] [--seed 0] [--steps 800]

Pairs: freshly rendered scenes from rl/data/shapes.py and their captions (a fixed seed, a new batch
every step), with the symmetric InfoNCE loss and CLIP's learned temperature. The tokenizer is a real
CLIPTokenizer whose vocabulary and merges are built here from the characters and words of the
captions, so every caption word splits into known tokens (never the unknown token). The image
processor is CLIPImageProcessor at 32 px, and training feeds images through the same processor that
scoring (rewards/clip.py) uses. The output directory loads with CLIPModel/CLIPProcessor.from_pretrained.
build_info.json records the held-out top-1-of-10 caption accuracy (scenes from another seed stream:
for each image, its caption against 9 captions of other held-out scenes) and the mean CLIP score of
matching and mismatched pairs. Training is deterministic for a given seed and thread count.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rewards.clip import TINY_CLIP, ClipScorer
from rl.data import shapes

WORDS = sorted({*shapes.COLORS, *shapes.BACKGROUNDS, *shapes.SHAPES, "a", "and", "on", "background"})
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
TEXT_POSITIONS = 32  # the longest caption (3 shapes) is 18 tokens with its start and end tokens
HELD_OUT_SEED_OFFSET = 1_000_003


def clip_tokenizer():
    """CLIP's BPE convention: lower-case words end in '</w>'. Each word contributes the merges that build it
    left to right from its characters; as BPE applies merges by rank across all words, a word may stay a
    few pieces ("triangle" -> tri an g l e</w>), all of them in the vocabulary."""
    from transformers import CLIPTokenizer

    chars = sorted({c for w in WORDS for c in w} | set(",.?"))
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)])}
    merges = []
    for w in WORDS:
        if len(w) < 2:
            continue
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if (left, right) not in merges:
                merges.append((left, right))
            vocab.setdefault(merged, len(vocab))
            left = merged
    # model_max_length lets the saved processor truncate on its own, as a hub CLIP's does.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_POSITIONS)


def build_processor():
    from transformers import CLIPImageProcessor, CLIPProcessor

    size = shapes.IMAGE_SIZE
    image = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                               image_mean=MEAN, image_std=STD, do_convert_rgb=False)
    return CLIPProcessor(image_processor=image, tokenizer=clip_tokenizer())


def build_model(vocab_size: int, projection_dim: int = 64):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=TEXT_POSITIONS, eos_token_id=1, bos_token_id=0,
                pad_token_id=1)
    vision = dict(image_size=shapes.IMAGE_SIZE, patch_size=4, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))


def top1_of_10(scorer: ClipScorer, rows: list[dict], seed: int) -> dict:
    images, captions = shapes.images_of(rows), [r["prompt"] for r in rows]
    img, txt = scorer.embed(images, captions)
    sim = img @ txt.T
    rng, hits = random.Random(seed), 0
    for i in range(len(rows)):
        others = rng.sample([j for j in range(len(rows)) if captions[j] != captions[i]], 9)
        hits += int(sim[i, i] > sim[i, others].max())
    differ = torch.tensor([[a != b for b in captions] for a in captions])
    return {"top1_of_10": hits / len(rows), "n": len(rows),
            "clip_score_matching": round(100 * sim.diag().mean().item(), 2),
            "clip_score_mismatched": round(100 * sim[differ].mean().item(), 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=TINY_CLIP)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    processor = build_processor()
    model = build_model(len(processor.tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)
    rng, t0 = random.Random(args.seed), time.time()
    model.train()
    for step in range(1, args.steps + 1):
        rows = [shapes.t2i_row(rng) for _ in range(args.batch)]
        inputs = processor(text=[r["prompt"] for r in rows], images=list(shapes.images_of(rows)), return_tensors="pt",
                           padding=True)
        out = model(**inputs)
        labels = torch.arange(len(rows))
        # Identical captions in a batch are both right: average the targets over duplicates.
        same = torch.tensor([[a["prompt"] == b["prompt"] for b in rows] for a in rows], dtype=torch.float)
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(out.logits_per_image, target) + F.cross_entropy(out.logits_per_text, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            acc = (out.logits_per_image.argmax(1) == labels).float().mean().item()
            print(f"step {step} loss {loss.item():.4f} batch-acc {acc:.3f} {time.time() - t0:.0f}s", flush=True)
    train_seconds = round(time.time() - t0)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    held_out_rng = random.Random(args.seed + HELD_OUT_SEED_OFFSET)
    held_out = [shapes.t2i_row(held_out_rng) for _ in range(1000)]
    result = top1_of_10(ClipScorer(args.out), held_out, args.seed)
    command = "python -m recipes.build_tiny_clip " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k != "out" and v != ap.get_default(k))
    info = {"recipe": command.strip(), "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
            "threads": args.threads, "train_seconds": train_seconds,
            "params": sum(p.numel() for p in model.parameters()), "held_out": result}
    (args.out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
