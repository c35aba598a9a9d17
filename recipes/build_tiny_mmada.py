"""Extend the shipped tiny LLaDA with image codes (MMaDA's unified tokens) and train it on three tasks.

    python -m recipes.build_tiny_mmada [--out DIR]

Starting point: recipes/assets/tiny-llada and the tiny VQ (recipes/assets/tiny-vq). The tokenizer
gains LLaDA's reserved tokens <|reserved_token_0..10|> (special tokens, as in LLaDA-8B's tokenizer),
which are MMaDA's markers (<|soi|> = reserved 0, <|eoi|> 1, <|t2i|> 4, <|mmu|> 5, ...), and then the
scene words (rl/data/shapes.py WORDS: colours, shapes, backgrounds); the text tasks' tokens stay as
they were. The vocabulary gains one row per VQ code right after the tokenizer's tokens: code c is
token len(tokenizer) + c, as in MMaDA (LLaDAConfig.codebook_size; vocab_size = len(tokenizer) + 128).
Sequences are MMaDA's (rl/data/encode.py:encode_rows). Training mixes, with the masked-diffusion SFT
loss (rl/sft.py):

- text-to-image: caption -> the VQ codes of its scene (rl/data/shapes.py); the prompt is masked for
  10% of rows, so the model also learns the unconditional distribution classifier-free guidance needs;
- image-conditioned reasoning: scene codes + a counting question -> <think>shape list</think><answer>n</answer>,
  where a `--careless` share of answers is off by one after a correct list, so a correctness reward
  has something to fix (as the text model's build did);
- text: the arithmetic and Countdown tasks the base model was trained on (same careless scheme), so
  the text skill stays.

It trains for a fixed number of steps (a short run leaves room for RL) and reports held-out text-to-image
CLIP score (generated vs ground-truth codes), reasoning accuracy (and how often the whole shape list
is right) and arithmetic accuracy in build_info.json.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from recipes.build_tiny_llada import ANSWER_LENGTHS, careless, exact_answer
from rl.data import shapes
from rl.data.encode import encode_answers, encode_rows
from rl.data.loader import attach_image_codes
from rl.data.tasks import make_rows
from rl.models import TINY_CHECKPOINT, load_checkpoint
from rl.models.llada import LLaDAConfig, LLaDAModelLM
from rl.models.tokenizer import add_reserved_tokens, image_token_offset
from rl.models.vq import TINY_VQ, load_image_tokenizer
from rl.sft import sft_loss
from rollout.fast import FastSamplerConfig
from rollout.image import ImageSamplerConfig
from rollout.rollout import rollout

TINY_MM = TINY_CHECKPOINT.parent / "tiny-mmada"
MIX = {"t2i": 0.35, "shapes_qa": 0.45, "text": 0.2}
# 32 answer tokens: the longest shape list with its answer is 26 with the scene words as tokens.
QA_LENGTH = 32
EVAL_TEXT = FastSamplerConfig(gen_length=QA_LENGTH, block_length=16, steps=QA_LENGTH, temperature=0.9)
EVAL_IMAGE = ImageSamplerConfig(steps=8, temperature=1.0)


def extend(model: LLaDAModelLM, text_vocab: int, codebook_size: int, num_vq_tokens: int, seed: int) -> LLaDAModelLM:
    """The model with its vocabulary grown to text_vocab + codebook_size rows; new rows start at the mean
    embedding plus small noise, so they are neither favoured nor far from what the network has seen."""
    old = model.config.to_dict()
    for key in ("vocab_size", "embedding_size", "codebook_size", "num_vq_tokens", "architectures", "model_type",
                "transformers_version"):
        old.pop(key, None)
    vocab = text_vocab + codebook_size
    config = LLaDAConfig(**old, vocab_size=vocab, embedding_size=vocab, codebook_size=codebook_size,
                         num_vq_tokens=num_vq_tokens)
    new = LLaDAModelLM(config)
    state = model.state_dict()
    wte = state["model.transformer.wte.weight"]
    g = torch.Generator().manual_seed(seed)
    grown = wte.mean(0, keepdim=True) + 0.02 * torch.randn(vocab - wte.shape[0], wte.shape[1], generator=g)
    state["model.transformer.wte.weight"] = torch.cat([wte, grown])
    if "model.transformer.ff_out.weight" in state:
        head = state["model.transformer.ff_out.weight"]
        state["model.transformer.ff_out.weight"] = torch.cat([head, head.mean(0, keepdim=True).expand(len(grown), -1)])
    new.load_state_dict(state)
    return new


def off_by_one(row: dict, rng: random.Random) -> dict:
    n = int(row["answer"])
    wrong = n + 1 if n == 0 or rng.random() < 0.5 else n - 1
    head = row["solution"][: row["solution"].rindex("<answer>")]
    return {**row, "solution": f"{head}<answer>{wrong}</answer>"}


def list_correct(completions: list[str], rows: list[dict]) -> list[bool]:
    """Whether each answer's <think> shape list is exactly the scene's: how well the model reads the image,
    apart from counts it can get right with a wrong list (small numbers are easy to hit)."""
    def listing(text):
        lo, hi = text.find("<think>"), text.find("</think>")
        return text[lo + 7: hi].strip() if 0 <= lo < hi else None
    return [listing(c) == listing(r["solution"]) for c, r in zip(completions, rows)]


def batch_for(mode: str, rng: random.Random, text_rows, vq, tok, offset, tokens: int, careless_p: float, gen):
    if mode == "text":
        L = rng.choices(list(ANSWER_LENGTHS), list(ANSWER_LENGTHS.values()))[0]
        rows = rng.sample(text_rows[L], max(2, tokens // (L + 40)))
        ids, mask = encode_rows(tok, rows, offset)
        return ids, mask, encode_answers(tok, [r["solution"] for r in rows], L)
    n = max(2, tokens // (100 if mode == "t2i" else 110))
    rows = make_rows(mode, n, rng.randrange(2**31), "train")
    attach_image_codes(rows, vq, mode)
    ids, mask = encode_rows(tok, rows, offset)
    if mode == "t2i":
        drop = torch.rand(len(rows), 1, generator=gen) < 0.1
        ids = torch.where(drop & mask.bool(), torch.full_like(ids, tok.mask_token_id), ids)
        return ids, mask, torch.tensor([r["image_codes"] for r in rows]) + offset
    rows = [off_by_one(r, rng) if rng.random() < careless_p else r for r in rows]
    return ids, mask, encode_answers(tok, [r["solution"] for r in rows], QA_LENGTH)


@torch.no_grad()
def evaluate(model, tok, vq, clip_dir: Path | None, n: int, seed: int) -> dict:
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    qa = make_rows("shapes_qa", n, seed, "val")
    arith = make_rows("arithmetic", n, seed, "val")
    t2i = make_rows("t2i", n, seed, "val")
    for rows in (qa, t2i):
        attach_image_codes(rows, vq, "val")
    for name, rows in (("shapes_qa", qa), ("arithmetic", arith)):
        batch = rollout(model, tok, rows, 1, EVAL_TEXT, gen, micro_batch=64)
        out[f"{name}/accuracy"] = sum(exact_answer(batch.completions, rows)) / len(rows)
        if name == "shapes_qa":
            out["shapes_qa/list_accuracy"] = sum(list_correct(batch.completions, rows)) / len(rows)
    batch = rollout(model, tok, t2i, 1, EVAL_TEXT, gen, micro_batch=64, image_sampler=EVAL_IMAGE)
    if clip_dir is not None and (clip_dir / "config.json").is_file():
        from rewards.clip import ClipScorer
        scorer = ClipScorer(clip_dir)
        captions = [r["prompt"] for r in t2i]
        out["t2i/clip_score"] = sum(scorer(vq.decode(batch.images).numpy(), captions)) / n
        out["t2i/clip_score_reference"] = sum(scorer(vq.decode([r["image_codes"] for r in t2i]).numpy(), captions)) / n
    model.train(was)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=TINY_MM)
    ap.add_argument("--init", type=Path, default=TINY_CHECKPOINT)
    ap.add_argument("--vq", type=Path, default=TINY_VQ)
    ap.add_argument("--clip", type=Path, default=TINY_CHECKPOINT.parent / "tiny-clip", help="for the report only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-rows", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--tokens-per-batch", type=int, default=3072)
    ap.add_argument("--careless", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng, gen = random.Random(args.seed), torch.Generator().manual_seed(args.seed)

    base, tok = load_checkpoint(args.init)
    vq = load_image_tokenizer(args.vq)
    add_reserved_tokens(tok)
    tok.add_tokens(list(shapes.WORDS))
    offset = image_token_offset(tok)
    model = extend(base, offset, vq.codebook_size, vq.tokens_per_image, args.seed)
    noise = random.Random(args.seed + 1)
    rows = [careless(r, noise) if r["task"] == "arithmetic" and noise.random() < args.careless else r
            for task in ("arithmetic", "countdown") for r in make_rows(task, 20000, args.seed, "train")]
    # +1 for the end-of-turn token; a row only goes into batches whose answer length fits it.
    need = [len(ids) + 1 for ids in tok([r["solution"] for r in rows], add_special_tokens=False)["input_ids"]]
    text_rows = {L: [r for r, n in zip(rows, need) if n <= L] for L in ANSWER_LENGTHS}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    history, t0, ema = [], time.time(), {}
    model.train()
    for step in range(1, args.steps + 1):
        mode = rng.choices(list(MIX), list(MIX.values()))[0]
        ids, mask, answers = batch_for(mode, rng, text_rows, vq, tok, offset, args.tokens_per_batch, args.careless, gen)
        loss = sft_loss(model, ids, mask, answers, tok.mask_token_id, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        ema[mode] = loss.item() if mode not in ema else 0.95 * ema[mode] + 0.05 * loss.item()
        if step % 50 == 0:
            losses = " ".join(f"{k} {v:.3f}" for k, v in sorted(ema.items()))
            print(f"step {step} {losses} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            res = evaluate(model, tok, vq, args.clip, args.eval_rows, args.seed)
            history.append({"step": step, **{k: round(v, 4) for k, v in res.items()},
                            "elapsed_s": round(time.time() - t0)})
            print("eval", json.dumps(history[-1]), flush=True)
            save(model, tok, args, step, history)
    print(f"wrote {args.out} after {args.steps} steps")


def save(model, tok, args, step, history):
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    info = {"recipe": "python -m recipes.build_tiny_mmada", "init": "recipes/assets/tiny-llada",
            "image_tokenizer": "recipes/assets/tiny-vq", "mix": MIX, "careless": args.careless, "lr": args.lr,
            "seed": args.seed, "steps": step, "params": sum(p.numel() for p in model.parameters()),
            "eval_text_sampler": vars(EVAL_TEXT), "eval_image_sampler": vars(EVAL_IMAGE), "history": history}
    (args.out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
