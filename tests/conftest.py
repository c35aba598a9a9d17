"""Shared fixtures: the Hydra config with small overrides and a local Ray cluster."""
import os
from pathlib import Path

import pytest
import ray
import torch
from hydra import compose, initialize_config_dir

from rl.models.llada import LLaDAConfig, LLaDAModelLM
from rl.models.tokenizer import train_tokenizer

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


@pytest.fixture(scope="session")
def _ray_session():
    yield
    ray.shutdown()


@pytest.fixture
def local_ray(_ray_session):
    """A Ray of this test process alone, on 127.0.0.1 (never the machine's shared one). Started once and
    shared by every test that asks for it until one takes it down (no_ray): a start costs 5-9 s."""
    if not ray.is_initialized():
        ray.init(_node_ip_address="127.0.0.1", num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield


@pytest.fixture
def no_ray():
    """For a test that starts a Ray of its own, or must run without one."""
    ray.shutdown()


@pytest.fixture
def restore_env():
    # Learner exports MASTER_ADDR/RANK/LOCAL_RANK/... for DeepSpeed; keep them out of other tests.
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 2-layer LLaDA and its tokenizer for learner tests (make_batch's token ids fit its vocabulary)."""
    path = tmp_path_factory.mktemp("tiny")
    tok = train_tokenizer(["Ann has 12 apples and gets 3 more.", "<think>12+3=15</think>"] * 3, vocab_size=270)
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48, vocab_size=len(tok),
                      mask_token_id=tok.mask_token_id, rope_theta=10000.0)
    LLaDAModelLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
