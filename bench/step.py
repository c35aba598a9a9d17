"""Training step time with and without overlapping rollouts and the learner update, in one run.

    python -m bench.step [OVERRIDE ...] [--steps 10] [--workers 1 2] [--recipe tiny]

For each number of rollout workers, the recipe (default: the default recipe) trains `--steps` steps
at trainer.rollout_ahead=0 and then at 1, from the same start, without validation or checkpoints;
every configuration is a fresh Driver on one Ray. Per configuration: the median step time, the
medians of the rollout inside the step (generation + reward: of the step's own batch at 0, of the
next step's, generated during the update, at 1) and of the learner update, the rollout share (rollout
over step) and the learner's idle share (timing_s/wait_rollout over the step: at 0 the whole rollout,
at 1 only what the update did not cover). The first and last steps are left out of the medians: at
rollout_ahead=1 the first has nothing generated ahead yet and the last nothing to generate ahead.
`speedup` is the median step time at 0 over that at 1, per worker count; with `--repeats R` the
pairs of runs (0 then 1) are interleaved R times, each configuration's medians pool its R runs, and
`speedup` is the median of the R pairs' ratios (all of them in `speedup_pairs`).

Then the weight sync (bench/sync.py, `--sync-sizes`, none to skip): seconds per sync through Ray's
object store and over the collective group at three model sizes with 2 rollout workers. One JSON
object is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

import rl.config  # noqa: F401  (registers the config schema that conf/config.yaml's defaults start from)

ROOT = Path(__file__).resolve().parents[1]


def config(recipe: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"recipe={recipe}", *overrides])


def run(cfg, run_dir: Path) -> list[dict]:
    # The console's step lines and DeepSpeed's import-time notice go to stderr: stdout is the JSON's.
    with contextlib.redirect_stdout(sys.stderr):
        from rl.driver import Driver

        driver = Driver(cfg, run_dir)
        try:
            driver.fit()
        finally:
            driver.close()
    from rl.tracking import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def rollout_seconds(m: dict) -> float:
    """Seconds of rollout (generation + reward) inside the step: this step's own batch when nothing ran
    ahead, else the next step's batch generated during the update."""
    return m.get("timing_s/rollout_ahead", m["timing_s/gen"] + m["timing_s/reward"])


def measured(metrics: list[dict]) -> list[dict]:
    # Neither the first step (nothing generated ahead yet) nor the last (nothing to generate ahead).
    last = max(m["step"] for m in metrics)
    return [m for m in metrics if 1 < m["step"] < last and "timing_s/step" in m]


def summarize(*runs: list[dict]) -> dict:
    """Medians over the measured steps of every run given (the repeats of one configuration)."""
    steps = [m for metrics in runs for m in measured(metrics)]

    def med(f):
        return round(statistics.median(f(m) for m in steps), 3)

    return {
        "steps_measured": len(steps),
        "step_seconds_median": med(lambda m: m["timing_s/step"]),
        "rollout_seconds_median": med(rollout_seconds),
        "update_seconds_median": med(lambda m: m["timing_s/update_actor"]),
        "sync_seconds_median": med(lambda m: m["timing_s/update_weights"]),
        "rollout_share": med(lambda m: rollout_seconds(m) / m["timing_s/step"]),
        "learner_idle_share": med(lambda m: m["timing_s/wait_rollout"] / m["timing_s/step"]),
        "staleness_mean": round(statistics.mean(m["rollout/staleness"] for m in steps), 3),
        "reward_mean": round(statistics.mean(m["reward/mean"] for m in steps), 4),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--repeats", type=int, default=1,
                    help="pairs of runs (rollout_ahead 0, then 1) per worker count, interleaved so drift in the "
                         "machine's speed hits both; speedup is the median of the pairs' ratios")
    ap.add_argument("--sync-sizes", nargs="*", default=["tiny", "25M", "100M"],
                    help="bench/sync.py model sizes for the sync measurement (none: skip it)")
    ap.add_argument("--sync-repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="config overrides applied to every configuration")
    args = ap.parse_args(argv)
    if args.steps < 3:
        ap.error("--steps must be >= 3 (the first and last steps are left out of the medians)")
    base = [f"trainer.total_steps={args.steps}", "trainer.val_before_train=false", "trainer.val_every=0",
            "trainer.save_every=0", *args.overrides]
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    result = {"recipe": args.recipe, "steps": args.steps, "repeats": args.repeats, "overrides": args.overrides,
              "configs": {}, "speedup": {}, "speedup_pairs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.workers:
            runs, pairs = {0: [], 1: []}, []
            for r in range(args.repeats):
                seconds = {}
                for ahead in (0, 1):
                    name = f"workers={n},rollout_ahead={ahead}"
                    cfg = config(args.recipe, [*base, f"rollout.num_workers={n}", f"trainer.rollout_ahead={ahead}"])
                    runs[ahead].append(run(cfg, Path(tmp) / f"{name.replace(',', '_')}_{r}"))
                    this = summarize(runs[ahead][-1])
                    seconds[ahead] = this["step_seconds_median"]
                    print(json.dumps({name: this, "repeat": r}), file=sys.stderr, flush=True)
                pairs.append(round(seconds[0] / seconds[1], 3))
            for ahead in (0, 1):
                result["configs"][f"workers={n},rollout_ahead={ahead}"] = summarize(*runs[ahead])
            result["speedup"][f"workers={n}"] = round(statistics.median(pairs), 3)
            result["speedup_pairs"][f"workers={n}"] = pairs
    if args.sync_sizes:
        from bench.sync import measure

        with contextlib.redirect_stdout(sys.stderr):
            result["sync"] = measure(args.sync_sizes, workers=2, repeats=args.sync_repeats)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
