import json

import pytest

from bench.sync import main


def test_bench_times_both_sync_modes_on_the_same_placement(local_ray, capsys):
    out = main(["--sizes", "tiny", "--workers", "2", "--repeats", "1"])
    assert json.loads(capsys.readouterr().out) == out
    e = out["sizes"]["tiny"]
    assert e["bytes_per_worker"] == e["params"] * 4  # fp32 on the wire, every weight once
    assert len(e["object_store_runs"]) == len(e["collective_runs"]) == 1
    assert e["object_store_s"] > 0 and e["collective_s"] > 0
    assert e["speedup"] == pytest.approx(e["object_store_s"] / e["collective_s"], rel=0.02, abs=0.01)
