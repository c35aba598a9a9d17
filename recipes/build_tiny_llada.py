"""Train the shipped tiny LLaDA-architecture model from scratch with the masked-diffusion SFT loss.

    python -m recipes.build_tiny_llada [--out DIR]

Data: the synthetic arithmetic and Countdown tasks (rl/data/tasks.py, fixed seed). Answers are padded
with end-of-text to a length drawn per batch from 32..512, so the model learns to fill any answer
length with a short answer and end-of-text padding, as LLaDA does. Training stops at the first
evaluation whose held-out arithmetic pass@1 (temperature sampling) reaches --target: an SFT model
that is right some of the time leaves room for RL.

The shipped checkpoint is two runs of this script (docs/TINY_MODEL.md):

    python -m recipes.build_tiny_llada --out /tmp/tiny-stage1
    python -m recipes.build_tiny_llada --init /tmp/tiny-stage1 --careless 0.5 --max-steps 2000 \
        --target 1.1 --lr 1e-3 --warmup 50

The second continues from the first with a careless teacher: half of the arithmetic solutions keep
their (correct) working but give a wrong final answer, so the model learns the arithmetic but often
fails to answer what it worked out, a behaviour a correctness reward can remove within minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from rl.data.encode import encode_answers, encode_prompts
from rl.data.tasks import make_rows
from rl.evaluate import pass_at_k
from rl.models import TINY_CHECKPOINT, load_checkpoint
from rl.models.llada import LLaDAConfig, LLaDAModelLM
from rl.models.tokenizer import BOS, END_HEADER, EOT, START_HEADER, train_tokenizer
from rl.sft import sft_loss
from rollout.sampler import SamplerConfig

ANSWER_LENGTHS = {32: 0.55, 48: 0.2, 64: 0.1, 128: 0.08, 256: 0.05, 512: 0.02}
EVAL_SAMPLER = SamplerConfig(gen_length=32, block_length=16, steps=16, temperature=0.9)


def exact_answer(completions: list[str], rows: list[dict]) -> list[float]:
    # Selection only: the figures in docs/ are recomputed with the real math reward by recipes/eval_tiny.py.
    def tag(text):
        lo, hi = text.rfind("<answer>"), text.rfind("</answer>")
        return text[lo + 8: hi].strip() if 0 <= lo < hi else None
    return [float(tag(c) == r["answer"]) for c, r in zip(completions, rows)]


def careless(row: dict, rng: random.Random) -> dict:
    """The row with its final answer replaced by a near miss; the working stays correct."""
    ans = int(row["answer"])
    wrong = rng.choice([w for w in (ans - 3, ans - 2, ans - 1, ans + 1, ans + 2, ans + 3, ans + 10) if w >= 0])
    head = row["solution"][: row["solution"].rindex("<answer>")]
    return {**row, "solution": f"{head}<answer>{wrong}</answer>"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=TINY_CHECKPOINT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=8000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--target", type=float, default=0.23,
                    help="stop once held-out arithmetic pass@1 reaches this (above 1: run all --max-steps)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--tokens-per-batch", type=int, default=3072)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-rows", type=int, default=60000, help="rows per task")
    ap.add_argument("--val-rows", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--init", type=Path, default=None, help="continue from this checkpoint (and its tokenizer)")
    ap.add_argument("--careless", type=float, default=0.0,
                    help="fraction of arithmetic solutions given a wrong final answer after correct working")
    args = ap.parse_args(argv)
    if not 0.0 <= args.careless < 1.0:
        ap.error(f"--careless: expected a fraction in [0, 1), got {args.careless}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    train = [r for task in ("arithmetic", "countdown") for r in make_rows(task, args.train_rows, args.seed, "train")]
    val = make_rows("arithmetic", args.val_rows, args.seed, "val")
    if args.careless:
        noise = random.Random(args.seed + 1)
        train = [careless(r, noise) if r["task"] == "arithmetic" and noise.random() < args.careless else r
                 for r in train]
    if args.init is not None:
        model, tok = load_checkpoint(args.init)
        info = args.init / "build_info.json"  # absent for a checkpoint this script did not build
        earlier = json.loads(info.read_text()) if info.is_file() else {"init": str(args.init)}
        stages = earlier.get("stages", [earlier])
    else:
        chat = [f"{BOS}{START_HEADER}user{END_HEADER}\n\n{r['prompt']}{EOT}{START_HEADER}assistant{END_HEADER}\n\n"
                for r in train[::20]]
        tok = train_tokenizer(chat + [r["solution"] for r in train], vocab_size=512)
        config = LLaDAConfig(
            d_model=128, n_heads=4, n_kv_heads=2, n_layers=6, mlp_hidden_size=512, rope_theta=10000.0,
            vocab_size=len(tok), mask_token_id=tok.mask_token_id, weight_tying=True, max_sequence_length=1024,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        model, stages = LLaDAModelLM(config), []
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, args.max_steps) / args.max_steps)))
    lengths, weights = zip(*ANSWER_LENGTHS.items())
    # +1 for the end-of-turn token; a row only goes into batches whose answer length fits it.
    need = [len(ids) + 1 for ids in tok([r["solution"] for r in train], add_special_tokens=False)["input_ids"]]
    fits = {L: [r for r, n in zip(train, need) if n <= L] for L in lengths}
    history, t0, step, ema = [], time.time(), 0, None
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    while step < args.max_steps:
        L = rng.choices(lengths, weights)[0]
        loss = sft_step(model, tok, rng.sample(fits[L], max(2, args.tokens_per_batch // (L + 40))), L, opt, sched, gen)
        step += 1
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        if step % 50 == 0:
            print(f"step {step} loss {ema:.4f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s", flush=True)
        if step % args.eval_every == 0:
            res = pass_at_k(model, tok, val, 4, EVAL_SAMPLER, exact_answer, batch_size=128, seed=args.seed)
            history.append({"step": step, "loss": round(ema, 4), **res, "elapsed_s": round(time.time() - t0)})
            print("eval", json.dumps(history[-1]), flush=True)
            save(model, tok, args, step, history, stages)
            if res["pass@1"] >= args.target:
                break
    save(model, tok, args, step, history, stages)
    print(f"wrote {args.out} after {step} steps")


def sft_step(model, tok, batch: list[dict], length: int, opt, sched, gen) -> float:
    """One optimizer step of the masked-diffusion SFT loss on `batch`, answers padded to `length`."""
    prompt_ids, prompt_mask = encode_prompts(tok, [r["prompt"] for r in batch])
    answers = encode_answers(tok, [r["solution"] for r in batch], length)
    loss = sft_loss(model, prompt_ids, prompt_mask, answers, tok.mask_token_id, gen)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
    return loss.item()


def save(model, tok, args, step, history, stages):
    # Saved at every evaluation too, so an interrupted build still leaves its latest checkpoint.
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    this = {"recipe": "python -m recipes.build_tiny_llada", "init": str(args.init) if args.init else None,
            "careless": args.careless, "lr": args.lr, "seed": args.seed, "steps": step,
            "selection_history": history}
    info = {**this, "params": sum(p.numel() for p in model.parameters()), "eval_sampler": vars(EVAL_SAMPLER),
            "stages": [*stages, this]}
    (args.out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
