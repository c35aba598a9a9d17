import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rl.tracking
from rl.tracking import CURVES_FILE, METRICS_FILE, RAY_GAUGES, RUN_ID_FILE, Tracker, read_metrics


def step_metrics(step):
    return {"reward/mean": 0.1 * step, "timing_s/step": 2.5, "actor/pg_loss": -0.01 * step,
            "actor/kl_loss": 0.001, "perf/throughput": 812.4, "perf/rollout_tokens_per_s": 300.0}


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path / "run"


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_metrics_jsonl_and_console_line_once_per_step(tmp_path, capsys):
    with Tracker(tmp_path, ["console"], experiment_name="exp", total_steps=12) as tr:
        for step in (1, 2, 3):
            tr.log(step, step_metrics(step))
        tr.log(4, {**step_metrics(4), "val/accuracy": 0.75, "val/arith/accuracy": 0.5})
    recs = lines(tmp_path / METRICS_FILE)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(next(iter(r)) == "step" for r in recs)
    assert math.isclose(recs[2]["reward/mean"], 0.3) and recs[3]["val/arith/accuracy"] == 0.5
    out = capsys.readouterr().out.splitlines()
    step_lines = [line for line in out if line.startswith("step")]
    assert len(step_lines) == 4
    assert step_lines[0] == "step  1/12 | reward 0.1000 | pg_loss -0.01 | kl 0.001 | s/step 2.50 | tok/s 812"
    assert "val_acc 0.7500" in step_lines[3]


def test_truncate_after_on_resume(tmp_path):
    tr = Tracker(tmp_path, ["console"], total_steps=10)
    for step in range(1, 6):
        tr.log(step, {"reward/mean": float(step)})
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 6, "rew')  # crash mid-line
    tr.truncate_after(3)
    assert tr.bar.n == tr.bar.initial == 3
    assert [r["step"] for r in lines(tmp_path / METRICS_FILE)] == [1, 2, 3]
    dropped = (tmp_path / (METRICS_FILE + ".dropped")).read_text().splitlines()
    assert dropped == ['{"step": 4, "reward/mean": 4.0}', '{"step": 5, "reward/mean": 5.0}', '{"step": 6, "rew']
    tr.log(4, {"reward/mean": 40.0})
    tr.close()
    resumed = Tracker(tmp_path, [])
    resumed.log(5, {"reward/mean": 50.0})
    resumed.close()
    logged = [(r["step"], r["reward/mean"]) for r in lines(tmp_path / METRICS_FILE)]
    assert logged[2:] == [(3, 3.0), (4, 40.0), (5, 50.0)]


def test_torn_last_line_is_not_joined_to_the_next_record(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "reward/mean": 1.0}\n{"step": 2, "rew')
    tr = Tracker(tmp_path, [])
    tr.log(2, {"reward/mean": 2.0})
    with pytest.warns(UserWarning, match="unparsable"):  # plot() at close reads the file too
        tr.close()
    with pytest.warns(UserWarning, match=f"{METRICS_FILE}:2"):
        assert [r["step"] for r in read_metrics(tmp_path / METRICS_FILE)] == [1, 2]


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="tensorboard"):
        Tracker(tmp_path, ["console", "tensorboard"])
    tr = Tracker(tmp_path, [])
    with pytest.raises(TypeError, match="'reward/mean'.*str"):
        tr.log(1, {"reward/mean": "high"})
    with pytest.raises(ValueError, match="'step' is reserved"):
        tr.log(1, {"step": 1})
    tr.close()


def test_plot_writes_png_at_validation_steps_and_close(tmp_path):
    tr = Tracker(tmp_path, [], experiment_name="exp")
    out = tmp_path / CURVES_FILE
    for step in range(1, 6):
        extra = {"val/accuracy": 0.2 * step, "val/arith/accuracy": 0.1 * step} if step % 2 == 0 else {}
        tr.log(step, {**step_metrics(step), **extra})
        assert out.exists() == (step >= 2)  # drawn on the first step with validation metrics
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    out.unlink()
    assert tr.plot() == out
    out.unlink()
    tr.close()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_panels_follow_the_logged_validation_metrics(tmp_path):
    def titles(val):
        tr = Tracker(tmp_path / str(len(list(tmp_path.iterdir()))), [], experiment_name="exp")
        tr.log(1, {"reward/mean": 0.5, **val})
        tr.close()
        return [title for title, _ in tr.panels(read_metrics(tr.metrics_path))]

    scores = {"val/t2i/clip_score": 40.0, "val/t2i/clip_score_reference": 90.0}
    assert titles({"val/accuracy": 0.5}) == ["reward", "validation accuracy"]
    # the validation reward's mean and timeout count are not answer scores: no panel of their own
    assert titles({"val/accuracy": 0.5, "val/reward/mean": 1.0, "val/reward/timeouts": 0}) == [
        "reward", "validation accuracy"]
    assert titles(scores) == ["reward", "validation scores"]  # text-to-image: no empty accuracy panel
    assert titles({"val/accuracy": 0.5, **scores}) == ["reward", "validation accuracy", "validation scores"]


def test_plot_has_diagnostic_panels_and_draws_identical_series_once(tmp_path):
    tr = Tracker(tmp_path, [], experiment_name="unigrpo", config={"algorithm": {"name": "unigrpo"}})
    for step in (1, 2, 3):
        val = {"val/accuracy": 0.1 * step, "val/arithmetic/accuracy": 0.1 * step,  # one task: the same values
               "val/countdown/accuracy": 0.05 * step} if step != 2 else {}
        tr.log(step, {**step_metrics(step), "response_length/mean": 20.0 + step, "reward/frac_zero_std": 0.25,
                      **val})
    panels = dict(tr.panels(read_metrics(tr.metrics_path)))
    assert list(panels) == ["reward", "validation accuracy", *(title for title, _ in rl.tracking.DIAGNOSTIC_PANELS)]
    labels = [label for label, _ in panels["validation accuracy"]]
    assert labels == ["val/accuracy = val/arithmetic/accuracy", "val/countdown/accuracy"]
    assert panels["validation accuracy"][0][1] == [(1, 0.1), (3, pytest.approx(0.3))]
    for (title, key), (label, points) in zip(rl.tracking.DIAGNOSTIC_PANELS,
                                             (panels[t][0] for t, _ in rl.tracking.DIAGNOSTIC_PANELS)):
        assert label == key and [s for s, _ in points] == [1, 2, 3]
    fig = tr.figure()
    drawn = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in drawn] == list(panels)
    assert len(drawn[1].lines) == 2  # the identical accuracy series is one line
    assert fig.get_suptitle() == "algorithm unigrpo"
    tr.close()
    assert (tmp_path / CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnostic_panels_only_for_logged_metrics(tmp_path):
    tr = Tracker(tmp_path, [])
    tr.log(1, {"reward/mean": 0.5, "actor/pg_loss": 0.1})  # e.g. an older run without the newer metrics
    titles = [title for title, _ in tr.panels(read_metrics(tr.metrics_path))]
    assert titles == ["reward", "validation accuracy", "policy loss (actor/pg_loss)"]
    tr.close()


def test_title_names_experiment_recipe_and_algorithm(monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    assert rl.tracking._title("exp", None) == "exp"
    assert rl.tracking._title("spg", {"algorithm": {"name": "spg"}}) == "algorithm spg"
    hydra_cfg = OmegaConf.create({"hydra": {"runtime": {"choices": {"recipe": "t2i_tiny"}}}})
    monkeypatch.setattr(HydraConfig.instance(), "cfg", hydra_cfg)
    assert HydraConfig.initialized()
    assert rl.tracking._title("mine", {"algorithm": {"name": "unigrpo"}}) == "mine (recipe t2i_tiny, algorithm unigrpo)"


def test_wandb_offline_run_and_resume_reuse_the_id(wandb_env):
    run_dir = wandb_env
    tr = Tracker(run_dir, ["wandb"], project="dllm-rl-test", experiment_name="exp", config={"lr": 1e-4},
                 wandb_mode="online")  # WANDB_MODE=offline in the environment wins
    run_id = (run_dir / RUN_ID_FILE).read_text()
    assert run_id == tr.wandb_id and tr.wandb_run.id == run_id
    assert tr.wandb_run.settings.mode == "offline"
    tr.log(1, {"reward/mean": 0.5})
    tr.close()
    runs = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))

    resumed = Tracker(run_dir, ["wandb"], project="dllm-rl-test", experiment_name="exp")
    assert resumed.wandb_run.id == run_id
    resumed.log(2, {"reward/mean": 0.6})
    resumed.close()
    # a resume within the same second gets a "-1" suffix on its directory name
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}*"))) == 2
    assert (run_dir / RUN_ID_FILE).read_text() == run_id


def test_ray_gauges_created_when_ray_is_initialised(tmp_path, no_ray):
    ray = pytest.importorskip("ray")
    tr = Tracker(tmp_path, [], experiment_name="exp")
    tr.log(1, step_metrics(1))
    assert tr._gauges is None  # Ray not initialised: nothing exported
    ray.init(_node_ip_address="127.0.0.1", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        tr.log(2, {**step_metrics(2), "timing_s/step": float("nan")})
        assert {k: g.info["name"] for k, g in tr._gauges.items()} == {k: n for k, (n, _) in RAY_GAUGES.items()}
        tr.log(3, {"reward/mean": 0.3})  # a step lacking some metrics only sets the ones present
    finally:
        ray.shutdown()
    tr.close()


def test_module_works_without_ray(tmp_path, monkeypatch, capsys):
    tree = ast.parse(Path(rl.tracking.__file__).read_text())
    top_level = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top_level |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert "ray" not in top_level and "wandb" not in top_level
    monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` now raises ImportError
    tr = Tracker(tmp_path, ["console"], total_steps=1)
    tr.log(1, {"reward/mean": 1.0})
    tr.close()
    assert capsys.readouterr().out.startswith("step 1/1 | reward 1.0000")


def test_train_log_holds_the_step_lines_and_the_console_shows_each_once(tmp_path):
    """`python -m rl.train` under Hydra's own job logging, with a stand-in driver that logs two steps through
    a Tracker: train.log in the run dir gets the step lines, the console gets each once (from tqdm.write)."""
    run_dir = tmp_path / "run"
    script = f"""
import runpy, sys, types
from rl.tracking import Tracker

class FakeDriver:
    def __init__(self, cfg, run_dir):
        self.tracker = Tracker(run_dir, list(cfg.trainer.logger), total_steps=2)

    def fit(self):
        self.tracker.log(1, {{"reward/mean": 0.5}})
        self.tracker.log(2, {{"reward/mean": 0.75}})

    def close(self):
        self.tracker.close()

sys.modules["rl.driver"] = types.SimpleNamespace(Driver=FakeDriver)
sys.argv = ["rl.train", "hydra.run.dir={run_dir}"]
runpy.run_module("rl.train", run_name="__main__", alter_sys=True)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    log = (run_dir / "train.log").read_text().splitlines()
    steps = [line.split(" - ", 1)[1] for line in log if "[dllm_rl.steps][INFO]" in line]
    assert steps == ["step 1/2 | reward 0.5000", "step 2/2 | reward 0.7500"]
    assert [line for line in (out.stdout + out.stderr).splitlines() if "step " in line] == steps


def test_quiet_libraries_silences_the_repeated_warnings_and_bars():
    """In a fresh process: no DeepSpeed accelerator warning at import, no transformers progress bars, and
    DeepSpeed's scheduler warning and torch's warnings about ZeRO-3's deprecated collectives dropped, while
    other warnings still show."""
    script = """
import logging, os, warnings
from rl.tracking import quiet_libraries
quiet_libraries("cpu")
import deepspeed
from deepspeed.utils import logger
from transformers.utils import logging as tlog
logger.warning("Attempting to get learning rate from scheduler before it has started")
logger.warning("a warning that matters")
for fn in ("all_gather_into_tensor", "reduce_scatter_tensor"):  # as torch warns when ZeRO-3 calls them
    warnings.warn(f"`torch.distributed.{fn}` is deprecated. Please use ... instead.", FutureWarning)
warnings.warn("`torch.distributed.other` is deprecated", FutureWarning)
print("bars", tlog.is_progress_bar_enabled(), os.environ["DS_ACCELERATOR"])
"""
    env = {k: v for k, v in os.environ.items() if k not in rl.tracking.quiet_env("cpu")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "Setting accelerator to CPU" not in text and "before it has started" not in text
    assert "a warning that matters" in text
    assert "all_gather_into_tensor" not in text and "reduce_scatter_tensor" not in text
    assert "`torch.distributed.other` is deprecated" in text
    assert "bars False cpu" in text
    # A user's own setting wins over the defaults.
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=300,
                         env={**env, "HF_HUB_DISABLE_PROGRESS_BARS": "0"})
    assert "bars True cpu" in out.stdout, out.stderr[-3000:]


def test_quiet_runtime_env_reaches_actors_with_their_own_env_vars(tmp_path, no_ray):
    """The job-level runtime_env of quiet_runtime_env quiets actors that pass their own env_vars too (as
    the driver's actors do for the thread counts): Ray merges the env_vars and runs the setup hook."""
    ray = pytest.importorskip("ray")

    @ray.remote
    class Probe:
        def state(self):
            import logging
            import os

            from transformers.utils import logging as tlog

            return (os.environ.get("DS_ACCELERATOR"), os.environ.get("OMP_NUM_THREADS"),
                    tlog.is_progress_bar_enabled(),
                    rl.tracking._DEEPSPEED_NOISE in logging.getLogger("DeepSpeed").filters)

    ray.init(_node_ip_address="127.0.0.1", num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env=rl.tracking.quiet_runtime_env("cpu"))
    try:
        probe = Probe.options(runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}).remote()
        assert ray.get(probe.state.remote(), timeout=120) == ("cpu", "1", False, True)
    finally:
        ray.shutdown()
