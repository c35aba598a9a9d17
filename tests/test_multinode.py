"""Two Ray nodes on loopback started with `ray start`, as a user would on two machines, and
`python -m rl.train ray.address=...` training on them: rollout workers on both nodes, two learner
ranks under ZeRO-3 over gloo, weights synced to the rollout workers over the collective group.

The test must leave every other Ray on the machine alone (a user's training may run next to the
suite): the nodes get their own temp dir, run with `--block` as children of the test in their own
process groups, and are stopped by signalling those groups, never with `ray stop` (which stops every
Ray process on the machine). A bystander Ray started beside them must still answer afterwards."""
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
# The bystander: a Ray started by ray.init in another process, as an unrelated user's would be. It
# answers each line on stdin with a round trip through a task, so the test can ask it whether its
# cluster still works.
BYSTANDER = """
import sys, ray
ray.init(_node_ip_address="127.0.0.1", num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1])
ping = ray.remote(lambda: "pong")
print("ready", flush=True)
for _ in sys.stdin:
    print(ray.get(ping.remote(), timeout=60), flush=True)
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_args(ports: list[int], temp_dir: Path) -> list[str]:
    # Two nodes on one machine: every port a node would otherwise take by default is its own, and so is
    # its temp dir (sessions, sockets, logs), which is also how its processes are found again below.
    keys = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
    return ["--block", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1", "--num-cpus=3",
            "--disable-usage-stats", *(f"--{k}={p}" for k, p in zip(keys, ports))]


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _start(cmd, log: Path, env, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    # Its own session, so its process group holds it and everything it starts, and nothing else.
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=stdin, env=env, text=True,
                                start_new_session=True)


def _wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{proc.args[:3]}: no {text!r} in {timeout}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the process group (a blocking `ray start` then shuts its node down), SIGKILL after grace_s."""
    if proc.stdin is not None:
        proc.stdin.close()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # start_new_session: the group id is the leader's pid
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            pass


def _pids_using(path: str) -> dict[int, str]:
    """Live processes whose command line names path or that hold a file under it open. Ray's own
    processes name their temp dir in their arguments; its workers retitle themselves ("ray::IDLE"),
    but their stdout and stderr are log files in that temp dir."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie has already exited
            uses = path in cmdline
            if not uses:
                for fd in (entry / "fd").iterdir():
                    try:
                        if os.readlink(fd).startswith(path):
                            uses = True
                            break
                    except OSError:
                        continue
        except (OSError, IndexError):
            continue  # exited meanwhile, or not ours to inspect
        if uses:
            found[int(entry.name)] = cmdline[:200]
    return found


def _wait_gone(path: str, timeout: float = 30) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while (left := _pids_using(path)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.mark.skipif(shutil.which(RAY) is None, reason="the ray CLI is not installed next to this Python")
def test_train_on_a_two_node_cluster_started_with_ray_start(tmp_path):
    gcs, dashboard, *ports = _free_ports(14)
    address = f"127.0.0.1:{gcs}"
    # Ray clusters authenticate with a shared token: every node and the driver read the same file,
    # as they would on real machines that were given it.
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    # Short: Ray's socket paths (temp dir + session name + socket) must fit in 107 characters, and
    # pytest's tmp_path is too long for that.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    bystander_log = tmp_path / "bystander.log"
    bystander = _start([sys.executable, "-c", BYSTANDER, str(ray_tmp / "b")], bystander_log, os.environ,
                       stdin=subprocess.PIPE)
    nodes = []
    try:
        _wait_for(bystander, bystander_log, "ready", 120)
        # Even without the dashboard, the head runs a dashboard process on 8265 unless told otherwise, and
        # another Ray on the machine may hold that port.
        head = _start([RAY, "start", "--head", f"--port={gcs}", "--include-dashboard=false",
                       f"--dashboard-port={dashboard}", *_node_args(ports[:6], ray_tmp / "h")],
                      tmp_path / "head.log", env)
        nodes.append(head)
        _wait_for(head, tmp_path / "head.log", "Ray runtime started.", 120)
        worker = _start([RAY, "start", f"--address={address}", *_node_args(ports[6:], ray_tmp / "w")],
                        tmp_path / "worker.log", env)
        nodes.append(worker)
        _wait_for(worker, tmp_path / "worker.log", "Ray runtime started.", 120)
        run_dir = tmp_path / "run"
        out = _run([sys.executable, "-m", "rl.train", f"ray.address={address}", "ray.node_ip_address=127.0.0.1",
                    f"hydra.run.dir={run_dir}", "rollout.num_workers=2", "trainer.num_learners=2",
                    "trainer.zero_stage=3", "ray.placement_strategy=SPREAD", "ray.threads_per_actor=1",
                    "trainer.total_steps=2", "trainer.prompts_per_step=2", "algorithm.group_size=2",
                    "algorithm.mu=1", "trainer.val_every=0", "trainer.val_before_train=false",
                    "trainer.save_every=2", "rollout.gen_length=16", "rollout.steps=8"], timeout=600, env=env)
    finally:
        for proc in reversed(nodes):
            _stop(proc)
    try:
        # Every process of the two nodes is gone (raylets, GCS, agents and the workers they started)...
        for node_dir in ("h", "w"):
            left = _wait_gone(str(ray_tmp / node_dir))
            assert not left, f"processes of the test's {node_dir} node outlived it: {left}"
        # ...and the bystander's Ray still runs and still answers.
        bystander.stdin.write("ping\n")
        bystander.stdin.flush()
        _wait_for(bystander, bystander_log, "pong", 60)
    finally:
        _stop(bystander)
        left = _wait_gone(str(ray_tmp))
        # Whatever still runs in the test's temp dir is the test's own: kill it so a failure leaves no
        # orphans, then fail on it.
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"processes of the test's bystander outlived it: {left}"
    log = out.stdout + out.stderr
    placed = dict(re.findall(r"(\w+-\d)@(\w+)", re.search(r"placement: (.*)", log).group(1)))
    assert placed["rollout-0"] != placed["rollout-1"], placed  # one rollout worker on each node
    assert {"learner-0", "learner-1"} <= placed.keys()
    # The weights crossed nodes over the collective group (ZeRO-3: both ranks gathered, rank 0 sent).
    assert "weight sync: collective" in log and "through Ray's object store" not in log, log[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["actor/grad_norm"] == r["actor/grad_norm"] and "timing_s/update_weights" in r for r in rows)
    assert (run_dir / "checkpoints" / "global_step_2").is_dir()
