"""End-to-end: the driver with real Ray actors, learner, rewards and the shipped tiny checkpoint."""
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import ray
import torch
from safetensors.torch import load_file

from rl.driver import Driver
from rl.tracking import read_metrics
from tests.conftest import ROOT, SMALL, compose_cfg

TIMING = ("timing_s/", "perf/")


def run(tmp_path, *overrides, name="run"):
    driver = Driver(compose_cfg(*overrides), tmp_path / name)
    try:
        driver.fit()
    finally:
        driver.close()
    return read_metrics(tmp_path / name / "metrics.jsonl")


def test_two_steps_write_metrics_checkpoints_and_curve(local_ray, tmp_path):
    metrics = run(tmp_path)
    assert [m["step"] for m in metrics] == [0, 1, 2]
    step = metrics[1]
    for key in ("timing_s/gen", "timing_s/reward", "timing_s/update_actor", "timing_s/update_weights", "timing_s/step",
                "perf/throughput", "response_length/mean", "reward/mean", "reward/math/mean", "reward/format/mean",
                "actor/pg_loss", "actor/pg_clipfrac", "actor/kl_loss", "actor/grad_norm",
                "val/accuracy", "val/arithmetic/accuracy", "rollout/tokens_per_step", "reward/frac_zero_std",
                "reward/timeouts", "val/reward/timeouts", "reward/math/timeouts"):
        assert key in step, key
    assert step["rollout/tokens_per_step"] > 1  # the default fast sampler commits several tokens per step
    assert "val/accuracy" in metrics[0]
    run_dir = tmp_path / "run"
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert sorted(p.name for p in ckpts.glob("global_step_*")) == ["global_step_1", "global_step_2"]


def final_weights(run_dir):
    return load_file(str(next((run_dir / "checkpoints" / "global_step_4" / "actor" / "hf").glob("*.safetensors"))))


@pytest.mark.slow
def test_resume_continues_exactly(local_ray, tmp_path):
    """4 steps straight == resume from the step-2 checkpoint + 2 steps: same weights, same metrics. The
    resume is resume=auto in a copy of the run whose newest checkpoint is damaged, so the driver also
    shows it falls back to the intact older one, naming the damaged file. (A checkpoint named in
    trainer.resume resumes exactly in test_rollout_ahead_overlaps_one_stale_step_and_resumes_exactly.)"""
    straight = run(tmp_path, "trainer.total_steps=4", "trainer.save_every=2", name="a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    newest = tmp_path / "b" / "checkpoints" / "global_step_4"
    biggest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    (tmp_path / "b" / "metrics.jsonl").write_text("")
    with pytest.warns(UserWarning, match=rf"global_step_4 is damaged: .*{biggest.name}.*resuming from .*global_step_2"):
        resumed = run(tmp_path, "trainer.total_steps=4", "trainer.save_every=2", "trainer.resume=auto", name="b")

    def stable(ms):
        return [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in ms]

    assert [m["step"] for m in resumed] == [3, 4]
    assert stable(straight)[3:] == stable(resumed)
    # The resumed run wrote its own step 4 over the damaged copy, so its weights are its own.
    assert biggest.read_bytes() != bytes(data)
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dead_actors_are_named_restarted_and_the_step_retried_or_failed_cleanly(local_ray, tmp_path, caplog):
    driver = Driver(compose_cfg("trainer.total_steps=3", "trainer.val_before_train=false", "trainer.val_every=0"),
                    tmp_path / "run")
    try:
        with caplog.at_level(logging.WARNING, logger="dllm_rl"):
            ray.kill(driver.actors.rollout[0], no_restart=True)
            driver.cfg.trainer.total_steps = 1
            driver.fit()
            assert "rollout-0 died" in caplog.text and "restarted rollout-0" in caplog.text
            ray.kill(driver.actors.reward[0], no_restart=True)
            driver.cfg.trainer.total_steps = 2
            driver.fit()
            assert "reward-0 died" in caplog.text and "restarted reward-0" in caplog.text
        ray.kill(driver.actors.reward[0], no_restart=True)
        driver.cfg.trainer.on_actor_failure = "fail"
        driver.cfg.trainer.total_steps = 3
        with pytest.raises(RuntimeError, match="actor reward-0 died"):
            driver.fit()
    finally:
        driver.close()
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not (ckpts / "global_step_3").exists()


def test_placement_timeout_names_missing_resources(local_ray, tmp_path):
    with pytest.raises(RuntimeError, match=r"could not place 9 rollout .* need \{'CPU': 11"):
        Driver(compose_cfg("rollout.num_workers=9", "trainer.prompts_per_step=9", "ray.placement_timeout_s=2"),
               tmp_path / "run")


@pytest.mark.slow
def test_cli_writes_metrics_to_hydra_run_dir(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "rl.train", f"hydra.run.dir={tmp_path}", *SMALL,
                          "trainer.total_steps=1", "trainer.save_every=0"],
                         check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1] and "reward/mean" in lines[1]
    bad = subprocess.run([sys.executable, "-m", "rl.train", f"hydra.run.dir={tmp_path / 'bad'}",
                          "algorithm.group_size=1"], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "algorithm.group_size=1: expected an integer >= 2" in bad.stderr + bad.stdout


def test_rollout_batches_of_several_workers_concat_and_select():
    from rl.batch import RolloutBatch

    def part(P, B, first):
        return RolloutBatch(torch.full((B, P), 7), torch.ones(B, P, dtype=torch.long), torch.full((B, 3), first),
                            torch.ones(B, 3), group_size=2, rows=[{"i": first + j} for j in range(B)],
                            completions=["a"] * B, images=[None] * B, commit_step=torch.zeros(B, 3),
                            tokens_per_step=torch.ones(B), seconds=float(first))

    batch = RolloutBatch.concat([part(2, 2, 0), part(4, 4, 2)], pad_id=0)
    assert batch.prompt_ids.tolist()[0] == [0, 0, 7, 7] and batch.prompt_mask.tolist()[0] == [0, 0, 1, 1]
    assert batch.answer_ids[:, 0].tolist() == [0, 0, 2, 2, 2, 2] and [r["i"] for r in batch.rows] == list(range(6))
    assert len(batch) == 6 and batch.commit_step.shape == (6, 3) and batch.seconds == 2.0 and batch.rewards is None
    half = batch.select(slice(2, 4))
    assert len(half) == 2 and [r["i"] for r in half.rows] == [2, 3] and half.tokens_per_step.shape == (2,)


def test_reward_metrics_log_verl_extras_and_the_groups_without_spread():
    from rewards.worker import Scores
    from rl.batch import RolloutBatch
    from rl.metrics import batch_metrics

    B = 6  # three groups of two: spread, none (both 1), none (both 0)
    batch = RolloutBatch(torch.ones(B, 2, dtype=torch.long), torch.ones(B, 2, dtype=torch.long),
                         torch.zeros(B, 4, dtype=torch.long), torch.ones(B, 4), group_size=2,
                         rewards=torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0]), images=[None] * B,
                         tokens_per_step=torch.ones(B), rows=[{}] * B, seconds=1.0)
    scores = Scores([0.0] * B, [float("nan")] * B, {"exact": [0.0] * B},
                    extras={"exact/len": [3, 5, None, 1, 1, 2], "exact/source": ["d"] * B, "exact/hit": [True] * B})
    m = batch_metrics(batch, scores, 4, 1.0)
    assert m["reward/exact/len"] == 2.4 and m["reward/exact/hit"] == 1.0 and "reward/exact/source" not in m
    assert m["reward/frac_zero_std"] == pytest.approx(2 / 3)


def warnings_of(driver_cfg, steps: list[dict], caplog) -> list[str]:
    """The no-learning warnings of Driver._warn_no_learning over steps of metrics (no actors needed)."""
    driver = object.__new__(Driver)
    driver.cfg, driver._skip_streak = driver_cfg, 0
    with caplog.at_level(logging.WARNING, logger="dllm_rl"):
        for driver.step, metrics in enumerate(steps, 1):
            driver._warn_no_learning(metrics)
    return [r.getMessage() for r in caplog.records]


def test_a_streak_of_skipped_optimizer_steps_and_a_step_without_spread_are_warned(caplog):
    cfg = compose_cfg("algorithm.mu=2")
    skipped = {"actor/skipped_steps": 2.0, "reward/frac_zero_std": 0.5}
    fine = {"actor/skipped_steps": 1.0, "reward/frac_zero_std": 0.5}
    # trainer.skip_warn_steps defaults to 3: warned once per streak of 3, and again after a fresh streak.
    warned = warnings_of(cfg, [skipped] * 5 + [fine] + [skipped] * 3, caplog)
    assert len(warned) == 2 and warned[0].startswith("steps 1-3: 3 training steps in a row skipped every optimizer")
    assert warned[1].startswith("steps 7-9:") and "reward scale" in warned[0] and "trainer.optim.lr" in warned[0]
    caplog.clear()
    warned = warnings_of(cfg, [{**fine, "reward/frac_zero_std": 1.0}], caplog)
    assert len(warned) == 1 and "step 1: every group's rewards are equal" in warned[0] and "no gradient" in warned[0]


@pytest.mark.slow
def test_rollout_ahead_overlaps_one_stale_step_and_resumes_exactly(local_ray, tmp_path, caplog):
    """rollout_ahead=1 with 2 rollout workers: a step after an overlapped one trains on answers one
    update stale (and the learner did not wait for them); a checkpointed step generates nothing ahead,
    so resuming from it regenerates the next batch from the saved weights exactly as the uninterrupted
    run did (same metrics, same weights), even when a rollout worker is SIGKILLed during the resumed
    run's overlapped rollout (its replacement takes its peer's pre-update weights)."""
    ahead = ("trainer.total_steps=4", "trainer.save_every=2", "trainer.rollout_ahead=1", "rollout.num_workers=2")
    straight = run(tmp_path, *ahead, name="a")
    assert [m["rollout/staleness"] for m in straight[1:]] == [0.0, 1.0, 0.0, 1.0]
    assert [m["timing_s/wait_rollout"] > 0 for m in straight[1:]] == [True, False, True, False]
    assert ["timing_s/rollout_ahead" in m for m in straight[1:]] == [True, False, True, False]

    def stable(ms):
        return [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in ms]

    step2 = tmp_path / "a" / "checkpoints" / "global_step_2"
    driver = Driver(compose_cfg(*ahead, f"trainer.resume={step2}"), tmp_path / "b")
    original, calls = driver._rollout, []

    def killed_during_the_overlap(rows, step):
        calls.append(step)
        if len(calls) == 2:  # step 4's batch, generated during step 3's update
            pid = ray.get(driver.actors.rollout[0].__ray_call__.remote(lambda self: os.getpid()))
            os.kill(pid, 9)
        return original(rows, step)

    driver._rollout = killed_during_the_overlap
    try:
        with caplog.at_level(logging.WARNING, logger="dllm_rl"):
            driver.fit()
    finally:
        driver.close()
    assert calls == [3, 4] and caplog.text.count("restarted rollout-0") == 1
    resumed = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [3, 4]
    assert stable(straight)[3:] == stable(resumed)
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
