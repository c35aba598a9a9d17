"""Shared fixtures: the Hydra config with small overrides and a local Ray cluster."""
from pathlib import Path

import pytest
import ray
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
# Two steps of two prompts on the tiny model, validated and saved every step.
SMALL = [
    "trainer.total_steps=2", "trainer.prompts_per_step=2", "algorithm.group_size=2", "algorithm.mu=2",
    "task.train={arithmetic: 16}", "task.val={arithmetic: 4}", "trainer.val_every=1", "trainer.save_every=1",
    "ray.num_cpus=6",
]


def compose_cfg(*overrides, base=SMALL):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[*base, *overrides])


@pytest.fixture(scope="module")
def local_ray():
    """A Ray of this test process alone, on 127.0.0.1 (never the machine's shared one)."""
    ray.init(_node_ip_address="127.0.0.1", num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
