"""Injected faults with real Ray actors whose processes are killed: a worker that dies in any phase
costs a retry of that phase only (never a second optimizer step), a reward call that hangs meets
its deadline, and a dead or hung reward worker is reported with the reward function it ran."""
import logging
import os
import signal

import pytest
import ray
import torch

from rewards.worker import RewardWorker
from rl.driver import Driver
from rl.tracking import read_metrics
from tests.conftest import compose_cfg

FAST = ["trainer.val_before_train=false", "trainer.val_every=0", "trainer.save_every=0",
        "algorithm.mu=1"]


def kill(actor) -> None:
    """SIGKILL the actor's process, as a crash would (no Ray bookkeeping first)."""
    os.kill(ray.get(actor.__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)


def optimizer_steps(driver) -> int:
    return ray.get(driver.actors.learners[0].__ray_call__.remote(lambda self: self.engine.global_steps))


def kill_on_entry(driver, phase: str, victim) -> None:
    """Kill `victim()` when the driver next enters `phase` (one of its methods), once."""
    original = getattr(driver, phase)

    def hooked(*args, **kwargs):
        setattr(driver, phase, original)
        kill(victim())
        return original(*args, **kwargs)

    setattr(driver, phase, hooked)


def one_more_step(driver) -> None:
    driver.cfg.trainer.total_steps = driver.step + 1
    driver.fit()


def test_a_worker_killed_in_any_phase_costs_one_retry_and_never_a_second_update(local_ray, tmp_path, caplog):
    driver = Driver(compose_cfg(*FAST), tmp_path / "run")
    rollout, reward = (lambda: driver.actors.rollout[0]), (lambda: driver.actors.reward[0])
    try:
        with caplog.at_level(logging.WARNING, logger="dllm_rl"):
            for phase, victim in [("generate", rollout), ("score", reward), ("update", rollout),
                                  ("update", reward), ("sync_weights", rollout)]:
                kill_on_entry(driver, phase, victim)
                one_more_step(driver)
                assert optimizer_steps(driver) == driver.step, (phase, "trained twice")
        assert caplog.text.count("restarted rollout-0") == 3 and caplog.text.count("restarted reward-0") == 2
        # Restarted rollout workers hold the newest policy, not the one of their first start.
        policy = ray.get(driver.actors.learners[0].state_dict_for_rollout.remote())
        held = ray.get(driver.actors.rollout[0].__ray_call__.remote(lambda self: self.model.state_dict()))
        assert all(torch.equal(policy[k], held[k]) for k in policy)
        # A learner holds optimizer state no restart can bring back: the run stops, and says how to go on.
        kill_on_entry(driver, "update", lambda: driver.actors.learners[0])
        with pytest.raises(RuntimeError, match="a learner rank died.*trainer.resume=auto"):
            one_more_step(driver)
    finally:
        driver.close()


PLUGIN = '''
import os, time
from pathlib import Path

HERE = Path(__file__).parent


def slow(completions, **kwargs):
    if (HERE / "hang").exists():
        time.sleep(600)
    if (HERE / "die").exists():
        os._exit(1)
    return [0.0] * len(completions)
'''


def test_a_hung_reward_meets_its_deadline_and_a_dead_one_is_named(local_ray, tmp_path, caplog):
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN)
    # The plugin first, so that the deadline finds it running rather than math's first (slower) call.
    functions = f"reward.functions=[{{name: '{plugin}:slow', key: slow}}, {{name: math, weight: 2.0}}]"
    driver = Driver(compose_cfg(*FAST, functions, "trainer.max_retries=1", "reward.timeout_s=3",
                                "reward.on_timeout=zero"), tmp_path / "run")
    named = " while running reward 'slow'"
    try:
        (tmp_path / "hang").touch()
        with caplog.at_level(logging.ERROR, logger="dllm_rl"):
            one_more_step(driver)
        assert f"reward-0 gave no answer within reward.timeout_s=3{named}; restarted it" in caplog.text
        step = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
        # scored 0, and left out of the accuracy (unknown, not wrong)
        assert step["reward/timeouts"] == 4 and step["reward/mean"] == 0 and "train/accuracy" not in step
        assert optimizer_steps(driver) == 1

        driver.cfg.reward.on_timeout = "fail"
        ray.get(driver.actors.reward[0].__ray_call__.remote(lambda self: None))  # restarted: the deadline is the call's
        with pytest.raises(RuntimeError, match=f"reward.timeout_s=3{named}; restarted it; stopping"):
            one_more_step(driver)

        (tmp_path / "hang").unlink()
        (tmp_path / "die").touch()
        driver.cfg.reward.timeout_s = 120  # room for the restarted worker to start
        with pytest.raises(RuntimeError, match=f"actor reward-0 died{named}; stopping"):
            one_more_step(driver)
        assert optimizer_steps(driver) == 1
    finally:
        driver.close()


def test_the_reward_worker_reports_the_function_it_runs():
    """The interface the two tests above rely on to name a plugin."""
    calls = []
    worker = RewardWorker([{"name": "format"}], ["format"], on_call=calls.append)
    worker.score(["q"], ["<think>a</think><answer>1</answer>"], [{"prompt": "q"}])
    assert calls == ["format", None]



def test_a_learner_port_taken_before_rank_0_listens_starts_the_learners_again(local_ray, tmp_path, caplog,
                                                                              monkeypatch):
    import socket

    import rl.actors

    taken = socket.socket()  # another process's listener on the port picked for rank 0
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picked = []
    real = rl.actors._rank0_address

    def first_the_taken_port(local, strategy):
        picked.append(real(local, strategy) if picked else ("127.0.0.1", taken.getsockname()[1]))
        return picked[-1]

    monkeypatch.setattr(rl.actors, "_rank0_address", first_the_taken_port)
    try:
        with caplog.at_level(logging.WARNING, logger="dllm_rl"):
            driver = Driver(compose_cfg(*FAST, "trainer.total_steps=1"), tmp_path / "run")
        try:
            driver.fit()
            assert optimizer_steps(driver) == 1
        finally:
            driver.close()
    finally:
        taken.close()
    # Two starts of the learners, then the address of the weight group's store.
    assert len(picked) == 3 and "was taken before it could listen" in caplog.text

