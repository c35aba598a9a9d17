import json
import os
import subprocess

import pytest

from tests.conftest import ROOT

# bench.learner and bench.rollout run their own CLI tests (tests/test_bench_*.py); here the script's
# model build, the planner and the training run it adds.
STEPS = ("planner", "train")


@pytest.mark.slow
def test_gpu_check_tiny_scale(tmp_path):
    env = {**os.environ, "SCALE": "tiny", "OUT_DIR": str(tmp_path), "STEPS": " ".join(STEPS)}
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "model" / "llada-tiny" / "config.json").is_file()
    with_ckpt = json.loads((tmp_path / "memory_plan_gradient-checkpointing.json").read_text())
    without = json.loads((tmp_path / "memory_plan_no-gradient-checkpointing.json").read_text())
    assert with_ckpt["learner"]["components"]["activations"] < without["learner"]["components"]["activations"]
    assert with_ckpt["settings"]["lora_r"] == 128 and with_ckpt["learner"]["peak"]["bytes"] > 0
    assert "Traceback" not in (tmp_path / "train.log").read_text()
