"""Compare the learning curves of finished runs: val accuracy against step and wall-clock time.

    python -m bench.learning RUN_DIR [RUN_DIR ...] [--plot docs/learning.png]

Prints one JSON object: per run, the validation accuracy at each validation step, the seconds of
training up to it (sum of timing_s/step), and the gain over step 0 at the end and at the best step.

    python -m bench.learning --se [CHECKPOINT] [--prompts 512] [--k 8] [--seed 0] [OVERRIDE ...]

Held-out accuracy of one policy (default: the shipped tiny model; or a run's
checkpoints/global_step_N/actor/hf) with its standard error clustered by prompt: k answers to each of
`--prompts` held-out prompts (task.val's rows for that seed, sampled as validation samples them),
the SE of the mean of the per-prompt accuracies, and the split of the variance into between-prompt
(difficulty) and within-prompt (sampling) parts, from which the SE of any validation design
(P prompts x n answers) follows: SE^2 = (var_between + var_within / n) / P.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rl.tracking import read_metrics


def summarize(run_dir: Path) -> dict:
    metrics = read_metrics(run_dir / "metrics.jsonl")
    elapsed, curve = 0.0, []
    for m in metrics:
        elapsed += m.get("timing_s/step", 0.0)
        if "val/accuracy" in m:
            curve.append({"step": m["step"], "train_seconds": round(elapsed, 1), "val_accuracy": m["val/accuracy"]})
    steps = [m for m in metrics if "timing_s/step" in m]
    return {
        "curve": curve,
        "val_accuracy_start": curve[0]["val_accuracy"] if curve else None,
        "val_accuracy_end": curve[-1]["val_accuracy"] if curve else None,
        "gain": round(curve[-1]["val_accuracy"] - curve[0]["val_accuracy"], 4) if curve else None,
        # The curve is noisy (one sample per held-out prompt), so the peak is reported beside the end.
        "best_gain": round(max(c["val_accuracy"] for c in curve) - curve[0]["val_accuracy"], 4) if curve else None,
        "median_step_seconds": sorted(m["timing_s/step"] for m in steps)[len(steps) // 2] if steps else None,
        "median_gen_share": (sorted(m["timing_s/gen"] / m["timing_s/step"] for m in steps)[len(steps) // 2]
                             if steps else None),
    }


def clustered_se(acc) -> dict:
    """acc: [P, k] 0/1 outcomes, k answers per prompt. The SE of the mean of per-prompt accuracies and
    the variance components (unbiased: within = mean p(1-p) estimated with k/(k-1))."""
    import torch

    acc = torch.as_tensor(acc, dtype=torch.float64)
    P, k = acc.shape
    per_prompt = acc.mean(1)
    var_means = per_prompt.var(unbiased=True).item()
    within = (per_prompt * (1 - per_prompt)).mean().item() * k / (k - 1) if k > 1 else float("nan")
    between = max(var_means - within / k, 0.0) if k > 1 else float("nan")

    def design(p, n):
        return round(100 * ((between + within / n) / p) ** 0.5, 2)

    return {"prompts": P, "k": k, "accuracy": round(per_prompt.mean().item(), 4),
            "se_points": round(100 * (var_means / P) ** 0.5, 2),
            "var_between": round(between, 4), "var_within": round(within, 4),
            "se_points_by_design": {f"{p}x{n}": design(p, n) for p in (128, 256, 512, 1024) for n in (1, 2, 4, 8)}}


def evaluate_se(checkpoint: str | None, prompts: int, k: int, seed: int, overrides: list[str]) -> dict:
    """Per-prompt held-out accuracy of a policy, sampled and scored as the driver's validation does."""
    from dataclasses import replace

    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rewards.worker import RewardWorker
    from rl.data.loader import load_split
    from rl.models import TINY_CHECKPOINT, load_checkpoint
    from rollout.rollout import rollout, sampler_config

    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"seed={seed}", *overrides])
    torch.set_num_threads(cfg.ray.threads_per_actor)
    task = OmegaConf.to_container(cfg.task, resolve=True)
    task["val"] = {name: prompts for name in task["val"]}
    rows = load_split(task, "val", seed)
    model, tok = load_checkpoint(checkpoint or str(TINY_CHECKPOINT))
    model.eval()
    sampler = replace(sampler_config(OmegaConf.to_container(cfg.rollout)), temperature=cfg.rollout.val_temperature)
    with torch.no_grad():
        batch = rollout(model, tok, rows, k, sampler, torch.Generator().manual_seed(seed), 256)
    accuracy = [cfg.reward.accuracy] if isinstance(cfg.reward.accuracy, str) else list(cfg.reward.accuracy)
    worker = RewardWorker(OmegaConf.to_container(cfg.reward.functions, resolve=True), accuracy)
    try:
        scores = worker.score([r["prompt"] for r in batch.extras["rows"]], batch.extras["completions"],
                              batch.extras["rows"])
    finally:
        worker.close()
    acc = torch.tensor(scores.accuracy, dtype=torch.float64).view(len(rows), k)
    return {"checkpoint": checkpoint or str(TINY_CHECKPOINT), "seed": seed, **clustered_se(acc)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--se", action="store_true", help="clustered SE of one policy's held-out accuracy")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("runs", nargs="*")
    ap.add_argument("--plot", type=Path)
    args = ap.parse_intermixed_args(argv)
    if args.se:
        checkpoint = next((r for r in args.runs if "=" not in r), None)
        result = evaluate_se(checkpoint, args.prompts, args.k, args.seed, [r for r in args.runs if "=" in r])
        print(json.dumps(result, indent=2))
        return result
    result = {str(r): summarize(Path(r)) for r in args.runs}
    print(json.dumps(result, indent=2))
    if args.plot:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for run, s in result.items():
            ax.plot([p["train_seconds"] / 60 for p in s["curve"]], [p["val_accuracy"] for p in s["curve"]],
                    marker="o", label=Path(run).name)
        ax.set_xlabel("training minutes (2 CPU cores)")
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        FigureCanvasAgg(fig).print_png(str(args.plot))
    return result


if __name__ == "__main__":
    main()
