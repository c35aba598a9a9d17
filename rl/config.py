"""Check a composed training config before any actor starts: one clear message per problem."""
from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from rewards.combine import RewardSpec
from rewards.registry import available_rewards
from rl.estimators import build_estimator
from rl.models import TINY_CHECKPOINT, check_checkpoint_dir
from rl.tracking import LOGGERS
from rollout.rollout import sampler_config

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
ASSETS = Path(__file__).resolve().parents[1] / "recipes" / "assets"
# ${asset:NAME} in a config is the shipped directory recipes/assets/NAME, wherever the repo is.
OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS / name), replace=True)
GROUPS = ("model", "task", "rollout", "reward", "algorithm", "trainer", "ray", "logger")
TOP_LEVEL = set(GROUPS) | {"seed"}


class ConfigError(ValueError):
    pass


def known_keys(group: str) -> set[str]:
    """A group's keys are those its option files in conf/ define; anything else is a typo."""
    keys: set[str] = set()
    for path in (CONF_DIR / group).glob("*.yaml"):
        keys |= set(yaml.safe_load(path.read_text()) or {})
    return keys


def model_path(cfg: DictConfig) -> str:
    return str(TINY_CHECKPOINT if cfg.model.path is None else Path(cfg.model.path).expanduser())


def image_tokenizer_path(cfg: DictConfig) -> str | None:
    path = cfg.model.get("image_tokenizer")
    return None if path is None else str(Path(path).expanduser())


def validate(cfg: DictConfig) -> None:
    def bad(key: str, value, expected: str):
        raise ConfigError(f"config {key}={value!r}: expected {expected}")

    try:  # a mandatory value left as ??? (e.g. model=mmada_8b without model.path) fails here, by name
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (MissingMandatoryValue, InterpolationResolutionError) as e:
        key = getattr(e, "full_key", None) or str(e)
        raise ConfigError(f"config {key}: a value is required (e.g. {key}=/path/to/local/dir)") from None
    for key in cfg:
        if key not in TOP_LEVEL:
            raise ConfigError(f"config: unknown top-level key {key!r}; expected one of {sorted(TOP_LEVEL)}")
    for group in GROUPS:
        unknown = sorted(set(cfg[group]) - known_keys(group))
        if unknown:
            raise ConfigError(f"config {group}: unknown key(s) {unknown}; known keys: {sorted(known_keys(group))}")

    try:
        check_checkpoint_dir(model_path(cfg))
    except FileNotFoundError as e:
        raise ConfigError(f"config model.path: {e}") from None

    tok_dir = image_tokenizer_path(cfg)
    if tok_dir is not None and not (Path(tok_dir) / "config.json").is_file():
        bad("model.image_tokenizer", tok_dir, "a directory holding an image tokenizer (config.json + model.safetensors)")

    t, a, r, tr = cfg.task, cfg.algorithm, cfg.rollout, cfg.trainer
    for split in ("train", "val"):
        file = t[f"{split}_file"]
        if file is not None and not Path(file).is_file():
            bad(f"task.{split}_file", file, "an existing JSONL file")
        if file is None and not t[split]:
            bad(f"task.{split}", t[split], "a mapping of task name to row count, or task." + f"{split}_file")

    if not isinstance(a.group_size, int) or a.group_size < 2:
        bad("algorithm.group_size", a.group_size, "an integer >= 2 (group advantages need at least two answers)")
    if not isinstance(a.mu, int) or a.mu < 1:
        bad("algorithm.mu", a.mu, "an integer >= 1")
    try:
        build_estimator(a.name, **OmegaConf.to_container(a.hyper))
    except ValueError as e:
        raise ConfigError(f"config algorithm ({a.name}): {e}") from None

    try:
        sampler_config(OmegaConf.to_container(r))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config rollout: {e}") from None

    for key in ("total_steps", "prompts_per_step", "num_learners"):
        if not isinstance(tr[key], int) or tr[key] < 1:
            bad(f"trainer.{key}", tr[key], "an integer >= 1")
    for key, n in (("rollout.num_workers", r.num_workers), ("reward.num_workers", cfg.reward.num_workers),
                   ("rollout.val_n", r.val_n)):
        if not isinstance(n, int) or n < 1:
            bad(key, n, "an integer >= 1")
    if tr.prompts_per_step % r.num_workers:
        bad("trainer.prompts_per_step", tr.prompts_per_step, f"a multiple of rollout.num_workers={r.num_workers}")
    if tr.prompts_per_step % tr.num_learners:
        bad("trainer.prompts_per_step", tr.prompts_per_step,
            f"a multiple of trainer.num_learners={tr.num_learners} (each learner rank takes whole groups)")
    if tr.zero_stage not in (0, 1, 2, 3):
        bad("trainer.zero_stage", tr.zero_stage, "0, 1, 2 or 3")
    if tr.optim.lr <= 0:
        bad("trainer.optim.lr", tr.optim.lr, "a learning rate > 0")
    for key in ("val_every", "save_every"):
        if not isinstance(tr[key], int) or tr[key] < 0:
            bad(f"trainer.{key}", tr[key], "an integer >= 0 (0 = never)")
    for name in tr.logger:
        if name not in LOGGERS:
            bad("trainer.logger", list(tr.logger), f"a list drawn from {list(LOGGERS)}")
    if tr.on_actor_failure not in ("retry", "fail"):
        bad("trainer.on_actor_failure", tr.on_actor_failure, "'retry' or 'fail'")
    if tr.device not in ("cpu", "cuda"):
        bad("trainer.device", tr.device, "'cpu' or 'cuda'")

    functions = cfg.reward.functions
    if not functions:
        bad("reward.functions", functions, "a non-empty list of {name, weight}")
    keys = []
    for i, f in enumerate(functions):
        try:
            spec = RewardSpec.parse(OmegaConf.to_container(f, resolve=True) if isinstance(f, DictConfig) else f)
        except ValueError as e:
            raise ConfigError(f"config reward.functions[{i}]: {e}") from None
        if spec.name not in available_rewards() and ":" not in spec.name and "." not in spec.name:
            bad(f"reward.functions[{i}].name", spec.name,
                f"one of {available_rewards()} or a path 'module:function' / 'file.py:function'")
        keys.append(spec.key or spec.name)
    accuracy = [cfg.reward.accuracy] if isinstance(cfg.reward.accuracy, str) else list(cfg.reward.accuracy)
    for k in accuracy:
        if k not in keys:
            bad("reward.accuracy", k, f"one of the reward components {keys}")

    if cfg.ray.address is not None and ":" not in str(cfg.ray.address):
        bad("ray.address", cfg.ray.address, "HOST:PORT of a running Ray head (from `ray start --head`)")
    if cfg.ray.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        bad("ray.placement_strategy", cfg.ray.placement_strategy, "PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
    if cfg.ray.placement_timeout_s <= 0:
        bad("ray.placement_timeout_s", cfg.ray.placement_timeout_s, "a timeout in seconds > 0")
