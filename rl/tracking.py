"""Metrics output for a training run: metrics.jsonl, console line + progress bar, wandb, Ray gauges, curves.png,
and the quieting of library output that would drown the console line.

    tracker = Tracker(run_dir, ["console", "wandb"], "dllm-rl", "unigrpo", config, total_steps=40)
    tracker.truncate_after(resumed_step)      # on resume, before the first log
    tracker.log(step, metrics)                # once per step, with all of that step's metrics;
                                              # redraws curves.png when they include val accuracy
    tracker.close()                           # or use the Tracker as a context manager

metrics.jsonl is always written (one {"step": N, ...} object per line) and is what plot() reads. Each
step's console line is also logged at INFO to the STEP_LOGGER logger, so a log file (Hydra's train.log
in the run dir, see rl/train.py) holds it too.
wandb runs offline unless WANDB_MODE (which wins) or `wandb_mode` says otherwise; its run id is kept
in <run_dir>/wandb_run_id.txt so a resumed run continues the same curve.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import secrets
import sys
import warnings
from pathlib import Path

from tqdm import tqdm

from rl.errors import write_atomic

LOGGERS = ("console", "wandb")
METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "wandb_run_id.txt"
CURVES_FILE = "curves.png"
STEP_LOGGER = "dllm_rl.steps"
# Metric -> Ray gauge. Ray metric names must match [a-zA-Z_:][a-zA-Z0-9_:]*.
RAY_GAUGES = {
    "reward/mean": ("dllm_rl_reward_mean", "Mean rollout reward of the last training step"),
    "perf/rollout_tokens_per_s": ("dllm_rl_rollout_tokens_per_s", "Generated tokens per second in rollouts"),
    "timing_s/step": ("dllm_rl_step_seconds", "Wall-clock seconds of the last training step"),
}
# (metric, label, format) of the console line, in order; absent metrics are left out.
CONSOLE_FIELDS = (
    ("reward/mean", "reward", ".4f"),
    ("val/accuracy", "val_acc", ".4f"),
    ("actor/pg_loss", "pg_loss", ".4g"),
    ("actor/kl_loss", "kl", ".4g"),
    ("timing_s/step", "s/step", ".2f"),
    ("perf/throughput", "tok/s", ".0f"),
)
# (title, metric) of the curves.png panels after reward and validation, drawn only for metrics the run logged.
DIAGNOSTIC_PANELS = (
    ("KL to reference (actor/kl_loss)", "actor/kl_loss"),
    ("policy loss (actor/pg_loss)", "actor/pg_loss"),
    ("response length (mean)", "response_length/mean"),
    ("groups with zero reward spread", "reward/frac_zero_std"),
)
PANEL_COLUMNS = 4


# ---- a quiet console ---------------------------------------------------------------------------
# Output that every process of a run (the driver and each Ray actor) repeats and that a user can do
# nothing about. transformers' own warnings (missing or unexpected weights of a real checkpoint) are
# kept: they are worth reading.
def quiet_env(device: str = "cpu") -> dict[str, str]:
    """Environment variables that silence the repeated library output; read at import, so they must be
    in a process's environment before it imports transformers or DeepSpeed."""
    # transformers' "Loading weights" and "Writing model shards" bars: one per model load and checkpoint.
    env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if device == "cpu":
        # Without an override DeepSpeed probes for accelerators at import and warns in every process that it
        # fell back to the CPU. On a CPU run the CPU accelerator is the right one even where GPUs exist.
        env["DS_ACCELERATOR"] = "cpu"
    return env


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


# DeepSpeed's WarmupLR computes its first rate in its own constructor, before it has stepped, and then
# warns about that call ("... before it has started") in every learner.
_DEEPSPEED_NOISE = _DropMessages("Attempting to get learning rate from scheduler before it has started")


# DeepSpeed's ZeRO-3 calls torch.distributed collectives that torch has deprecated, and torch warns about
# them in every learner (a two-node ZeRO-3 run printed ten such lines); only a DeepSpeed release can act on it.
_TORCH_DEPRECATIONS = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


def quiet_libraries(device: str | None = None) -> None:
    """Quiet this process: quiet_env(device) as defaults (a variable already set wins, so
    HF_HUB_DISABLE_PROGRESS_BARS=0 brings the bars back), DeepSpeed's known-harmless scheduler warning
    and torch's deprecation warnings about DeepSpeed's ZeRO-3 collectives dropped.
    rl/train.py calls it in the driver before Ray starts, so local Ray workers inherit the environment;
    actors on other nodes get the environment through runtime_env env_vars and this function as Ray's
    worker_process_setup_hook (quiet_runtime_env)."""
    if device is not None:
        for key, value in quiet_env(device).items():
            os.environ.setdefault(key, value)
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes", "on"):
        transformers = sys.modules.get("transformers")
        if transformers is not None:
            # Already imported: it read the variable at import, too early to see it.
            transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=_TORCH_DEPRECATIONS, category=FutureWarning)
    deepspeed_logger = logging.getLogger("DeepSpeed")  # the logger DeepSpeed creates (or will) under that name
    if _DEEPSPEED_NOISE not in deepspeed_logger.filters:
        deepspeed_logger.addFilter(_DEEPSPEED_NOISE)


def quiet_runtime_env(device: str = "cpu") -> dict:
    """A job-level Ray runtime_env (ray.init(runtime_env=...)) that quiets every worker of the job: actors
    inherit it and their own env_vars are merged into it."""
    return {"env_vars": quiet_env(device), "worker_process_setup_hook": f"{__name__}.quiet_libraries"}


def _number(key: str, value) -> float | int:
    value = value.item() if hasattr(value, "item") else value  # torch / numpy scalars
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__} {value!r}")
    return value


def _title(experiment_name: str, config: dict | None) -> str:
    """curves.png's title: the experiment, the recipe (when Hydra composed the run) and the algorithm."""
    # Through sys.modules, like Ray below: a Tracker outside a Hydra app never imports Hydra.
    hydra_config = sys.modules.get("hydra.core.hydra_config")
    recipe = None
    if hydra_config is not None and hydra_config.HydraConfig.initialized():
        recipe = hydra_config.HydraConfig.get().runtime.choices.get("recipe")
    algorithm = ((config or {}).get("algorithm") or {}).get("name")
    details = [f"recipe {recipe}"] * bool(recipe) + [f"algorithm {algorithm}"] * bool(algorithm)
    if not details:
        return experiment_name
    # The driver names an experiment after its algorithm unless told otherwise: do not say it twice.
    return ", ".join(details) if experiment_name == algorithm else f"{experiment_name} ({', '.join(details)})"


def _is_val_accuracy(key: str) -> bool:
    return key == "val/accuracy" or (key.startswith("val/") and key.endswith("/accuracy"))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a torn line (a crash mid-write) is skipped with a warning."""
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    warnings.warn(f"{path}:{lineno}: skipping unparsable line {line[:80]!r}")
    return records


class Tracker:
    """One run's metrics sinks; `loggers` picks among LOGGERS (metrics.jsonl is always written)."""

    def __init__(self, run_dir: str | os.PathLike, loggers=("console",), project: str = "dllm-rl",
                 experiment_name: str | None = None, config: dict | None = None, total_steps: int | None = None,
                 wandb_mode: str = "offline", resume_id: str | None = None, title: str | None = None):
        unknown = sorted(set(loggers) - set(LOGGERS))
        if unknown:
            raise ValueError(f"trainer.logger: unknown logger(s) {unknown}; choose from {list(LOGGERS)}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.experiment_name = experiment_name or self.run_dir.name
        self.title = title or _title(self.experiment_name, config)
        self.total_steps = total_steps
        self.console = "console" in loggers
        self._file = None
        self._gauges = None
        self.bar = None
        if self.console:
            # disable=None hides the bar when stderr is not a terminal, so log files get clean lines.
            self.bar = tqdm(total=total_steps, desc=self.experiment_name, unit="step",
                            dynamic_ncols=True, disable=None)
        self.wandb_run = None
        self.wandb_id = None
        if "wandb" in loggers:
            self._init_wandb(project, config, wandb_mode, resume_id)

    def _init_wandb(self, project, config, wandb_mode, resume_id):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("trainer.logger includes 'wandb' but wandb is not installed (pip install wandb)") from e
        id_file = self.run_dir / RUN_ID_FILE
        run_id = resume_id or (id_file.read_text().strip() if id_file.is_file() else "") or secrets.token_hex(4)
        # Written before init: a crash during the run still leaves the id to resume with.
        write_atomic(id_file, run_id.encode())
        self.wandb_id = run_id
        self.wandb_run = wandb.init(project=project, name=self.experiment_name, config=config,
                                    mode=os.environ.get("WANDB_MODE") or wandb_mode, id=run_id,
                                    resume="allow", dir=str(self.run_dir))

    def truncate_after(self, step: int) -> None:
        """On resume from checkpoint `step`: move later records out of metrics.jsonl so re-run steps are not
        duplicated. They are appended to metrics.jsonl.dropped rather than deleted."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.bar is not None:
            # Counting from the resumed step keeps the bar's rate and ETA about this session's steps.
            self.bar.initial = self.bar.n = step
            self.bar.refresh()
        if not self.metrics_path.exists():
            return
        kept, dropped = [], []
        for line in self.metrics_path.read_text().splitlines(keepends=True):
            try:
                keep = json.loads(line)["step"] <= step
            except (json.JSONDecodeError, KeyError, TypeError):
                keep = False  # a torn line: only a crash mid-write makes one
            (kept if keep else dropped).append(line if line.endswith("\n") else line + "\n")
        if dropped:
            with open(self.metrics_path.with_name(METRICS_FILE + ".dropped"), "a") as f:
                f.writelines(dropped)
                f.flush()
                os.fsync(f.fileno())
            write_atomic(self.metrics_path, "".join(kept).encode())

    def log(self, step: int, metrics: dict) -> None:
        if "step" in metrics:
            raise ValueError("metrics: 'step' is reserved; pass it as the step argument")
        record = {"step": step, **{k: _number(k, v) for k, v in metrics.items()}}
        if self._file is None:
            # A crash mid-line leaves no trailing newline; start on a fresh line rather than join the torn one.
            self._file = open(self.metrics_path, "a+b")
            if self._file.tell() > 0:
                self._file.seek(-1, os.SEEK_END)
                if self._file.read(1) != b"\n":
                    self._file.write(b"\n")
        self._file.write(json.dumps(record).encode() + b"\n")
        self._file.flush()
        line = self.format_line(step, record)
        # To the log files whatever the loggers: rl/train.py keeps these records off the console, where
        # tqdm.write prints the line above the progress bar instead.
        logging.getLogger(STEP_LOGGER).info(line)
        if self.console:
            tqdm.write(line, file=sys.stdout)
            if self.bar is not None:
                self.bar.update(step - self.bar.n)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=step)
        self._export_ray(record)
        if any(k.startswith("val/") for k in record):
            self.plot()

    def format_line(self, step: int, record: dict) -> str:
        width = len(str(self.total_steps)) if self.total_steps else 1
        head = f"step {step:>{width}}" + (f"/{self.total_steps}" if self.total_steps else "")
        parts = [f"{label} {record[key]:{fmt}}" for key, label, fmt in CONSOLE_FIELDS if key in record]
        return " | ".join([head, *parts])

    def _export_ray(self, record: dict) -> None:
        # Ray can only be initialised if something already imported it; importing it here would cost seconds.
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            return
        if self._gauges is None:
            from ray.util.metrics import Gauge
            self._gauges = {key: Gauge(name, description, tag_keys=("experiment",))
                            for key, (name, description) in RAY_GAUGES.items()}
        for key, gauge in self._gauges.items():
            if key in record and math.isfinite(record[key]):
                gauge.set(record[key], tags={"experiment": self.experiment_name})

    def panels(self, records: list[dict]) -> list[tuple[str, list[tuple[str, list]]]]:
        """curves.png's panels as (title, [(label, [(step, value), ...]), ...]): reward, validation
        accuracies, other validation scores (such as val/t2i/clip_score and its reference) and the
        DIAGNOSTIC_PANELS the run logged. Series with the same points in a panel are drawn once, labelled
        with every name (in a single-task run val/accuracy is val/<task>/accuracy)."""
        val_keys = sorted({k for r in records for k in r if _is_val_accuracy(k)})
        # val/reward/* (the mean, the timeout count) is not a score of the answers' quality.
        score_keys = sorted({k for r in records for k in r if k.startswith("val/") and not _is_val_accuracy(k)
                             and not k.startswith("val/reward/")})
        groups = [("reward", ["reward/mean"])]
        # A run with no correctness reward (text-to-image) has scores only: no empty accuracy panel.
        if val_keys or not score_keys:
            groups.append(("validation accuracy", val_keys))
        if score_keys:
            groups.append(("validation scores", score_keys))
        groups += [(title, [key]) for title, key in DIAGNOSTIC_PANELS if any(key in r for r in records)]
        panels = []
        for title, keys in groups:
            series = []
            for key in keys:
                points = [(r["step"], r[key]) for r in records if key in r]
                same = next((i for i, (_, drawn) in enumerate(series) if drawn == points), None)
                if same is not None:
                    series[same] = (f"{series[same][0]} = {key}", points)
                elif points:
                    series.append((key, points))
            panels.append((title, series))
        return panels

    def figure(self):
        """The curves as a matplotlib Figure, read from metrics.jsonl; `title` above the panels."""
        # The object-oriented API with the Agg canvas draws without pyplot, so it never switches the
        # process-wide backend or needs a display.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        records = read_metrics(self.metrics_path) if self.metrics_path.exists() else []
        panels = self.panels(records)
        # At most PANEL_COLUMNS a row, rows filled evenly (six panels: 3 + 3, not 4 + 2).
        rows = math.ceil(len(panels) / PANEL_COLUMNS)
        cols = math.ceil(len(panels) / rows)
        fig = Figure(figsize=(4.5 * cols, 3.4 * rows + 0.6), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax, (title, series) in zip(axes, panels):
            for label, points in series:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, ms=3, label=label)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if series:
                ax.legend(fontsize=7)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(self.title)
        # Fixed margins: tight_layout would render the figure twice, and plot() runs at every validation.
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.6 / fig.get_figheight(),
                            top=1 - 0.6 / fig.get_figheight(), wspace=0.25, hspace=0.45)
        return fig

    def plot(self) -> Path:
        """Write curves.png (see figure())."""
        out = self.run_dir / CURVES_FILE
        buf = io.BytesIO()
        self.figure().savefig(buf, format="png")
        write_atomic(out, buf.getvalue())
        return out

    def close(self, exit_code: int = 0) -> None:
        """Finish wandb, close the bar and metrics file, and draw the final curves. Safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None
        self.plot()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(exit_code=1 if exc_type else 0)


def save_image_grid(path: str | os.PathLike, images, captions: list[str], truth=None, scale: int = 4,
                    columns: int = 4) -> None:
    """A PNG of uint8 [N, H, W, 3] images, each under its caption (and beside its ground truth, when
    given, on the left), so a run's image samples can be watched step by step."""
    import numpy as np
    from PIL import Image, ImageDraw

    images = np.asarray(images)
    n, h, w, _ = images.shape
    tile_w = w * scale * (2 if truth is not None else 1)
    text_h, line_chars = 36, max(8, tile_w // 6)
    rows = math.ceil(n / columns)
    sheet = Image.new("RGB", (columns * (tile_w + 8), rows * (h * scale + text_h + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        x, y = (i % columns) * (tile_w + 8), (i // columns) * (h * scale + text_h + 8)
        pics = [truth[i], images[i]] if truth is not None else [images[i]]
        for j, pic in enumerate(pics):
            sheet.paste(Image.fromarray(pic).resize((w * scale, h * scale), Image.NEAREST), (x + j * w * scale, y))
        words, lines = captions[i].split(), [""]
        for word in words:
            if len(lines[-1]) + len(word) + 1 > line_chars and lines[-1]:
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
        draw.multiline_text((x, y + h * scale + 2), "\n".join(lines[:3]), fill="black", spacing=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())
