"""The README's promises that code can check: its verl/TRL table names keys the config has, and its
reward plugin examples run as written, the TRL one deciding accuracy."""
import re
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import rl.config  # noqa: F401  (registers the config schema that conf/config.yaml names)

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n#", start + len(title))
    return README[start:end if end >= 0 else None]


def code_block(first_line: str) -> str:
    """The fenced block whose first line is first_line (a file name comment)."""
    found = re.search(rf"```\w*\n({re.escape(first_line)}\n.*?)```", README, re.DOTALL)
    assert found, f"README has no code block starting {first_line!r}"
    return found.group(1)


def composed(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_coming_from_verl_and_trl_table_names_keys_the_config_has():
    rows = [line for line in section("### Coming from verl / TRL").splitlines() if line.startswith("| `")]
    ours = [re.findall(r"`([^`]+)`", row.rsplit("|", 2)[1])[0] for row in rows]
    for theirs in ("train_batch_size", "rollout.n", "ppo_epochs", "num_iterations", "kl_loss_coef", "beta",
                   "clip_ratio", "epsilon", "max_response_length", "max_completion_length", "save_freq",
                   "test_freq", "custom_reward_function"):
        assert any(theirs in row for row in rows), f"the table does not map {theirs}"
    cfg = composed()
    for key in ours:
        if key.startswith("+"):  # a key the composed config leaves out: it must be one the estimator takes
            overridden = composed(f"{key}=0.3")
            assert OmegaConf.select(overridden, key[1:]) == 0.3
            continue
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", f"{key} is not a config key"


def test_reward_plugin_examples_run_as_written_and_the_trl_one_decides_accuracy(tmp_path):
    from rewards.worker import RewardWorker

    for name in ("my_rewards.py", "my_verl_reward.py"):
        (tmp_path / name).write_text(code_block(f"# {name}"))
    reward_cfg = OmegaConf.create(code_block("# conf/reward/mine.yaml").replace("/path/to/", f"{tmp_path}/"))
    worker = RewardWorker(OmegaConf.to_container(reward_cfg.functions), [reward_cfg.accuracy])
    row = {"prompt": "Ivy has 5 shells, finds 10 and loses 5. How many now?", "answer": "10", "task": "arithmetic"}
    completions = ["<think>5+10-5</think><answer>10</answer>", "<think>5+10</think><answer>15</answer>"]
    scores = worker.score([row["prompt"]] * 2, completions, [row, row])
    assert scores.accuracy == [1.0, 0.0]
    assert scores.components["exact_answer"] == [1.0, 0.0] and scores.components["short_answer"] == [1.0, 0.0]
    assert scores.total == [3.0, 0.5]  # 2.0 * exact + 0.5 * short_answer + 0.5 * format
    assert scores.extras["short_answer/answer_chars"] == [2, 2]  # the verl dict's other key


def test_reward_plugin_example_passes_the_config_check(tmp_path):
    """The README's command line for a plugin as the accuracy reward is accepted before any actor starts
    (the accuracy key of a plugin is its function's name)."""
    from rl.config import validate

    (tmp_path / "my_rewards.py").write_text(code_block("# my_rewards.py"))
    command = re.search(r"python -m rl.train '(reward\.functions=.*?)' \\\n\s+(reward\.accuracy=\S+)", README)
    assert command, "README has no command line setting reward.functions and reward.accuracy"
    overrides = [arg.replace("/path/to/", f"{tmp_path}/") for arg in command.groups()]
    validate(composed(*overrides))


@pytest.mark.parametrize("entry", ["outputs/", "multirun/"])
def test_run_directories_are_ignored_by_git(entry):
    assert entry in (ROOT / ".gitignore").read_text().splitlines()


def test_multirun_directory_is_the_one_hydra_uses():
    assert "`multirun/DATE/TIME/N/`" in README and "hydra.sweep.dir" in README
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        sweep = OmegaConf.to_container(compose(config_name="config", return_hydra_config=True).hydra.sweep)
    assert sweep == {"dir": "multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}", "subdir": "${hydra.job.num}"}


def test_the_reward_option_file_example_composes_as_written(tmp_path):
    """conf/reward/mine.yaml as the README writes it (no clip_path: that key defaults to null) is a
    reward option Hydra finds on its search path, and it passes the config check."""
    from rl.config import validate

    for name in ("my_rewards.py", "my_verl_reward.py"):
        (tmp_path / name).write_text(code_block(f"# {name}"))
    conf = shutil.copytree(ROOT / "conf", tmp_path / "conf")
    mine = code_block("# conf/reward/mine.yaml").replace("/path/to/", f"{tmp_path}/")
    (conf / "reward" / "mine.yaml").write_text(mine)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["reward=mine"])
    assert cfg.reward.accuracy == "exact_answer" and cfg.reward.clip_path is None
    validate(cfg)
