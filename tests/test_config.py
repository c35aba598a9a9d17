from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from rl.config import ConfigError, validate
from rl.data.loader import PromptCursor, load_split

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def cfg(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_is_valid_and_uses_the_tiny_recipe():
    c = cfg()
    validate(c)
    assert c.algorithm.name == "unigrpo" and c.model.path is None and c.trainer.device == "cpu"


@pytest.mark.parametrize("override,message", [
    ("algorithm.group_size=1", "algorithm.group_size=1: expected an integer >= 2"),
    ("trainer.prompts_per_step=7", "trainer.prompts_per_step=7: expected a multiple of rollout.num_workers=2"),
    ("model.path=/nonexistent/ckpt", "model.path: checkpoint directory '/nonexistent/ckpt' does not exist"),
    ("rollout.block_length=5", "sampler.block_length=5"),
    ("trainer.zero_stage=4", "trainer.zero_stage=4"),
    ("trainer.logger=[console,tensorboard]", "trainer.logger"),
    ("algorithm.hyper.kl=k9", "kl: expected one of"),
    ("reward.accuracy=nope", "reward.accuracy='nope'"),
    ("task.train_file=/no/such.jsonl", "task.train_file='/no/such.jsonl'"),
    ("rollout.threshold=1.5", "sampler.threshold=1.5"),
    ("rollout.cache=kv", "sampler.cache='kv'"),
    ("rollout.sampler=turbo", "rollout.sampler='turbo'"),
    ("rollout.val_n=0", "rollout.val_n=0: expected an integer >= 1"),
])
def test_bad_values_get_one_named_message(override, message):
    extra = ["rollout.num_workers=2"] if "prompts_per_step" in override else []
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        validate(cfg(override, *extra))


def test_rollout_group_selects_the_sampler():
    assert cfg().rollout.sampler == "fast"
    validate(cfg("rollout=reference"))
    with pytest.raises(ConfigError, match=r"rollout.sampler='reference' takes no \['threshold'\]"):
        validate(cfg("rollout=reference", "+rollout.threshold=0.9"))


def test_unknown_keys_are_rejected():
    with pytest.raises(Exception, match="foo"):
        cfg("trainer.foo=1")  # Hydra's struct mode
    with pytest.raises(ConfigError, match=r"trainer: unknown key\(s\) \['foo'\]"):
        validate(cfg("+trainer.foo=1"))


def test_recipe_selects_an_experiment():
    c = cfg("recipe=tiny", "algorithm=diffu_grpo")
    assert c.algorithm.name == "diffu_grpo" and c.trainer.total_steps >= 1


def test_prompt_cursor_resumes_exactly():
    rows = [{"prompt": str(i), "answer": str(i)} for i in range(10)]
    a = PromptCursor(rows, seed=3)
    first = a.next(7)
    b = PromptCursor(rows, 3, **a.state())
    assert a.next(25) == b.next(25)
    full = PromptCursor(rows, 3).next(10)
    assert sorted(r["prompt"] for r in full) == sorted(r["prompt"] for r in rows)  # an epoch is a permutation


def test_load_split_from_jsonl(tmp_path):
    f = tmp_path / "val.jsonl"
    f.write_text('{"prompt": "1+1?", "answer": 2}\n')
    c = cfg(f"task.val_file={f}")
    assert load_split(c.task, "val", 0) == [{"prompt": "1+1?", "answer": "2", "task": "val"}]
    assert {r["task"] for r in load_split(c.task, "train", 0)} == {"arithmetic"}
