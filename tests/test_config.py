import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from rl.config import ConfigError, validate
from rl.data.loader import PromptCursor, load_split
from rl.models import TINY_CHECKPOINT

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
    ("algorithm.hyper.kl=k9", "kl=.k9.: expected one of"),
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


def test_lora_is_set_from_the_command_line_as_the_readme_shows():
    assert validate(cfg("model.lora={r: 128, alpha: 64}")).model.lora == {"r": 128, "alpha": 64}
    with pytest.raises(ConfigError, match="model.lora=3: expected null or a mapping"):
        validate(cfg("model.lora=3"))


def test_rollout_group_selects_the_sampler():
    assert cfg().rollout.sampler == "fast"
    validate(cfg("rollout=reference"))
    with pytest.raises(ConfigError, match=r"rollout.sampler='reference' takes no \['threshold'\]"):
        validate(cfg("rollout=reference", "+rollout.threshold=0.9"))


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigCompositionException, match="trainer.foo"):
        cfg("trainer.foo=1")  # the schema (rl/config.py) closes every typed group
    with pytest.raises(ConfigError, match=r"trainer: unknown key\(s\) \['foo'\]; known keys: \[.*'keep_last'"):
        validate(cfg("+trainer.foo=1"))  # Hydra lets `+` append even to a typed node
    with pytest.raises(ConfigError, match=r"trainer.optim: unknown key\(s\) \['lrr'\]; known keys: \['betas'"):
        validate(cfg("+trainer.optim.lrr=1"))


def test_schema_holds_the_defaults_of_groups_without_option_files():
    c = cfg()
    assert c.trainer.keep_last == 2 and c.trainer.optim.eps == 1e-8 and c.ray.placement_timeout_s == 60
    assert c.reward.timeout_s == 300 and c.reward.on_timeout == "fail" and c.trainer.skip_warn_steps == 3
    assert validate(c).trainer.optim.betas == [0.9, 0.999]


# Each bad input of issue 16 item 6 gets one message naming the key, file or row, at composition or in
# validate(), so before the driver starts Ray.
@pytest.fixture(scope="module")
def spoilt(tmp_path_factory):
    """Copies of the tiny checkpoint, each damaged one way, and task files with one bad row each."""
    root = tmp_path_factory.mktemp("spoilt")

    def copy(name, spoil):
        d = root / name
        shutil.copytree(TINY_CHECKPOINT, d)
        spoil(d)
        return d

    def truncate(d):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    def config(**change):
        def spoil(d):
            c = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**c, **change}))
        return spoil

    copy("truncated", truncate)
    copy("bad_json", lambda d: (d / "config.json").write_text('{"d_model": 128,'))
    copy("neg_d_model", config(d_model=-3))
    copy("heads", config(n_heads=5))
    good = json.dumps({"prompt": "1+1?", "answer": "2"})
    (root / "no_prompt.jsonl").write_text(good + "\n\n" + json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    (root / "bad_messages.jsonl").write_text(good + "\n" + json.dumps({"prompt": [{"content": "hi"}], "answer": "1"}))
    return root


@pytest.mark.parametrize("override,message", [
    # Wrong types: Hydra rejects them while composing, naming the key.
    ("trainer.optim.lr=abc", "trainer.optim.lr=abc"),
    ("seed=abc", "seed=abc"),
    ("ray.placement_timeout_s=abc", "ray.placement_timeout_s=abc"),
    ("trainer.max_retries=abc", "trainer.max_retries=abc"),
    # Wrong values, found by validate().
    ("rollout.micro_batch=-1", r"rollout.micro_batch=-1: expected an integer >= 0"),
    ("rollout.temperature=abc", r"rollout.temperature='abc': expected float"),
    ("rollout.early_stop=maybe", r"rollout.early_stop='maybe': expected bool"),
    ("rollout.image.steps=abc", r"rollout.image.steps='abc': expected int"),
    ("rollout.image.steps=0", r"rollout.image.steps=0: expected a positive integer"),
    ("trainer.keep_last=-1", r"trainer.keep_last=-1: expected an integer >= 0"),
    ("trainer.optim.lr=0", r"trainer.optim.lr=0.0: expected a number > 0"),
    ("reward.on_timeout=retry", r"reward.on_timeout='retry': expected one of \['fail', 'zero'\]"),
    ("reward.timeout_s=0", r"reward.timeout_s=0.0: expected a number > 0"),
    ("trainer.skip_warn_steps=0", r"trainer.skip_warn_steps=0: expected an integer >= 1"),
    ("trainer.weight_sync=nccl", r"trainer.weight_sync='nccl': expected one of \['auto', 'collective', 'object_s"),
    ("trainer.weight_sync_bucket_mb=0", r"trainer.weight_sync_bucket_mb=0.0: expected a number > 0"),
    ("trainer.weight_sync_timeout_s=-1", r"trainer.weight_sync_timeout_s=-1.0: expected a number > 0"),
    ("+task.train.chess=5", r"task.train=\{'arithmetic': 5000, 'chess': 5\}: expected a mapping of task names"),
    # A value an option file leaves to the user (???) must not fall back to the schema's default.
    ("model=mmada_8b", r"model.path: a value is required"),
    ("reward=t2i_clip_l14", r"reward.clip_path: a value is required"),
    # Broken files the config names.
    ("trainer.resume={d}", r"trainer.resume=.*spoilt.*: expected 'auto', 'disable' or a complete .*missing"),
    ("model.path={d}/truncated", r"model.path: .*truncated/model.safetensors: tensor .* lies at bytes .* \(truncated"),
    ("model.path={d}/bad_json", r"model.path: .*bad_json/config.json: not valid JSON"),
    ("model.path={d}/neg_d_model", r"model.path: .*neg_d_model/config.json: LLaDAConfig.d_model=-3: expected a"),
    ("model.path={d}/heads", r"model.path: .*heads/config.json: LLaDAConfig.d_model=128: must be divisible by n_heads"),
    ("task.train_file={d}/no_prompt.jsonl", r"task.train_file: .*no_prompt.jsonl:3: row 1 has no 'prompt'"),
    ("task.val_file={d}/bad_messages.jsonl",
     r"task.val_file: .*bad_messages.jsonl:2: row 1 'prompt' message 0 is \{'content': 'hi'\}, expected \{'role'"),
])
def test_bad_input_gets_one_message_before_any_actor(spoilt, override, message):
    with pytest.raises((ConfigError, ConfigCompositionException), match=message) as err:
        validate(cfg(override.replace("{d}", str(spoilt))))
    assert len(str(err.value).splitlines()) == 1


def test_driver_rejects_bad_input_before_starting_ray(spoilt, tmp_path, no_ray):
    ray = pytest.importorskip("ray")
    from rl.driver import Driver

    assert not ray.is_initialized()
    with pytest.raises(ConfigError, match="micro_batch"):
        Driver(cfg("rollout.micro_batch=-1"), tmp_path)
    assert not ray.is_initialized()


def test_message_list_prompts_go_through_the_chat_template(tmp_path):
    from rl.data.encode import encode_prompts
    from rl.models import load_tokenizer

    f = tmp_path / "chat.jsonl"
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "1+1?"}]
    f.write_text(json.dumps({"prompt": chat, "answer": 2}) + "\n")
    c = cfg(f"task.train_file={f}")
    validate(c)
    rows = load_split(c.task, "train", 0)
    tok = load_tokenizer(TINY_CHECKPOINT)
    ids, _ = encode_prompts(tok, [rows[0]["prompt"]])
    text = tok.decode(ids[0])
    assert "system" in text and "Answer briefly." in text and text.index("1+1?") > text.index("Answer briefly.")
    assert text.rstrip().endswith("assistant<|end_header_id|>")


def test_recipe_selects_an_experiment():
    c = cfg("recipe=tiny", "algorithm=diffu_grpo")
    assert c.algorithm.name == "diffu_grpo" and c.trainer.total_steps >= 1


def test_prompt_cursor_resumes_exactly():
    rows = [{"prompt": str(i), "answer": str(i)} for i in range(10)]
    a = PromptCursor(rows, seed=3)
    a.next(7)
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


def test_a_plugin_file_is_checked_before_ray_and_can_be_the_accuracy_reward(tmp_path):
    plugin = tmp_path / "my_reward.py"
    plugin.write_text("def exact(prompts, completions, answer, **kw):\n"
                      "    return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]\n")
    functions = f"reward.functions=[{{name: '{plugin}:exact', weight: 1.0}}]"
    validate(cfg(functions, "reward.accuracy=exact"))  # the function's name is the component key
    with pytest.raises(ConfigError, match=r"reward.functions\[0\].*no attribute 'exakt'"):
        validate(cfg(f"reward.functions=[{{name: '{plugin}:exakt'}}]", "reward.accuracy=exakt"))
    with pytest.raises(ConfigError, match=r"reward.functions\[0\].*does not exist"):
        validate(cfg(f"reward.functions=[{{name: '{tmp_path}/nope.py:exact'}}]", "reward.accuracy=exact"))
