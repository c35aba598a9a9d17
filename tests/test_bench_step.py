"""bench.step's summary of a run's metrics (its Ray runs are the Driver's, tested in tests/test_train.py)."""
import pytest

from bench.step import summarize


def _step(step, gen, reward, update, total, wait, staleness, ahead=None):
    m = {"step": step, "timing_s/gen": gen, "timing_s/reward": reward, "timing_s/update_actor": update,
         "timing_s/update_weights": 0.1, "timing_s/step": total, "timing_s/wait_rollout": wait,
         "rollout/staleness": staleness, "reward/mean": 1.0}
    if ahead is not None:
        m["timing_s/rollout_ahead"] = ahead
    return m


def test_summary_leaves_out_the_first_and_last_steps_and_reads_the_overlapped_rollout():
    sequential = [{"step": 0}] + [_step(k, 2.0, 1.0, 6.0, 9.0, 3.0, 0.0) for k in (1, 2, 3, 4)]
    s = summarize([m for m in sequential if "timing_s/step" in m])
    assert s["steps_measured"] == 2 and s["rollout_share"] == pytest.approx(3 / 9, abs=1e-3)
    assert s["learner_idle_share"] == s["rollout_share"] and s["staleness_mean"] == 0.0
    # At rollout_ahead=1 the rollout inside a step is the next step's, generated during the update.
    ahead = [_step(1, 2.0, 1.0, 6.0, 9.0, 3.0, 0.0, ahead=4.0)] + \
        [_step(k, 2.0, 1.0, 6.0, 6.1, 0.0, 1.0, ahead=4.0) for k in (2, 3)] + [_step(4, 2.0, 1.0, 6.0, 6.1, 0.0, 1.0)]
    a = summarize(ahead)
    assert a["steps_measured"] == 2 and a["step_seconds_median"] == 6.1
    assert a["rollout_seconds_median"] == 4.0 and a["learner_idle_share"] == 0.0 and a["staleness_mean"] == 1.0


def test_repeats_pool_the_measured_steps_of_every_run():
    first = [_step(k, 2.0, 1.0, 6.0, 9.0, 3.0, 0.0) for k in (1, 2, 3, 4)]
    second = [_step(k, 2.0, 1.0, 6.0, t, 3.0, 0.0) for k, t in ((1, 30.0), (2, 7.0), (3, 7.0), (4, 30.0))]
    pooled = summarize(first, second)
    # steps 2 and 3 of each run: 9, 9, 7, 7 (the first and last steps' 30 s left out)
    assert pooled["steps_measured"] == 4 and pooled["step_seconds_median"] == 8.0
