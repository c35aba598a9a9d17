"""Weight sync seconds: Ray's object store vs the collective group, at several model sizes.

    python -m bench.sync [--sizes tiny 25M 100M] [--workers 2] [--repeats 3]

Per size, one placement as a training run makes it (rl.actors.Actors: one learner rank, `workers`
rollout workers, one reward worker) on a local Ray, with random LLaDA weights in fp32 (the shipped
tiny checkpoint, or a larger config built in a temp dir; their parameter counts name them). The
group forms once (trainer.weight_sync=collective); then `repeats` rounds each time one sync per mode,
the two modes taking turns so background load hits them alike, after one untimed sync of each.
A sync is Actors.sync_weights: the learner's weights (LoRA off) onto every rollout worker, until the
last has them. One JSON object is printed: per size, params, fp32_mb, sync/bytes per receiver,
object_store_s and collective_s (medians), every run's seconds, and speedup (object store / collective).
`measure()` is the same run for other benchmarks (bench/step.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from rl.models import TINY_CHECKPOINT, load_tokenizer
from rl.models.llada import LLaDAConfig, LLaDAModelLM

ROOT = Path(__file__).resolve().parents[1]
# Block shapes of the larger sizes (the tiny checkpoint's vocabulary and everything else).
SIZES = {
    "tiny": None,
    "25M": {"d_model": 512, "n_heads": 8, "n_kv_heads": 8, "n_layers": 8, "mlp_hidden_size": 1536},
    "100M": {"d_model": 1024, "n_heads": 16, "n_kv_heads": 16, "n_layers": 8, "mlp_hidden_size": 2816},
}
MODES = ("object_store", "collective")


def model_dir(size: str, tmp: str) -> str:
    if SIZES[size] is None:
        return str(TINY_CHECKPOINT)
    config = LLaDAConfig.from_pretrained(TINY_CHECKPOINT)
    config.update(SIZES[size])
    LLaDAModelLM(config).save_pretrained(tmp)
    load_tokenizer(TINY_CHECKPOINT).save_pretrained(tmp)
    return tmp


def _cfg(path: str, workers: int):
    overrides = [f"model.path={path}", f"rollout.num_workers={workers}", "reward.num_workers=1",
                 "trainer.weight_sync=collective", f"ray.num_cpus={workers + 4}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def measure(sizes=("tiny", "25M", "100M"), workers: int = 2, repeats: int = 3) -> dict:
    """{"workers", "repeats", "sizes": {size: {...}}} as described in the module docstring."""
    from rl.actors import Actors

    out = {"workers": workers, "repeats": repeats, "sizes": {}}
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = model_dir(size, tmp)
            cfg = _cfg(path, workers)
            accuracy = cfg.reward.accuracy
            actors = Actors(cfg, path, [accuracy] if isinstance(accuracy, str) else list(accuracy))
            try:
                runs, version = {mode: [] for mode in MODES}, 0
                actors.sync_weights(version)  # chooses the collective sync and forms its group, untimed
                for r in range(repeats + 1):  # round 0 untimed: each path's first use
                    for mode in MODES:
                        actors.sync_mode = mode
                        version += 1
                        t0 = time.perf_counter()
                        metrics = actors.sync_weights(version)
                        seconds = time.perf_counter() - t0
                        if r:
                            runs[mode].append(seconds)
                        if mode == "collective":
                            sent = metrics["sync/bytes"]
            finally:
                actors.close()
            params = sum(t.numel() for t in LLaDAModelLM(LLaDAConfig.from_pretrained(path)).parameters())
            medians = {mode: statistics.median(runs[mode]) for mode in MODES}
            out["sizes"][size] = {
                "params": params, "fp32_mb": round(params * 4 / 2**20, 1), "bytes_per_worker": sent,
                "object_store_s": round(medians["object_store"], 4), "collective_s": round(medians["collective"], 4),
                "object_store_runs": [round(s, 4) for s in runs["object_store"]],
                "collective_runs": [round(s, 4) for s in runs["collective"]],
                "speedup": round(medians["object_store"] / medians["collective"], 2),
            }
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "25M", "100M"], choices=list(SIZES))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.workers < 1 or args.repeats < 1:
        ap.error("--workers and --repeats: expected integers >= 1")
    # DeepSpeed's import-time notice (the learner's) goes to stderr: stdout is the JSON's.
    with contextlib.redirect_stdout(sys.stderr):
        out = measure(args.sizes, args.workers, args.repeats)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
