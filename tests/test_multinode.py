"""Two Ray nodes on loopback; `python -m rl.train ray.address=...` joins them, puts a rollout worker on
each node and trains two steps with two learner ranks under ZeRO-3 over gloo."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ray.cluster_utils import Cluster

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_node_cluster_two_learner_ranks_zero3(tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    cluster.add_node(num_cpus=4, node_ip_address="127.0.0.1")
    try:
        cluster.wait_for_nodes()
        cmd = [sys.executable, "-m", "rl.train", f"hydra.run.dir={tmp_path}", f"ray.address={cluster.address}",
               "ray.placement_strategy=SPREAD", "rollout.num_workers=2", "trainer.num_learners=2",
               "trainer.zero_stage=3", "trainer.total_steps=2", "trainer.prompts_per_step=2",
               "algorithm.group_size=2", "algorithm.mu=1", "task.train={arithmetic: 8}", "task.val={arithmetic: 2}",
               "trainer.val_every=0", "trainer.val_before_train=false", "trainer.save_every=2"]
        out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=900)
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-4000:]
        placement = dict(re.findall(r"(rollout-\d|reward-\d|learner-\d)@([0-9a-f]{8})", log))
        assert placement["rollout-0"] != placement["rollout-1"], placement  # one rollout worker per node
        assert len(cluster.list_all_nodes()) == 2
        steps = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert len(steps) == 2
        assert (tmp_path / "checkpoints" / "global_step_2" / "actor" / "hf").is_dir()
    finally:
        cluster.shutdown()
