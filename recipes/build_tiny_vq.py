"""Train the shipped tiny image tokenizer (rl/models/vq.py) on synthetic scenes.

    python -m recipes.build_tiny_vq [--out DIR]

Data: freshly rendered scenes from rl/data/shapes.py (fixed seed), so nothing is downloaded. Codes
that go unused for a while are restarted on random encoder outputs of the current batch, the
usual fix for VQ codebook collapse. Reports held-out reconstruction error and codebook usage in
build_info.json.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from rl.data.shapes import images_of, t2i_row
from rl.models.vq import TINY_VQ, VQConfig, VQImageTokenizer


def scenes(rng: random.Random, n: int) -> np.ndarray:
    return images_of([t2i_row(rng) for _ in range(n)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=TINY_VQ)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--codebook-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng, held_out = random.Random(args.seed), scenes(random.Random(args.seed + 1_000_003), 512)
    model = VQImageTokenizer(VQConfig(codebook_size=args.codebook_size))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    last_used = torch.zeros(args.codebook_size, dtype=torch.long)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        loss, info = model.loss(scenes(rng, args.batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(), sched.step()
        last_used[info["codes"].unique()] = step
        dead = (step - last_used > 50).nonzero().squeeze(1)
        if len(dead) and step < args.steps * 0.8:
            with torch.no_grad():
                z = info["latents"].permute(0, 2, 3, 1).reshape(-1, model.config.embed_dim)
                model.codebook.weight[dead] = z[torch.randint(len(z), (len(dead),))]
            last_used[dead] = step
        if step % 250 == 0:
            print(f"step {step} recon {info['recon']:.5f} dead {len(dead)} {time.time() - t0:.0f}s", flush=True)
    model.eval()
    codes = model.encode(held_out)
    recon = model.decode(codes)
    err = (recon.float() - torch.as_tensor(held_out).float()).abs().mean().item()
    exact = (recon.float() - torch.as_tensor(held_out).float()).abs().amax(-1).le(32).float().mean().item()
    model.save_pretrained(args.out)
    info = {"recipe": "python -m recipes.build_tiny_vq", "seed": args.seed, "steps": args.steps, "lr": args.lr,
            "batch": args.batch, "config": asdict(model.config), "train_seconds": round(time.time() - t0),
            "params": sum(p.numel() for p in model.parameters()),
            "held_out": {"images": len(held_out), "mean_abs_pixel_error": round(err, 3),
                         "pixels_within_32": round(exact, 4),
                         "codes_used": int(codes.unique().numel())}}
    (args.out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info["held_out"]))


if __name__ == "__main__":
    main()
