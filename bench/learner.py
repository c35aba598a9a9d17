"""Learner inner-step cost of each estimator against a plain PyTorch training step, in one run.

    python -m bench.learner [--sizes tiny d256 d512] [--repeats 5] [--batch 8] [--gen-length 32]
                            [--prompt-length 40] [--mu 2] [--vocab N] [--device cpu|cuda] [--threads 2]
                            [--variant OLD_ESTIMATORS_OR_UPDATE.py ...]

What runs. Every estimator goes through the learner's own code path, rl.update.policy_update, with its
recipe hyperparameters (conf/algorithm/NAME.yaml `hyper`), on a synthetic RolloutBatch of the recipe's
shape: `--batch` rows in groups of 8 (one prompt per group, real length 3/4..1 of `--prompt-length`,
left-padded), answers of `--gen-length` tokens of which the first half to all are counted, the rest
end-of-text. The `step` callable is plain torch: backward, gradient clipping at 1.0 and torch AdamW
(what DeepSpeed runs on the CPU with torch_adam and ZeRO-0). DeepSpeed itself is left out: the ratio
below is about the estimator's passes, not the engine, and the same step closes both sides.
The reference model, when the estimator needs one (beta > 0), is a frozen copy of the policy.

Baseline. A plain forward + backward + the same step on the same model and the same [B, P+L] batch:
answer tokens masked with probability 1/2, logits over the whole sequence, cross-entropy on masked
counted tokens. It is the cost of one pass with gradient over the batch.

Figures per estimator and model size:
  tokens_per_s       B*(P+L) / t_inner: prompt+answer positions of the batch (left padding included)
                     per second of one inner step, where t_inner = seconds of one policy_update / mu.
                     t_inner includes the plan, the old/reference passes (computed once per mask set,
                     before the mu updates, so each inner step carries 1/mu of them per mask set),
                     the policy pass, the loss, backward and the optimizer step.
  overhead           median over `--repeats` of t_inner / t_base, each pair measured back to back
                     (order alternating between repeats) so load on the machine hits both alike.
  passes             forward passes over the batch per inner step: model rows forwarded / B / mu,
                     counted at the model (coupled-GRPO's 3 views of B rows count 3).
                     grad_passes / nograd_passes split it: the no-grad old/ref passes skip backward,
                     so they cost roughly a third of a grad pass.
  overhead_per_pass  overhead / passes: the framework's cost per pass against the baseline's one.
  peak_mb            peak memory of one policy_update above the level before it, after a warm-up (so
                     optimizer state is already allocated). CPU: the process's peak resident set
                     (VmHWM in /proc/self/status, reset by writing 5 to /proc/self/clear_refs, after
                     malloc_trim(0) returns freed heap to the OS) minus the resident set before the
                     call; it includes allocator slack. CUDA: torch.cuda.max_memory_allocated after
                     reset_peak_memory_stats, minus memory_allocated before.
The baseline gets the same figures under "baseline".

Before/after in one run: `--variant PATH` (repeatable) loads a copy of rl/estimators.py or
rl/update.py from another revision (`git show REV:rl/estimators.py > /tmp/old.py`) and times its
token_logps or policy_update (the current plans and losses around it) in the same rotation as the
current code, against the same baselines, as "NAME@STEM", with seconds_vs_current, the median per-repeat
ratio of its seconds over the current code's. Timings on a shared machine move; the ratios,
measured in pairs, move much less than tokens_per_s.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import importlib.util
import json
import re
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

import rl.estimators
from bench.memory import PRESETS
from rl.batch import RolloutBatch
from rl.estimators import REGISTRY, build_estimator
from rl.models import TINY_CHECKPOINT
from rl.models.llada import LLaDAConfig, LLaDAModelLM
from rl.update import policy_update

CONF = Path(__file__).resolve().parent.parent / "conf" / "algorithm"
ESTIMATORS = ("unigrpo", "diffu_grpo", "coupled_grpo", "wd1", "spg")
GROUP = 8
# Larger random-init LLaDA shapes that still run in seconds on 2 CPU cores (head dim 64, GQA 2:1 as tiny).
SIZES = {
    "d256": dict(d_model=256, n_heads=4, n_kv_heads=2, n_layers=4, mlp_hidden_size=1024),
    "d512": dict(d_model=512, n_heads=8, n_kv_heads=4, n_layers=4, mlp_hidden_size=1536),
    # LLaDA-8B-Instruct's shapes and vocabulary (bench/gpu_check.sh; a GPU with --dtype bfloat16)
    "llada-8b": PRESETS["llada-8b"],
}
MAX_GRAD_NORM = 1.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def model_config(size: str, vocab: int | None) -> LLaDAConfig:
    """The shipped tiny model's config, or a SIZES shape on the tiny model's vocabulary and ids."""
    tiny = json.loads((TINY_CHECKPOINT / "config.json").read_text())
    if size != "tiny":
        if size not in SIZES:
            raise ValueError(f"--sizes: expected tiny or one of {sorted(SIZES)}, got {size!r}")
        tiny.update(SIZES[size])
    if vocab is not None:
        tiny.update(vocab_size=vocab, embedding_size=vocab)
    return LLaDAConfig(**tiny)


def synthetic_batch(B: int, P: int, L: int, vocab: int, mask_id: int, eos_id: int, seed: int) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    if B % GROUP:
        raise ValueError(f"--batch: expected a multiple of the group size {GROUP}, got {B}")
    words = [i for i in range(3, vocab) if i not in (mask_id, eos_id)]
    pick = torch.tensor(words)

    def tokens(*shape):
        return pick[torch.randint(len(words), shape, generator=g)]

    prompt_ids = torch.full((B, P), eos_id)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    for s in range(0, B, GROUP):
        n = int(torch.randint(3 * P // 4, P + 1, (), generator=g))
        prompt_ids[s:s + GROUP, P - n:] = tokens(n)
        prompt_mask[s:s + GROUP, P - n:] = 1
    answer_ids = tokens(B, L)
    counted = torch.randint(L // 2, L + 1, (B,), generator=g)
    answer_mask = (torch.arange(L) < counted[:, None]).float()
    answer_ids[answer_mask == 0] = eos_id
    adv = torch.randn(B, generator=g).view(-1, GROUP)
    adv = ((adv - adv.mean(1, keepdim=True)) / adv.std(1, keepdim=True)).flatten()
    return RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, answer_ids=answer_ids,
                        answer_mask=answer_mask, advantages=adv, group_size=GROUP)


class Counted(torch.nn.Module):
    """Counts the rows every forward runs, split by whether autograd records it."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.rows = {"grad": 0, "nograd": 0}

    def forward(self, **inputs):
        self.rows["grad" if torch.is_grad_enabled() else "nograd"] += inputs["input_ids"].shape[0]
        return self.model(**inputs)


def make_step(model, opt):
    def step(loss):
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm)}
    return step


def baseline_update(model, batch: RolloutBatch, mu: int, mask_id: int, step, generator) -> None:
    """mu plain masked-token cross-entropy steps over the whole sequence's logits."""
    P = batch.prompt_len
    ids, att, valid = batch.input_ids, batch.attention_mask, batch.answer_mask > 0
    for _ in range(mu):
        masked = torch.rand(batch.answer_ids.shape, generator=generator).to(ids.device) < 0.5
        x = ids.clone()
        x[:, P:] = torch.where(masked, mask_id, batch.answer_ids)
        logits = model(input_ids=x, attention_mask=att).logits[:, P:]
        sel = masked & valid
        step(F.cross_entropy(logits[sel], batch.answer_ids[sel]))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _status_mb(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def peak_mb(fn, device) -> float:
    """Peak memory of fn() above the level before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - before


def recipe_hyper(name: str) -> dict:
    return yaml.safe_load((CONF / f"{name}.yaml").read_text()).get("hyper", {})


def load_variant(path: str):
    """(label, token_logps or None, policy_update or None) from a copy of rl/estimators.py or
    rl/update.py at another revision, or a file proposing a change to either."""
    spec = importlib.util.spec_from_file_location(f"bench_variant_{Path(path).stem}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    tl, pu = getattr(mod, "token_logps", None), getattr(mod, "policy_update", None)
    if tl is None and pu is None:
        raise ValueError(f"--variant {path!r}: defines neither token_logps nor policy_update")
    return Path(path).stem, tl, pu


@contextmanager
def swapped_token_logps(fn):
    # Estimator.token_logps calls the module's token_logps, so swapping that runs every estimator's
    # own plan and loss around the variant's forward and log-probs.
    if fn is None:
        yield
        return
    current = rl.estimators.token_logps
    rl.estimators.token_logps = fn
    try:
        yield
    finally:
        rl.estimators.token_logps = current


def bench_size(size: str, args, device) -> dict:
    config = model_config(size, args.vocab)
    torch.manual_seed(args.seed)
    model = LLaDAModelLM(config).to(device, DTYPES[args.dtype]).train()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    policy, ref = Counted(model), Counted(ref)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    step = make_step(model, opt)
    mask_id = config.mask_token_id
    batch = synthetic_batch(args.batch, args.prompt_length, args.gen_length, config.vocab_size, mask_id,
                            config.eos_token_id, args.seed).to(device)
    B, T = len(batch), batch.input_ids.shape[1]
    mu = args.mu
    variants = [load_variant(v) for v in args.variant]

    # Per estimator: its runs under the current code and under each variant, labelled NAME[@VARIANT].
    groups: dict[str, dict] = {}
    for name in args.estimators:
        est = build_estimator(name, **recipe_hyper(name), mask_id=mask_id)
        groups[name] = {}
        for label, tl, pu in [("", None, None), *variants]:
            def run(g, est=est, tl=tl, update=pu or policy_update):
                with swapped_token_logps(tl):
                    update(policy, ref, est, batch, mu, mask_id, step, g)
            groups[name][f"{name}@{label}" if label else name] = run

    def base(g, n=mu):
        baseline_update(policy, batch, n, mask_id, step, g)

    def gen(r):
        return torch.Generator().manual_seed(args.seed + r)

    base(gen(0), 1)  # warm-up: optimizer state, thread pools, first-call allocations
    for group in groups.values():
        for fn in group.values():
            fn(gen(0))
    seconds = {label: [] for group in groups.values() for label in group}
    ratio = {label: [] for label in seconds}
    t_base = []
    for r in range(args.repeats):
        for group in groups.values():
            # The baseline and the group's runs back to back, the order rotating between repeats.
            calls = [("", lambda: base(gen(r)))] + [(label, lambda fn=fn: fn(gen(r))) for label, fn in group.items()]
            k = r % len(calls)
            took = {label: timed(call, device) / mu for label, call in calls[k:] + calls[:k]}
            t_base.append(took.pop(""))
            for label, s in took.items():
                seconds[label].append(s)
                ratio[label].append(s / t_base[-1])

    params = sum(p.numel() for p in model.parameters())
    out = {"config": {"d_model": config.d_model, "n_layers": config.n_layers, "n_heads": config.n_heads,
                      "vocab": config.vocab_size, "params_m": round(params / 1e6, 2), "batch": B, "positions": T}}
    out["baseline"] = {"seconds_median": round(statistics.median(t_base), 4),
                       "tokens_per_s": round(B * T / statistics.median(t_base), 1),
                       "passes": 1.0, "peak_mb": round(peak_mb(lambda: base(gen(0), 1), device), 1)}
    for name, group in groups.items():
        for label, fn in group.items():
            policy.rows.update(grad=0, nograd=0)
            ref.rows.update(grad=0, nograd=0)
            mem = peak_mb(lambda: fn(gen(0)), device)
            grad = (policy.rows["grad"] + ref.rows["grad"]) / B / mu
            nograd = (policy.rows["nograd"] + ref.rows["nograd"]) / B / mu
            overhead = statistics.median(ratio[label])
            out[label] = {
                "seconds_median": round(statistics.median(seconds[label]), 4),
                "tokens_per_s": round(B * T / statistics.median(seconds[label]), 1),
                "overhead": round(overhead, 3),
                "passes": round(grad + nograd, 3),
                "grad_passes": round(grad, 3),
                "nograd_passes": round(nograd, 3),
                "overhead_per_pass": round(overhead / (grad + nograd), 3),
                "peak_mb": round(mem, 1),
            }
            if label != name:
                # Same repeats, same baselines: variant seconds over current seconds, per repeat.
                out[label]["seconds_vs_current"] = round(statistics.median(
                    v / c for v, c in zip(seconds[label], seconds[name])), 3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", *SIZES])
    ap.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=sorted(REGISTRY))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="rows, a multiple of the group size 8")
    ap.add_argument("--prompt-length", type=int, default=40)
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--mu", type=int, default=2, help="inner steps per update (the default recipe's 2)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size for every size (default: tiny's)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES),
                    help="weights and optimizer states (bfloat16: no fp32 master copy, for timing at 8B on one GPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", action="append", default=[], metavar="PATH",
                    help="also time a copy of rl/estimators.py or rl/update.py from another revision (its "
                         "token_logps / policy_update), interleaved with the current code, as NAME@STEM")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats: expected >= 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = {size: bench_size(size, args, device) for size in args.sizes}
    result = {
        "settings": {"device": args.device, "threads": args.threads, "repeats": args.repeats, "batch": args.batch,
                     "group_size": GROUP, "prompt_length": args.prompt_length, "gen_length": args.gen_length,
                     "mu": args.mu, "dtype": args.dtype, "torch": torch.__version__},
        "baseline": {size: s["baseline"] for size, s in sizes.items()},
        "config": {size: s["config"] for size, s in sizes.items()},
        **{label: {size: s[label] for size, s in sizes.items()}
           for label in next(iter(sizes.values())) if label not in ("config", "baseline")},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
