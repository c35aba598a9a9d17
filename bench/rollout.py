"""Reference vs fast text sampler on the same model, prompts and seeds, in one run.

    python -m bench.rollout [--lengths 128 256 512] [--prompts 256] [--runs 3] [--timing-prompts 8]
    python -m bench.rollout --task long --lengths 256 512 --prompts 64 --runs 4 --timing-prompts 16 --no-baselines

Per answer length L, the reference runs at Fast-dLLM's baseline (one token per step, block 32) and
at d1's rollout setting (steps = L/2); the fast sampler runs with every technique on, then with
each alone (dual cache only, threshold only, early stop only) and with cache and threshold but no
early stop (`cache_and_threshold`, whose speedup is `speedup_without_early_stop`). Task `long`
(rl/data/tasks.py) makes its prompts for each L, with answers that fill 75-90 % of it, on the
long-answer tiny checkpoint (recipes/build_tiny_llada_long.py): there early stop has almost nothing
to skip. Each fast entry carries `early_stop`, `speedup`, `ref_accuracy` and `fast_accuracy`, the
latter two on the timed rows; with --prompts equal to --runs x --timing-prompts every prompt is
timed, those are the accuracies over all prompts and no separate accuracy pass runs. Timing: `runs` batches of
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

from recipes.eval_tiny import scorer, task_rows
from rl.data.encode import decode_answers, encode_prompts
from rl.models import TINY_CHECKPOINT, TINY_LONG_CHECKPOINT, load_checkpoint
from rl.models.tokenizer import end_token_ids
from rollout.fast import FastSamplerConfig
from rollout.rollout import sample
from rollout.sampler import SamplerConfig, answer_mask, transfer_schedule

# Each technique alone, and cache with threshold without early stop: the speedup that stays where
# answers fill the length (--task long).
ALONE = {
    "cache_only": dict(cache="dual", threshold=None, early_stop=False, share_prompt=False),
    "threshold_only": dict(cache="none", early_stop=False, share_prompt=False),
    "early_stop_only": dict(cache="none", threshold=None, share_prompt=False),
    "cache_and_threshold": dict(early_stop=False, share_prompt=False),
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
    ap.add_argument("--checkpoint", default=None,
                    help="default: the shipped tiny model; for --task long its long-answer variant")
    ap.add_argument("--task", default="arithmetic", choices=["arithmetic", "countdown", "long"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[128, 256, 512])
    ap.add_argument("--prompts", type=int, default=256, help="held-out prompts for accuracy")
    ap.add_argument("--runs", type=int, default=3, help="timed batches (medians over them)")
    ap.add_argument("--timing-prompts", type=int, default=8, help="prompts per timed batch")
    ap.add_argument("--batch", type=int, default=64, help="rows per sampler call in the accuracy pass")
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--cache", default="dual", choices=["none", "prefix", "dual"])
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                    help="also time LLaDA's published loop and d1's setting (L/2 steps) against the reference")
    # cache_and_threshold gives speedup_without_early_stop: every run times it.
    ap.add_argument("--skip", nargs="+", default=[], choices=[k for k in ALONE if k != "cache_and_threshold"],
                    help="fast settings not to time (early_stop_only costs the reference's time on long answers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.runs * args.timing_prompts > args.prompts:
        ap.error(f"--runs x --timing-prompts = {args.runs * args.timing_prompts} exceeds --prompts={args.prompts}")
    if args.checkpoint is None:
        args.checkpoint = str(TINY_LONG_CHECKPOINT if args.task == "long" else TINY_CHECKPOINT)
    # Every prompt timed: each sampler's accuracy is that of its timed answers, no extra pass.
    all_timed = args.runs * args.timing_prompts == args.prompts
    torch.set_num_threads(args.threads)
    model, tok = load_checkpoint(args.checkpoint)
    model.eval()
    mask_id, ends = tok.mask_token_id, end_token_ids(tok)
    reward, score = scorer(args.task)

    def accuracy(texts, subset):
        return sum(score(texts, subset)) / len(subset)

    result = {"checkpoint": args.checkpoint, "task": args.task, "prompts": args.prompts, "runs": args.runs,
              "timing_prompts": args.timing_prompts, "temperature": args.temperature, "threads": args.threads,
              "block_length": args.block_length, "lengths": {}}
    try:
        for L in args.lengths:
            rows = task_rows(args.task, args.prompts, args.seed, L)
            ids, mask = encode_prompts(tok, [r["prompt"] for r in rows])

            def run(cfg, lo, hi):
                gen = torch.Generator().manual_seed(args.seed + lo)
                return sample(model, tok, ids[lo:hi], mask[lo:hi], cfg, gen)

            base = dict(gen_length=L, block_length=args.block_length, temperature=args.temperature)
            samplers = {
                "ref": SamplerConfig(**base, steps=L),
                **({"ref_d1": SamplerConfig(**base, steps=L // 2)} if args.baselines else {}),
                "fast": FastSamplerConfig(**base, steps=L, cache=args.cache, threshold=args.threshold),
                **{k: FastSamplerConfig(**{**base, "steps": L, "cache": args.cache, "threshold": args.threshold, **v})
                   for k, v in ALONE.items() if k not in args.skip},
            }
            N = args.timing_prompts
            seconds = {k: [] for k in samplers}
            stats = {k: {"forward_passes": [], "row_tokens": [], "tokens_per_step": []} for k in samplers}
            answers = {k: [] for k in samplers}
            published = []
            run(samplers["ref"], 0, 1)  # warm-up, so the first timed call pays no one-off costs
            for r in range(args.runs):
                lo, hi = r * N, (r + 1) * N
                if args.baselines:
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
                    answers[name].append(out.answer_ids)
            answers = {k: torch.cat(v) for k, v in answers.items()}
            texts = {k: decode_answers(tok, v, ends) for k, v in answers.items()}
            timed_rows = rows[:args.runs * N]
            entry = {"timed_rows": len(timed_rows)}
            ref_timed_accuracy = round(accuracy(texts["ref"], timed_rows), 4)
            for name, cfg in samplers.items():
                med = statistics.median(seconds[name])
                entry[name] = {
                    "seconds_median": round(med, 3),
                    "tokens_per_s": round(N * L / med, 1),
                    "forward_passes": statistics.median(stats[name]["forward_passes"]),
                    "rows_x_positions_computed": statistics.median(stats[name]["row_tokens"]),
                    "tokens_per_step": round(statistics.median(stats[name]["tokens_per_step"]), 3),
                    "timed_accuracy": round(accuracy(texts[name], timed_rows), 4),
                    # Answers whose </answer> fit in the length (task long scores a cut-off chain too).
                    "answers_closed": round(sum("</answer>" in t for t in texts[name]) / len(timed_rows), 4),
                }
                if name != "ref":
                    entry[name]["speedup"] = round(statistics.median(
                        [a / b for a, b in zip(seconds["ref"], seconds[name])]), 2)
                if isinstance(cfg, FastSamplerConfig):
                    # The same timed rows: accuracies over every prompt when all of them are timed.
                    entry[name].update(early_stop=cfg.early_stop, ref_accuracy=ref_timed_accuracy,
                                       fast_accuracy=entry[name]["timed_accuracy"])
            if args.baselines:
                entry["published_llada_seconds_median"] = round(statistics.median(published), 3)
                # < 1: the reference sampler is faster than LLaDA's published loop on the same rows
                entry["ref_vs_published"] = round(
                    statistics.median([a / b for a, b in zip(seconds["ref"], published)]), 3)

            # Accuracy on every held-out prompt.
            def full_pass(cfg):
                outs = [run(cfg, lo, min(lo + args.batch, args.prompts)).answer_ids
                        for lo in range(0, args.prompts, args.batch)]
                return torch.cat(outs)

            if all_timed:
                fast_ids, fast_s = answers["fast"], sum(seconds["fast"])
                ref_ids, ref_s = answers["ref"], sum(seconds["ref"])
                ref_method = "reference sampler (every prompt timed)"
            else:
                fast_ids, fast_s = timed(lambda: full_pass(samplers["fast"]))
                if args.temperature == 0:
                    exact = FastSamplerConfig(**base, steps=L, cache="none", threshold=None, early_stop=True,
                                              share_prompt=True)
                    ref_ids, ref_s = timed(lambda: full_pass(exact))
                    ref_method = "exact path: no cache, 1 token/step, early stop (identical answers at temperature 0)"
                else:
                    ref_ids, ref_s = timed(lambda: full_pass(samplers["ref"]))
                    ref_method = "reference sampler"
            fast_texts, ref_texts = decode_answers(tok, fast_ids, ends), decode_answers(tok, ref_ids, ends)
            entry.update({
                "ref_tokens_per_s": entry["ref"]["tokens_per_s"],
                "fast_tokens_per_s": entry["fast"]["tokens_per_s"],
                "speedup": entry["fast"]["speedup"],
                # The headline where answers fill the length: cache and threshold, no early stop.
                "speedup_without_early_stop": entry["cache_and_threshold"]["speedup"],
                "ref_accuracy": round(accuracy(ref_texts, rows), 4),
                "fast_accuracy": round(accuracy(fast_texts, rows), 4),
                "ref_accuracy_method": ref_method,
                "ref_exact_agreement": round(sum(a == b for a, b in zip(ref_texts, texts["ref"])) / len(timed_rows), 4),
                "fast_same_answer_as_ref": round(sum(a == b for a, b in zip(ref_texts, fast_texts)) / args.prompts, 4),
                "accuracy_pass_seconds": {"ref": round(ref_s, 1), "fast": round(fast_s, 1)},
                "answer_lengths": {"ref": answer_lengths(ref_ids, ends), "fast": answer_lengths(fast_ids, ends)},
            })
            result["lengths"][str(L)] = entry
            print(json.dumps({"length": L, "speedup": entry["speedup"],
                              "speedup_without_early_stop": entry["speedup_without_early_stop"],
                              "ref_accuracy": entry["ref_accuracy"], "fast_accuracy": entry["fast_accuracy"],
                              "no_early_stop_accuracy": entry["cache_and_threshold"]["fast_accuracy"]}),
                  flush=True, file=sys.stderr)
    finally:
        reward.close()
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
