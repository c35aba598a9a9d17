"""Compare the learning curves of finished runs: val accuracy against step and wall-clock time.

    python -m bench.learning RUN_DIR [RUN_DIR ...] [--plot docs/learning.png]

Prints one JSON object: per run, the validation accuracy at each validation step, the seconds of
training up to it (sum of timing_s/step), and the gain over step 0 at the end and at the best step.
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    result = {str(r): summarize(r) for r in args.runs}
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
