"""Two Ray nodes on loopback started with `ray start`, as a user would on two machines, and
`python -m rl.train ray.address=...` training on them: rollout workers on both nodes, two learner
ranks under ZeRO-3 over gloo."""
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_args(ports: list[int]) -> list[str]:
    # Two nodes on one machine: every port a node would otherwise take by default is its own.
    keys = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
    return ["--node-ip-address=127.0.0.1", "--num-cpus=3", "--disable-usage-stats",
            *(f"--{k}={p}" for k, p in zip(keys, ports))]


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.skipif(shutil.which(RAY) is None, reason="the ray CLI is not installed next to this Python")
def test_train_on_a_two_node_cluster_started_with_ray_start(tmp_path):
    gcs, *ports = _free_ports(13)
    address = f"127.0.0.1:{gcs}"
    # Ray clusters authenticate with a shared token: every node and the driver read the same file,
    # as they would on real machines that were given it.
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    try:
        _run([RAY, "start", "--head", f"--port={gcs}", "--include-dashboard=false", *_node_args(ports[:6])],
             timeout=120, env=env)
        _run([RAY, "start", f"--address={address}", *_node_args(ports[6:])], timeout=120, env=env)
        run_dir = tmp_path / "run"
        out = _run([sys.executable, "-m", "rl.train", f"ray.address={address}", "ray.node_ip_address=127.0.0.1",
                    f"hydra.run.dir={run_dir}", "rollout.num_workers=2", "trainer.num_learners=2",
                    "trainer.zero_stage=3", "ray.placement_strategy=SPREAD", "ray.threads_per_actor=1",
                    "trainer.total_steps=2", "trainer.prompts_per_step=2", "algorithm.group_size=2",
                    "algorithm.mu=1", "trainer.val_every=0", "trainer.val_before_train=false",
                    "trainer.save_every=2", "rollout.gen_length=16", "rollout.steps=8"], timeout=600, env=env)
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120, env=env)
    log = out.stdout + out.stderr
    placed = dict(re.findall(r"(\w+-\d)@(\w+)", re.search(r"placement: (.*)", log).group(1)))
    assert placed["rollout-0"] != placed["rollout-1"], placed  # one rollout worker on each node
    assert {"learner-0", "learner-1"} <= placed.keys()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["actor/grad_norm"] == r["actor/grad_norm"] and "timing_s/update_weights" in r for r in rows)
    assert (run_dir / "checkpoints" / "global_step_2").is_dir()
