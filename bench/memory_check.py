"""Measured vs predicted peak memory of one learner update on this machine's CPU.

    python -m bench.memory_check [--sizes tiny d1024 v126k] [--stages 0 3] [--ranks 2]
                                 [--gradient-checkpointing] [--measured rows.jsonl] [--out rows.jsonl]

Each (size, ZeRO stage) runs in a fresh `python -m bench.memory_check --one ...` process that
spawns `ranks` learners over gloo, as tests/test_learner.py does, so no allocator state carries over
between measurements. One JSON row per measurement is printed (size, zero_stage, ranks,
gradient_checkpointing, predicted, measured, ratio = predicted / measured) and, with --out, appended
to a file that --measured reads back to re-predict without re-measuring.

What is measured, per rank (the reported figure is the larger of the ranks):
  baseline: VmRSS when the rank function starts: Python, torch, DeepSpeed, peft and rl.* imported,
            nothing allocated yet. Everything bench.memory predicts is on top of it.
  peak:     the high-water mark VmHWM over Learner construction (load, DeepSpeed init, reference) and
            one update (mu inner steps, optimizer steps included), minus the baseline. The kernel's
            HWM is reset (clear_refs 5) after the baseline so that nothing before it counts.
  update:   the growth of the HWM during the update alone over the RSS just before it.
Allocator: by default (--malloc pinned) the measurement processes run with MALLOC_MMAP_THRESHOLD_=
128 KiB, so every tensor of 128 KiB or more is its own mmap and leaves RSS when freed: RSS is then
the live tensors, which is what bench.memory predicts (as torch.cuda.max_memory_allocated would be
on a GPU). glibc's default threshold is dynamic: after a large free it rises up to 32 MiB, and freed
blocks below it stay in the heap, fragmented (allocator caching, like the CUDA caching allocator's
reserved-but-free memory). --malloc default measures that too. CPU training is float32 (rl.learner
refuses bf16 there). Unsharded reference weights stay memory-mapped from the safetensors file, so
on the CPU only the embedding rows a batch looks up are ever resident (bench.memory models that).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# Shapes chosen so two ranks with a reference copy stay under ~12 GB of this shared machine's RAM:
# tiny is activation-bound, d1024 has depth and a 32k vocabulary, v126k has LLaDA's real vocabulary,
# where the logits and the embedding/head dominate.
SIZES = {
    "tiny": dict(d_model=128, n_heads=4, n_kv_heads=4, n_layers=4, mlp_hidden_size=384, vocab_size=512),
    "d1024": dict(d_model=1024, n_heads=16, n_kv_heads=16, n_layers=4, mlp_hidden_size=2816, vocab_size=32000),
    "v126k": dict(d_model=512, n_heads=8, n_kv_heads=8, n_layers=2, mlp_hidden_size=1408, vocab_size=126464),
}
# The learner setting every measurement uses (UniGRPO with a KL term, so the reference is loaded; mu=2
# so the second inner step runs with the optimizer states of the first already allocated).
RUN = dict(group_size=4, prompts_per_rank=2, prompt_length=64, gen_length=64, estimator="unigrpo", mu=2)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def build_checkpoint(size: str, root: Path) -> Path:
    """A random-init LLaDA-shaped checkpoint with the shipped tokenizer (ids beyond it are never decoded)."""
    from rl.models import TINY_CHECKPOINT, load_tokenizer
    from rl.models.llada import LLaDAConfig, LLaDAModelLM

    path = root / size
    if (path / "config.json").is_file():
        return path
    shape = SIZES[size]
    tok = load_tokenizer(TINY_CHECKPOINT)
    torch.manual_seed(0)
    cfg = LLaDAConfig(**shape, mask_token_id=tok.mask_token_id, rope_theta=10000.0)
    LLaDAModelLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _batch(ranks: int, vocab: int):
    from rl.advantages import group_advantages
    from rl.batch import RolloutBatch

    g = torch.Generator().manual_seed(0)
    G, B = RUN["group_size"], RUN["group_size"] * RUN["prompts_per_rank"] * ranks
    P, L = RUN["prompt_length"], RUN["gen_length"]
    rewards = torch.rand(B, generator=g).round()
    return RolloutBatch(prompt_ids=torch.randint(10, min(vocab, 400), (B, P), generator=g),
                        prompt_mask=torch.ones(B, P, dtype=torch.long),
                        answer_ids=torch.randint(10, min(vocab, 400), (B, L), generator=g),
                        answer_mask=torch.ones(B, L), advantages=group_advantages(rewards, G),
                        rewards=rewards, group_size=G)


def _rank(rank: int, ckpt: str, stage: int, ranks: int, port: int, ckpt_flag: bool, out: str):
    torch.set_num_threads(1)
    # Imported before the baseline: what a run pays for its code is not what the planner predicts.
    import deepspeed.runtime.engine  # noqa: F401
    import peft  # noqa: F401

    from rl.learner import Learner
    from rl.models.llada import LLaDAModelLM  # noqa: F401

    baseline = _status("VmRSS")
    _reset_hwm()

    kw = {}
    if ckpt_flag:
        # The flag is another change's (model.gradient_checkpointing); fail loudly where it is missing.
        if "gradient_checkpointing" not in inspect.signature(Learner).parameters:
            raise SystemExit("--gradient-checkpointing: rl.learner.Learner has no gradient_checkpointing yet")
        kw["gradient_checkpointing"] = True
    algorithm = {"name": RUN["estimator"], "mu": RUN["mu"], "beta": 0.04}
    lrn = Learner(ckpt, algorithm, {"lr": 1e-4}, stage, rank=rank, world_size=ranks, master_port=port, **kw)
    init_peak, before = _status("VmHWM"), _status("VmRSS")
    _reset_hwm()
    lrn.update(_batch(ranks, lrn.module.config.vocab_size), seed=0)
    update_peak = _status("VmHWM")
    lrn.close()
    row = {"rank": rank, "baseline": baseline, "after_init": before - baseline,
           "peak": max(init_peak, update_peak) - baseline, "update_growth": update_peak - before,
           "peak_phase": "init" if init_peak > update_peak else "update"}
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))


def measure_one(size: str, stage: int, ranks: int, ckpt_flag: bool, root: Path) -> dict:
    """Spawn the ranks in this (fresh) process and collect their rows."""
    import torch.multiprocessing as mp

    ckpt = build_checkpoint(size, root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(str(ckpt), stage, ranks, port, ckpt_flag, out), nprocs=ranks, join=True)
        per_rank = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]
    return {"size": size, "zero_stage": stage, "ranks": ranks, "gradient_checkpointing": ckpt_flag,
            "measured": max(r["peak"] for r in per_rank), "per_rank": per_rank}


def predict(row: dict) -> dict:
    from bench.memory import Settings, plan

    settings = Settings(zero_stage=row["zero_stage"], ranks=row["ranks"], dtype="float32",
                        gradient_checkpointing=row["gradient_checkpointing"], **RUN)
    return plan(SIZES[row["size"]], settings)


def compare(row: dict) -> dict:
    p = predict(row)
    predicted = p["learner"]["peak"]["bytes"]
    return {"size": row["size"], "zero_stage": row["zero_stage"], "ranks": row["ranks"],
            "gradient_checkpointing": row["gradient_checkpointing"], "malloc": row.get("malloc", "default"),
            "predicted": predicted,
            "measured": row["measured"], "ratio": round(predicted / row["measured"], 3),
            "predicted_phase": p["learner"]["peak"]["phase"],
            "measured_phase": max(row["per_rank"], key=lambda r: r["peak"])["peak_phase"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--stages", nargs="+", type=int, default=[0, 3])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--malloc", choices=["pinned", "default"], default="pinned",
                    help="pinned: glibc's mmap threshold fixed at 128 KiB, so every freed tensor leaves RSS "
                         "(what the planner predicts: live tensors); default: glibc's dynamic threshold, "
                         "which keeps freed blocks under 32 MiB in its heap (allocator caching)")
    ap.add_argument("--measured", help="JSON lines of earlier measurements: re-predict, do not measure")
    ap.add_argument("--out", help="append the measurement rows (JSON lines) here")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_memory_ckpts"))
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one measurement
    args = ap.parse_args(argv)

    if args.one:
        row = measure_one(args.sizes[0], args.stages[0], args.ranks, args.gradient_checkpointing, Path(args.workdir))
        print(json.dumps(row))
        return
    if args.measured:
        rows = [json.loads(line) for line in Path(args.measured).read_text().splitlines() if line.strip()]
    else:
        rows = []
        for size in args.sizes:
            for stage in args.stages:
                cmd = [sys.executable, "-m", "bench.memory_check", "--one", "--sizes", size, "--stages", str(stage),
                       "--ranks", str(args.ranks), "--workdir", args.workdir]
                if args.gradient_checkpointing:
                    cmd.append("--gradient-checkpointing")
                env = dict(os.environ)
                if args.malloc == "pinned":
                    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode:
                    sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
                row = {**json.loads(done.stdout.strip().splitlines()[-1]), "malloc": args.malloc}
                rows.append(row)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    for row in rows:
        print(json.dumps(compare(row)), flush=True)


if __name__ == "__main__":
    main()
