import math

import pytest

from rewards.combine import WeightedReward
from rewards.worker import RewardWorker, Scores, accuracy_of, columns_of
from rl.data.tasks import make_rows


def test_task_filter_scores_only_its_rows_and_nan_elsewhere():
    rows = make_rows("arithmetic", 2, 0) + make_rows("countdown", 2, 0)
    completions = [r["solution"] for r in rows]
    reward = WeightedReward([{"name": "countdown", "weight": 1.0, "tasks": ["countdown"]},
                             {"name": "format", "weight": 0.5}])
    out = reward([r["prompt"] for r in rows], completions, **columns_of(rows))
    assert [math.isnan(x) for x in out["components"]["countdown"]] == [True, True, False, False]
    assert out["components"]["countdown"][2:] == [1.0, 1.0]
    assert out["total"] == [0.5, 0.5, 1.5, 1.5]


def test_reward_worker_scores_mixed_rows_and_accuracy():
    rows = make_rows("arithmetic", 3, 0) + make_rows("countdown", 2, 0)
    completions = [r["solution"] for r in rows]
    completions[0] = "<think>no</think><answer>-1</answer>"
    worker = RewardWorker([{"name": "math", "weight": 2.0, "tasks": ["arithmetic"]},
                           {"name": "countdown", "weight": 2.0, "tasks": ["countdown"]},
                           {"name": "format", "weight": 0.5}], accuracy=["math", "countdown"])
    try:
        out = worker.score([r["prompt"] for r in rows], completions, rows)
    finally:
        worker.close()
    assert out.accuracy == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert out.total == [0.5, 2.5, 2.5, 2.5, 2.5]


def test_accuracy_component_must_exist():
    with pytest.raises(ValueError, match=r"reward.accuracy names \['mth'\]"):
        RewardWorker([{"name": "format"}], accuracy=["mth"])


def test_columns_and_accuracy_helpers():
    cols = columns_of([{"prompt": "p", "answer": "1", "task": "a"}, {"prompt": "q", "answer": "2", "target": 5}])
    assert cols == {"answer": ["1", "2"], "target": [None, 5], "task": ["a", None]}
    assert accuracy_of({"m": [1.0, math.nan, 0.4], "c": [0.0, 1.0, 0.9]}, ["m", "c"]) == [1.0, 1.0, 0.0]


def test_worker_counters_name_the_component():
    worker = RewardWorker([{"name": "math", "weight": 2.0}, {"name": "format"}], accuracy=["math"])
    try:
        worker.score(["q", "q"], ["no answer here", "nor here"], [{"answer": "1"}, {"answer": "2"}])
        counts = worker.counters()
    finally:
        worker.close()
    assert counts["math/calls"] == 2 and counts["math/no_answer"] == 2
    assert counts["math/timeouts"] == 0 and counts["math/over_budget"] == 0
    assert not any(k.startswith("format/") for k in counts)  # a reward without counters adds none


def test_scores_carry_what_the_rewards_counted_for_that_batch_only():
    rows = make_rows("arithmetic", 2, 0)
    worker = RewardWorker([{"name": "math"}], accuracy=["math"])
    try:
        first = worker.score([r["prompt"] for r in rows], ["no answer here", rows[1]["solution"]], rows)
        second = worker.score([r["prompt"] for r in rows[:1]], [rows[0]["solution"]], rows[:1])
    finally:
        worker.close()
    assert first.events["math/no_answer"] == 1 and second.events["math/no_answer"] == 0  # per batch, not running totals
    joined = Scores.concat([first, second])
    assert joined.events["math/no_answer"] == 1 and joined.events["math/calls"] == first.events["math/calls"] + 1
