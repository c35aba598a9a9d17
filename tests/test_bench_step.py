"""bench.step end to end on a small configuration: both overlap settings with 2 rollout workers."""
import json

import pytest

from bench import step
from tests.conftest import SMALL

pytestmark = pytest.mark.slow


def test_bench_step_reports_both_overlap_settings(local_ray, capsys):
    small = [o for o in SMALL if not o.startswith(("trainer.total_steps", "trainer.val_every", "trainer.save_every"))]
    out = step.main([*small, "--steps", "4", "--workers", "2", "--sync-sizes"])
    assert "sync" not in out  # bench.sync has its own test (tests/test_bench_sync.py)
    assert json.loads(capsys.readouterr().out) == out  # stdout is the JSON alone
    runs = out["configs"]
    assert set(runs) == {"workers=2,rollout_ahead=0", "workers=2,rollout_ahead=1"}
    seq, ahead = runs["workers=2,rollout_ahead=0"], runs["workers=2,rollout_ahead=1"]
    assert seq["steps_measured"] == ahead["steps_measured"] == 2
    assert seq["staleness_mean"] == 0.0 and ahead["staleness_mean"] == 1.0
    assert seq["learner_idle_share"] == pytest.approx(seq["rollout_share"], abs=0.01)  # it waits for every rollout
    assert 0 < ahead["rollout_share"] <= 1 and ahead["learner_idle_share"] < seq["learner_idle_share"]
    assert out["speedup"]["workers=2"] == pytest.approx(seq["step_seconds_median"] / ahead["step_seconds_median"],
                                                        abs=0.01)
