"""Held-out pass@1 / pass@k of a checkpoint on the synthetic tasks, scored by the real rewards.

    python -m recipes.eval_tiny [--checkpoint DIR] [--n 256] [--k 8]

Prints one JSON object. Defaults: the shipped tiny checkpoint, temperature 0.9, two tokens per step.
In process, on synthetic rows; a model or checkpoint on a task file, over Ray workers, resumable and
per generation length: python -m rl.evaluate (rl/evaluate.py, which holds the pass@k used here).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from rewards import build_reward
from rl.data.tasks import make_rows
from rl.evaluate import pass_at_k
from rl.models import TINY_CHECKPOINT, load_checkpoint
from rollout.sampler import SamplerConfig

# Countdown answers are longer (an equation plus two steps of working); long-task rows are sized to
# fill 75-90 % of the length they are made for (rl/data/tasks.py).
GEN_LENGTH = {"arithmetic": 32, "countdown": 48, "long": 256}
# The reward that scores each task, its options and the row columns it reads. A long-task answer is
# right when its chain of numbers from a to b is (rewards/exact.py: neither the stop nor the closing tag is scored).
REWARDS = {"arithmetic": ("math", {}, ("answer",)), "countdown": ("countdown", {}, ("numbers", "target")),
           "long": ("exact", {"prefix": True}, ("answer",))}


def task_rows(task: str, n: int, seed: int, length: int) -> list[dict]:
    """Held-out rows; a long-task row is made for its answer length."""
    return make_rows(task, n, seed, "test", **({"length": length} if task == "long" else {}))


def scorer(task: str):
    """(reward, score) where score passes the task's columns; a Countdown format credit (0.1) is no success."""
    name, kwargs, keys = REWARDS[task]
    reward = build_reward(name, kwargs)

    def score(completions, rows):
        return reward([r["prompt"] for r in rows], completions, **{k: [r[k] for r in rows] for k in keys})

    return reward, score


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(TINY_CHECKPOINT))
    ap.add_argument("--tasks", nargs="+", default=["arithmetic", "countdown"], choices=list(GEN_LENGTH))
    ap.add_argument("--n", type=int, default=256, help="held-out prompts per task")
    ap.add_argument("--k", type=int, default=8, help="samples per prompt")
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="answer lengths to evaluate each task at (default: 32 arithmetic, 48 Countdown)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_checkpoint(args.checkpoint)
    result = {"checkpoint": args.checkpoint, "k": args.k, "temperature": args.temperature}
    for task in args.tasks:
        reward, score = scorer(task)
        try:
            for L in args.lengths or [GEN_LENGTH[task]]:
                rows = task_rows(task, args.n, args.seed, L)
                sampler = SamplerConfig(gen_length=L, block_length=16, steps=L // 2, temperature=args.temperature)
                t0 = time.time()
                res = pass_at_k(model, tok, rows, args.k, sampler, score, batch_size=128, seed=args.seed)
                key = task if args.lengths is None else f"{task}@{L}"
                result[key] = {**res, "sampler": vars(sampler), "seconds": round(time.time() - t0, 1)}
        finally:
            reward.close()
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
