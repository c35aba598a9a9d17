"""Reference vs fast text sampler on the same model, prompts and seeds, in one run.

    python -m bench.rollout [--lengths 128 256 512] [--prompts 256] [--runs 3] [--timing-prompts 8]

Per answer length L, the reference runs at Fast-dLLM's baseline (one token per step, block 32) and
at d1's rollout setting (steps = L/2); the fast sampler runs with every technique on, then with
each alone (dual cache only, threshold only, early stop only). Timing: `runs` batches of
`timing-prompts` held-out prompts, every sampler on the same batch in turn, so background load hits
them alike; medians over the runs. Accuracy: the fast sampler on all `prompts` held-out prompts.
The reference's accuracy on all of them comes from its exact path (no cache, the same fixed schedule,
early stop on): at temperature 0 that yields the reference's answers token for token, because a
finished answer can no longer change (tests/test_fast_sampler.py); `ref_exact_agreement` checks it
against the reference's real output on the timed batches. At temperature > 0 the reference itself
runs on all prompts. The reference loop is also timed against LLaDA's published `generate` loop
(`llada_published_generate` below) on every timed batch (`ref_vs_published`, the median ratio).

Answer tokens per second count the L answer positions of every row (what a rollout hands the
learner), so `speedup` is the ratio of the seconds both samplers took for the same rows. One JSON
object is printed; keys per length: ref_tokens_per_s, fast_tokens_per_s, speedup, ref_accuracy,
fast_accuracy, and the rest described in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from recipes.eval_tiny import scorer
from rl.data.encode import decode_answers, encode_prompts
from rl.data.tasks import make_rows
from rl.models import TINY_CHECKPOINT, load_checkpoint
from rl.models.tokenizer import end_token_ids
from rollout.fast import FastSamplerConfig
from rollout.rollout import sample
from rollout.sampler import SamplerConfig, answer_mask, transfer_schedule

ALONE = {
    "cache_only": dict(cache="dual", threshold=None, early_stop=False, share_prompt=False),
    "threshold_only": dict(cache="none", early_stop=False, share_prompt=False),
    "early_stop_only": dict(cache="none", threshold=None, share_prompt=False),
}


@torch.no_grad()
def llada_published_generate(model, prompt, attention_mask, steps, gen_length, block_length, temperature, mask_id):
    """LLaDA's published generate loop (ML-GSAI/LLaDA generate.py) as its README runs it: full logits
    over the whole sequence each step, Gumbel noise in float64 over all of them, softmax over all
    positions, per-row top-k in a Python loop. Only a timing baseline for the reference sampler."""
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    attn = torch.cat([attention_mask, torch.ones(B, gen_length, dtype=attention_mask.dtype)], 1)
    num_blocks = gen_length // block_length
    for b in range(num_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        per_step = transfer_schedule((x[:, lo:hi] == mask_id).sum(-1), steps // num_blocks)
        for i in range(steps // num_blocks):
            mask_index = x == mask_id
            logits = model(input_ids=x, attention_mask=attn).logits
            if temperature:
                logits = logits.double()
                logits = logits.exp() / (-torch.log(torch.rand_like(logits))) ** temperature
            x0 = logits.argmax(-1)
            p = F.softmax(logits.double(), dim=-1)
            x0_p = p.gather(-1, x0[..., None]).squeeze(-1)
            x0_p[:, hi:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(B):
                _, idx = torch.topk(confidence[j], k=int(per_step[j, i]))
                transfer[j, idx] = True
            x[transfer] = x0[transfer]
    return x[:, P:]


def answer_lengths(answer_ids, end_ids) -> dict:
    n = answer_mask(answer_ids, end_ids).sum(-1)
    ended = torch.isin(answer_ids, torch.tensor(end_ids)).any(-1)
    q = np.percentile(n.numpy(), [0, 25, 50, 75, 100]).tolist()
    return {"min": q[0], "p25": q[1], "median": q[2], "p75": q[3], "max": q[4],
            "unfinished": float((~ended).float().mean())}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(TINY_CHECKPOINT))
    ap.add_argument("--task", default="arithmetic", choices=["arithmetic", "countdown"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[128, 256, 512])
    ap.add_argument("--prompts", type=int, default=256, help="held-out prompts for accuracy")
    ap.add_argument("--runs", type=int, default=3, help="timed batches (medians over them)")
    ap.add_argument("--timing-prompts", type=int, default=8, help="prompts per timed batch")
    ap.add_argument("--batch", type=int, default=64, help="rows per sampler call in the accuracy pass")
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--cache", default="dual", choices=["none", "prefix", "dual"])
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.runs * args.timing_prompts > args.prompts:
        ap.error(f"--runs x --timing-prompts = {args.runs * args.timing_prompts} exceeds --prompts={args.prompts}")
    torch.set_num_threads(args.threads)
    model, tok = load_checkpoint(args.checkpoint)
    model.eval()
    mask_id, ends = tok.mask_token_id, end_token_ids(tok)
    rows = make_rows(args.task, args.prompts, args.seed, "test")
    ids, mask = encode_prompts(tok, [r["prompt"] for r in rows])
    reward, score = scorer(args.task)

    def accuracy(texts, subset):
        return sum(score(texts, subset)) / len(subset)

    def run(cfg, lo, hi):
        gen = torch.Generator().manual_seed(args.seed + lo)
        return sample(model, tok, ids[lo:hi], mask[lo:hi], cfg, gen)

    result = {"checkpoint": args.checkpoint, "task": args.task, "prompts": args.prompts, "runs": args.runs,
              "timing_prompts": args.timing_prompts, "temperature": args.temperature, "threads": args.threads,
              "block_length": args.block_length, "lengths": {}}
    try:
        for L in args.lengths:
            base = dict(gen_length=L, block_length=args.block_length, temperature=args.temperature)
            samplers = {
                "ref": SamplerConfig(**base, steps=L),
                "ref_d1": SamplerConfig(**base, steps=L // 2),
                "fast": FastSamplerConfig(**base, steps=L, cache=args.cache, threshold=args.threshold),
                **{k: FastSamplerConfig(**{**base, "steps": L, "cache": args.cache, "threshold": args.threshold, **v})
                   for k, v in ALONE.items()},
            }
            N = args.timing_prompts
            seconds = {k: [] for k in samplers}
            stats = {k: {"forward_passes": [], "row_tokens": [], "tokens_per_step": []} for k in samplers}
            texts = {k: [] for k in samplers}
            published = []
            run(samplers["ref"], 0, 1)  # warm-up, so the first timed call pays no one-off costs
            for r in range(args.runs):
                lo, hi = r * N, (r + 1) * N
                torch.manual_seed(args.seed)
                _, s = timed(lambda: llada_published_generate(
                    model, ids[lo:hi], mask[lo:hi], L, L, args.block_length, args.temperature, mask_id))
                published.append(s)
                for name, cfg in samplers.items():
                    out, s = timed(lambda: run(cfg, lo, hi))
                    seconds[name].append(s)
                    stats[name]["forward_passes"].append(out.forward_passes)
                    stats[name]["row_tokens"].append(out.row_tokens)
                    stats[name]["tokens_per_step"].append(float(out.tokens_per_step.mean()))
                    texts[name] += decode_answers(tok, out.answer_ids, ends)
            timed_rows = rows[:args.runs * N]
            entry = {"timed_rows": len(timed_rows)}
            for name in samplers:
                med = statistics.median(seconds[name])
                entry[name] = {
                    "seconds_median": round(med, 3),
                    "tokens_per_s": round(N * L / med, 1),
                    "forward_passes": statistics.median(stats[name]["forward_passes"]),
                    "rows_x_positions_computed": statistics.median(stats[name]["row_tokens"]),
                    "tokens_per_step": round(statistics.median(stats[name]["tokens_per_step"]), 3),
                    "timed_accuracy": round(accuracy(texts[name], timed_rows), 4),
                }
                if name != "ref":
                    entry[name]["speedup"] = round(statistics.median(
                        [a / b for a, b in zip(seconds["ref"], seconds[name])]), 2)
            entry["published_llada_seconds_median"] = round(statistics.median(published), 3)
            # < 1: the reference sampler is faster than LLaDA's published loop on the same rows
            entry["ref_vs_published"] = round(statistics.median([a / b for a, b in zip(seconds["ref"], published)]), 3)

            # Accuracy on every held-out prompt.
            def full_pass(cfg):
                outs = [run(cfg, lo, min(lo + args.batch, args.prompts)).answer_ids
                        for lo in range(0, args.prompts, args.batch)]
                return torch.cat(outs)

            fast_ids, fast_s = timed(lambda: full_pass(samplers["fast"]))
            fast_texts = decode_answers(tok, fast_ids, ends)
            if args.temperature == 0:
                exact = FastSamplerConfig(**base, steps=L, cache="none", threshold=None, early_stop=True,
                                          share_prompt=True)
                ref_ids, ref_s = timed(lambda: full_pass(exact))
                ref_method = "exact path: no cache, 1 token/step, early stop (identical answers at temperature 0)"
            else:
                ref_ids, ref_s = timed(lambda: full_pass(samplers["ref"]))
                ref_method = "reference sampler"
            ref_texts = decode_answers(tok, ref_ids, ends)
            entry.update({
                "ref_tokens_per_s": entry["ref"]["tokens_per_s"],
                "fast_tokens_per_s": entry["fast"]["tokens_per_s"],
                "speedup": entry["fast"]["speedup"],
                "ref_accuracy": round(accuracy(ref_texts, rows), 4),
                "fast_accuracy": round(accuracy(fast_texts, rows), 4),
                "ref_accuracy_method": ref_method,
                "ref_exact_agreement": round(sum(a == b for a, b in zip(ref_texts, texts["ref"])) / len(timed_rows), 4),
                "fast_same_answer_as_ref": round(sum(a == b for a, b in zip(ref_texts, fast_texts)) / args.prompts, 4),
                "accuracy_pass_seconds": {"ref": round(ref_s, 1), "fast": round(fast_s, 1)},
                "answer_lengths": {"ref": answer_lengths(ref_ids, ends), "fast": answer_lengths(fast_ids, ends)},
            })
            result["lengths"][str(L)] = entry
            print(json.dumps({"length": L, "speedup": entry["speedup"], "ref_accuracy": entry["ref_accuracy"],
                              "fast_accuracy": entry["fast_accuracy"]}), flush=True, file=sys.stderr)
    finally:
        reward.close()
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
