"""The config schema (every key's type, default and check, once) and the check of a composed config.

The dataclasses below are registered with Hydra's ConfigStore as `schema`, the first entry of
conf/config.yaml's defaults list: the YAML option files (conf/<group>/*.yaml, recipes/recipe/*.yaml)
merge into them, so Hydra rejects a wrongly typed value (`trainer.optim.lr=abc`) or an unknown key
(`trainer.foo=1`) at composition, naming the key. Groups with one obvious setting (trainer, ray,
logger) have no YAML at all: their defaults are here. Groups that are choices (model, task, reward,
algorithm, rollout) keep their values in their option files.

`validate(cfg)` then checks values and cross-group rules, and the files the config names (model
directory, safetensors headers, task files), so that bad input gets one message before Ray starts.
Two groups stay free-form on purpose: `rollout` (its sampler keys and checks live in the sampler
dataclasses, rollout/sampler.py and rollout/fast.py; which keys are allowed depends on
rollout.sampler) and `algorithm.hyper` (checked by rl.estimators.build_estimator).
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, ValidationError

from rewards.combine import check_reward_config
from rl.errors import ConfigError, fail
from rl.estimators import build_estimator
from rl.models import TINY_CHECKPOINT, check_model_files, load_config, resolve_model_dir, vision_input_size
from rl.tracking import LOGGERS
from rollout.image import ImageSamplerConfig
from rollout.rollout import SAMPLERS, WORKER_KEYS, sampler_config

ASSETS = Path(__file__).resolve().parents[1] / "recipes" / "assets"
# ${asset:NAME} in a config is the shipped directory recipes/assets/NAME, wherever the repo is.
OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS / name), replace=True)


def _required(key: str):
    """${required:KEY} in an option file makes KEY mandatory there (e.g. model=mmada_8b needs model.path).
    Not ???: OmegaConf's merge never lets ??? replace a schema default, and these keys need one (null),
    so that a user's own option file may leave them out."""
    raise ConfigError(f"config {key}: a value is required (e.g. {key}=/path/to/local/dir)")


OmegaConf.register_new_resolver("required", _required, replace=True)

__all__ = ["ConfigError", "Config", "OptimConfig", "build", "check_memory", "validate", "model_path",
           "image_tokenizer_path"]


def _bad(key: str, value, why: str):
    fail(key, value, why, ConfigError)


def _int(key: str, value, low: int, why: str = "") -> None:
    # OmegaConf already enforces int-ness for typed fields; this guards direct dataclass construction.
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        _bad(key, value, f"expected an integer >= {low}{why}")


def _num(key: str, value, low: float, strict: bool = True, why: str = "") -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if strict else value < low):
        _bad(key, value, f"expected a number {'>' if strict else '>='} {low}{why}")


def _one_of(key: str, value, choices) -> None:
    if value not in choices:
        _bad(key, value, f"expected one of {list(choices)}")


@dataclass
class ModelConfig:
    # null = the tiny checkpoint shipped in recipes/assets/tiny-llada; otherwise a local directory
    # (config.json + *.safetensors + tokenizer), e.g. a LLaDA-8B-Instruct download.
    path: Optional[str] = None
    # bfloat16 (CUDA only): the learner trains with DeepSpeed bf16 (bf16 weights and activations, fp32
    # master weights and optimizer states) and rollout workers sample with bf16 weights.
    dtype: str = "float32"
    # Recompute each block's activations in backward instead of keeping them (non-reentrant
    # torch.utils.checkpoint): less activation memory for about one more forward per policy pass.
    gradient_checkpointing: bool = False
    # e.g. {r: 16, alpha: 32}; the reference is then the adapter-disabled base. Typed Any, not
    # Optional[Dict]: OmegaConf cannot assign a command-line dict (model.lora='{r: 16}') to a typed
    # Optional[Dict] node that holds None; the type is checked below and in rl.learner instead.
    lora: Any = None
    # Models with image codes (LLaDAConfig.codebook_size > 0): the image tokenizer's directory
    # (rl/models/vq.py; config.json + model.safetensors). null = the shipped tiny VQ.
    image_tokenizer: Optional[str] = None
    # Values that replace the checkpoint's config.json ones wherever the model is loaded, e.g.
    # {image_aspect_ratio: square} for GSAI-ML/LLaDA-V, whose anyres_max_4 tiling is not implemented.
    # Typed Any for the reason lora is.
    config_overrides: Any = None

    def __post_init__(self):
        _one_of("model.dtype", self.dtype, ("float32", "bfloat16"))
        if not isinstance(self.gradient_checkpointing, bool):
            _bad("model.gradient_checkpointing", self.gradient_checkpointing, "expected true or false")
        if self.config_overrides is None:
            self.config_overrides = {}
        if not isinstance(self.config_overrides, dict):
            _bad("model.config_overrides", self.config_overrides, "expected a mapping of config.json keys to values")
        if self.lora is not None and not isinstance(self.lora, dict):
            _bad("model.lora", self.lora, "expected null or a mapping of LoRA settings, e.g. '{r: 16, alpha: 32}'")


@dataclass
class TaskConfig:
    # Synthetic tasks are generated in code (rl/data/tasks.py): {task name: row count}. Empty by
    # default, because a dict default would be merged with (not replaced by) the option file's.
    train: Dict[str, int] = field(default_factory=dict)
    val: Dict[str, int] = field(default_factory=dict)
    # Dataset files used instead (rl/data/files.py): .jsonl, .json, .parquet or a datasets save_to_disk
    # folder, in this project's, TRL's or verl's column layout.
    train_file: Optional[str] = None
    val_file: Optional[str] = None
    # A benchmark's record layout from rl.data.benchmarks.FORMATS (gsm8k, ...), which reads the columns itself.
    format: Optional[str] = None
    prompt_key: str = "prompt"  # a string or a chat message list
    answer_key: str = "answer"  # a dotted key (reward_model.ground_truth) reaches into a struct column
    # Longest chat-templated prompt in tokens (null = no limit): longer ones are dropped with a warning
    # (verl's data.filter_overlong_prompts), or, with filter_overlong_prompts=false, an error.
    max_prompt_length: Optional[int] = None
    filter_overlong_prompts: bool = True

    def __post_init__(self):
        from rl.data.benchmarks import FORMATS

        if self.format is not None and self.format not in FORMATS:
            _bad("task.format", self.format, f"expected null or one of {sorted(FORMATS)}")
        for key in ("prompt_key", "answer_key"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                _bad(f"task.{key}", value, "expected a column name")
        if self.format is not None and (self.prompt_key, self.answer_key) != ("prompt", "answer"):
            _bad("task.format", self.format, "reads the columns itself; leave task.prompt_key/answer_key unset")
        if self.max_prompt_length is not None:
            _int("task.max_prompt_length", self.max_prompt_length, 1, " (tokens; null = no limit)")
        if not isinstance(self.filter_overlong_prompts, bool):
            _bad("task.filter_overlong_prompts", self.filter_overlong_prompts, "expected true or false")


@dataclass
class RewardConfig:
    functions: List[Any] = MISSING  # [{name, weight, key?, tasks?, kwargs?}], see rewards/combine.py
    # The reward(s) that decide validation accuracy (a score of at least 0.5 counts as correct).
    accuracy: Any = MISSING
    num_workers: int = 1
    clip_path: Optional[str] = None  # a local CLIP for the clip reward; null = the shipped tiny CLIP (or none used)
    timeout_s: float = 300.0  # deadline of one reward call; the worker is killed and restarted after it
    on_timeout: str = "fail"  # fail: stop the run naming the reward; zero: score the batch 0 and count it

    def __post_init__(self):
        _int("reward.num_workers", self.num_workers, 1)
        _num("reward.timeout_s", self.timeout_s, 0)
        _one_of("reward.on_timeout", self.on_timeout, ("fail", "zero"))


@dataclass
class AlgorithmConfig:
    # Values live in conf/algorithm/<name>.yaml; `hyper` goes to rl.estimators.build_estimator as is.
    name: str = MISSING
    group_size: int = MISSING
    mu: int = MISSING
    scale_adv_by_std: bool = MISSING
    adv_baseline: str = "mean"  # the group baseline: mean, or leave_one_out (DiffuCoder's RLOO)
    hyper: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _int("algorithm.group_size", self.group_size, 2, " (group advantages need at least two answers)")
        _int("algorithm.mu", self.mu, 1)
        _one_of("algorithm.adv_baseline", self.adv_baseline, ("mean", "leave_one_out"))
        if "mask_id" in self.hyper:
            _bad("algorithm.hyper.mask_id", self.hyper["mask_id"], "not set (it is read from the model's config)")
        try:
            build_estimator(self.name, **self.hyper)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"algorithm ({self.name}): {e}") from None


@dataclass
class OptimConfig:
    """AdamW with gradient clipping; lr rises linearly over warmup_steps (optimizer steps, mu per
    training step), then stays. rl.learner.Learner builds one from a plain dict, so a library user
    gets these same checks."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0

    def __post_init__(self):
        _num("trainer.optim.lr", self.lr, 0, why=" (a learning rate)")
        _num("trainer.optim.weight_decay", self.weight_decay, 0, strict=False)
        if not (len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas)):
            _bad("trainer.optim.betas", list(self.betas), "expected two numbers in [0, 1)")
        _num("trainer.optim.eps", self.eps, 0)
        _num("trainer.optim.max_grad_norm", self.max_grad_norm, 0, why=" (a clipping norm)")
        _int("trainer.optim.warmup_steps", self.warmup_steps, 0)


OFFLOAD = ("none", "optimizer", "param")
REF_DEVICES = ("same", "cpu")
WEIGHT_SYNC = ("auto", "collective", "object_store")


def check_memory(device: str, zero_stage: int, offload: str, ref_device: str, lora=None,
                 bf16: bool = False) -> None:
    """The memory options' rules, shared by validate() and rl.learner.Learner (a direct caller)."""
    _one_of("trainer.offload", offload, OFFLOAD)
    _one_of("trainer.ref_device", ref_device, REF_DEVICES)
    cpu = not str(device).startswith("cuda")
    if offload != "none" and cpu:
        _bad("trainer.offload", offload, f"expected none with trainer.device={device} (weights and optimizer "
             "already live in CPU memory)")
    if offload == "optimizer" and zero_stage < 1:
        _bad("trainer.offload", offload, f"needs trainer.zero_stage >= 1, got {zero_stage}")
    if offload == "param" and zero_stage != 3:
        _bad("trainer.offload", offload, f"needs trainer.zero_stage=3, got {zero_stage}")
    if ref_device == "cpu" and lora is not None:
        _bad("trainer.ref_device", ref_device, "expected same with model.lora (the reference is the policy "
             "with its adapters disabled, not a copy that could move)")
    if bf16 and cpu:
        _bad("model.dtype", "bfloat16", f"expected float32 with trainer.device={device} (bf16 training "
             "needs CUDA; set trainer.device=cuda)")


@dataclass
class TrainerConfig:
    total_steps: int = 40
    prompts_per_step: int = 8
    val_every: int = 5  # 0 = never (besides val_before_train)
    val_before_train: bool = True
    num_learners: int = 1
    zero_stage: int = 0
    device: str = "cpu"
    optim: OptimConfig = field(default_factory=OptimConfig)
    save_every: int = 10  # 0 = never
    keep_last: int = 2  # checkpoints kept; 0 = all
    # null: fresh run; auto: the newest intact checkpoint in the run dir; or a .../global_step_N path
    resume: Optional[str] = None
    on_actor_failure: str = "retry"  # retry: restart a dead rollout/reward actor and retry; fail: stop cleanly
    max_retries: int = 2
    skip_warn_steps: int = 3  # warn when this many training steps in a row skipped the optimizer step
    logger: List[str] = field(default_factory=lambda: ["console"])
    project: str = "dllm-rl"
    experiment_name: Optional[str] = None  # default: the algorithm name
    # Memory options (docs/MEMORY.md); all off by default.
    # ZeRO-Offload on CUDA: optimizer = optimizer states and step on the CPU (DeepSpeedCPUAdam, a C++
    # op DeepSpeed builds on first use; zero_stage >= 1); param = the weights too (zero_stage 3).
    # With device=cpu everything already lives in CPU memory, so anything but none is an error.
    offload: str = "none"
    # Rows per learner forward/backward (old, reference and policy passes); 0 = this rank's whole
    # shard at once. The chunks' gradients add up to the one-pass gradient; one optimizer step per
    # inner step either way.
    micro_batch: int = 0
    # cpu: the frozen reference stays in CPU memory when training on CUDA (its log-probs are computed
    # there and moved over). A no-op with device=cpu; an error with LoRA (the reference is the policy).
    ref_device: str = "same"
    # 1: generate and score the next step's rollouts while the learner updates on this step's, with the
    # weights from before the update (one update stale, as verl's one-step-off-policy trainer); 0: each
    # step waits for the last (docs/ARCHITECTURE.md, "Overlap").
    rollout_ahead: int = 0
    # How new weights reach the rollout workers after each update (docs/ARCHITECTURE.md, Weight sync):
    # collective = learner rank 0 broadcasts them over a gloo (CPU) / NCCL (CUDA) group with the rollout
    # workers, an error if that group cannot form; object_store = the whole state dict through Ray's
    # object store; auto = collective where the group forms, else the object store, with the reason logged.
    weight_sync: str = "auto"
    # Bytes per broadcast. Learner rank 0 holds a bucket twice while packing it, a receiver once, so this
    # bounds the sync's extra memory; 256 MB (verl: 512) keeps that small beside an 8B model's 16 GB
    # while the per-bucket cost (three broadcasts' latency) stays negligible next to the transfer.
    weight_sync_bucket_mb: float = 256.0
    # Seconds for the learner and every rollout worker to form the group; one that does not arrive in
    # time fails the formation instead of hanging (auto then falls back to the object store).
    weight_sync_timeout_s: float = 60.0

    def __post_init__(self):
        for key in ("total_steps", "prompts_per_step", "num_learners", "skip_warn_steps"):
            _int(f"trainer.{key}", getattr(self, key), 1)
        for key in ("val_every", "save_every", "keep_last", "max_retries"):
            _int(f"trainer.{key}", getattr(self, key), 0)
        _one_of("trainer.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _one_of("trainer.device", self.device, ("cpu", "cuda"))
        _one_of("trainer.on_actor_failure", self.on_actor_failure, ("retry", "fail"))
        _one_of("trainer.rollout_ahead", self.rollout_ahead, (0, 1))
        _int("trainer.micro_batch", self.micro_batch, 0, " (rows per learner pass; 0 = the whole shard)")
        _one_of("trainer.weight_sync", self.weight_sync, WEIGHT_SYNC)
        _num("trainer.weight_sync_bucket_mb", self.weight_sync_bucket_mb, 0, why=" (megabytes per broadcast)")
        _num("trainer.weight_sync_timeout_s", self.weight_sync_timeout_s, 0, why=" (seconds)")
        check_memory(self.device, self.zero_stage, self.offload, self.ref_device)
        if not set(self.logger) <= set(LOGGERS):
            _bad("trainer.logger", list(self.logger), f"expected a list drawn from {list(LOGGERS)}")


@dataclass
class RayConfig:
    # null: start Ray locally on 127.0.0.1; HOST:PORT joins a cluster started with `ray start`
    address: Optional[str] = None
    num_cpus: int = 8  # logical CPUs declared to a local Ray (generous, so every actor fits on two cores)
    placement_timeout_s: float = 60.0
    dashboard: bool = False
    threads_per_actor: int = 1
    placement_strategy: str = "PACK"  # SPREAD puts rollout workers on different nodes of a cluster
    node_ip_address: Optional[str] = None  # this driver's address when joining a cluster; null = Ray's detection

    def __post_init__(self):
        if self.address is not None and ":" not in self.address:
            _bad("ray.address", self.address, "expected HOST:PORT of a running Ray head (from `ray start --head`)")
        _int("ray.num_cpus", self.num_cpus, 1)
        _int("ray.threads_per_actor", self.threads_per_actor, 1)
        _num("ray.placement_timeout_s", self.placement_timeout_s, 0, why=" (seconds)")
        _one_of("ray.placement_strategy", self.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))


@dataclass
class LoggerConfig:
    wandb_mode: str = "offline"  # online only when you configure it (and have network access)

    def __post_init__(self):
        _one_of("logger.wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))


@dataclass
class EvalConfig:
    """`python -m rl.evaluate` only (rl.train ignores it). The default is d1's protocol: LLaDA's
    reference sampler, greedy, low-confidence remasking, blocks of 32, length/2 steps."""
    lengths: List[int] = field(default_factory=lambda: [128, 256, 512])  # gen_length of each pass over the prompts
    block_length: int = 32
    steps: Optional[int] = None  # null = length/2
    temperature: float = 0.0  # 0 = greedy
    sampler: str = "reference"  # reference | fast; the rollout group's other keys apply
    n: int = 1  # samples per prompt
    k: List[int] = field(default_factory=lambda: [1])  # pass@k reported for each (k <= n)
    limit: Optional[int] = None  # the first N prompts of task.val; null = all
    batch_size: int = 16  # prompts per chunk: one rollout call, one seed, appended to generations.jsonl at once
    output_dir: Optional[str] = None  # null = the Hydra run dir; rerunning on a directory resumes it

    def __post_init__(self):
        if not self.lengths:
            _bad("eval.lengths", list(self.lengths), "expected at least one generation length")
        for length in self.lengths:
            _int("eval.lengths", length, 1)
        _int("eval.block_length", self.block_length, 1)
        if self.steps is not None:
            _int("eval.steps", self.steps, 1, " (or null: length/2)")
        _num("eval.temperature", self.temperature, 0, strict=False, why=" (0 = greedy)")
        _one_of("eval.sampler", self.sampler, SAMPLERS)
        _int("eval.n", self.n, 1)
        if not self.k or not all(isinstance(k, int) and 1 <= k <= self.n for k in self.k):
            _bad("eval.k", list(self.k), f"expected a list of integers in [1, eval.n={self.n}]")
        if self.limit is not None:
            _int("eval.limit", self.limit, 1, " (or null: every prompt)")
        _int("eval.batch_size", self.batch_size, 1)


@dataclass
class Config:
    model: ModelConfig = MISSING
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: Dict[str, Any] = MISSING
    reward: RewardConfig = MISSING  # MISSING, not a default instance: their option files fill them in
    algorithm: AlgorithmConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0


ConfigStore.instance().store(name="schema", node=Config)


def _field_types(schema: type) -> dict[str, type | None]:
    # Field types are strings (annotations are postponed); only the schema's own dataclasses matter here.
    return {f.name: globals().get(f.type) if isinstance(f.type, str) else f.type for f in fields(schema)}


def _check_keys(schema: type, values, prefix: str) -> None:
    """Reject keys the schema does not define, listing the known ones. Hydra's `+group.key=value` can
    append a key even to a typed node, and OmegaConf.merge would then drop it silently."""
    types = _field_types(schema)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: unknown key(s) {unknown}; known keys: {sorted(types)}")
    for key, sub in types.items():
        node = values.get(key) if hasattr(values, "get") else None
        if is_dataclass(sub) and hasattr(node, "keys"):
            _check_keys(sub, node, f"{prefix}{key}.")


def build(schema: type, values, prefix: str = ""):
    """`values` (a DictConfig or dict) merged into `schema`'s defaults and checked: an instance of
    `schema`, or one ConfigError naming the key (with the known keys, for an unknown one)."""
    _check_keys(schema, values, prefix)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except ValidationError as e:
        raise ConfigError(f"{prefix}{e.full_key}: {e.msg.splitlines()[0]}") from None


def model_path(cfg) -> str:
    """model.path as a model folder: null = the shipped tiny checkpoint; a training checkpoint
    (global_step_N, or a run folder) = its exported policy (rl.models.resolve_model_dir)."""
    return str(TINY_CHECKPOINT if cfg.model.path is None else resolve_model_dir(cfg.model.path))


def image_tokenizer_path(cfg) -> str | None:
    path = cfg.model.get("image_tokenizer") if isinstance(cfg.model, DictConfig) else cfg.model.image_tokenizer
    return None if path is None else str(Path(path).expanduser())


def _missing(node, prefix: str = "") -> list[str]:
    """Keys left as ??? in config order (unresolved: a key that only interpolates one is not named)."""
    if node == "???":
        return [prefix]
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    return [k for key, value in items
            for k in _missing(value, f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}".lstrip("."))]


def validate(cfg: DictConfig, splits: tuple[str, ...] = ("train", "val")) -> Config:
    """Check everything a run needs before any actor starts; returns the config as the schema's
    dataclasses. Raises one ConfigError naming the key, file or row. `splits`: the task splits the
    run reads (an evaluation reads only val)."""
    # A mandatory value left as ??? (e.g. model=mmada_8b without model.path) fails here, by its own
    # name rather than that of a key interpolating it.
    missing = _missing(OmegaConf.to_container(cfg, resolve=False))
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (MissingMandatoryValue, InterpolationResolutionError) as e:
        first = str(e).split("\n", 1)[0]
        if "a value is required" in first:  # from _required, which names its own key
            raise ConfigError(first.split("interpolation: ", 1)[-1]) from None
        missing = missing or [getattr(e, "full_key", None) or str(e)]
    if missing:
        _required(missing[0])
    c: Config = build(Config, cfg)

    # Once: for a training checkpoint, resolving model.path re-hashes its files against the manifest.
    model_dir = model_path(c)
    try:
        check_model_files(model_dir, **c.model.config_overrides)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"model.path: {e}") from None
    aspect = getattr(load_config(model_dir, **c.model.config_overrides), "image_aspect_ratio", None)
    if aspect == "pad":  # task images are resized whole (rl.data.loader.attach_pixels): LLaDA-V's "square"
        _bad("model.config_overrides.image_aspect_ratio", aspect, "expected square or null (the model's "
             "config.json says pad): task images are resized whole to the tower's input, not padded first")
    tok_dir = image_tokenizer_path(c)
    if tok_dir is not None and not (Path(tok_dir) / "config.json").is_file():
        _bad("model.image_tokenizer", tok_dir,
             "expected a directory holding an image tokenizer (config.json + model.safetensors)")

    _check_tasks(c, splits, model_dir)
    _check_rollout(c.rollout)

    tr, n = c.trainer, c.rollout["num_workers"]
    if tr.prompts_per_step % n:
        _bad("trainer.prompts_per_step", tr.prompts_per_step, f"expected a multiple of rollout.num_workers={n}")
    if tr.prompts_per_step % tr.num_learners:
        _bad("trainer.prompts_per_step", tr.prompts_per_step,
             f"expected a multiple of trainer.num_learners={tr.num_learners} (each learner rank takes whole groups)")

    check_memory(tr.device, tr.zero_stage, tr.offload, tr.ref_device, c.model.lora, c.model.dtype == "bfloat16")
    if c.algorithm.name == "wd1" and tr.micro_batch % c.algorithm.group_size:
        _bad("trainer.micro_batch", tr.micro_batch, f"expected 0 or a multiple of algorithm.group_size="
             f"{c.algorithm.group_size} (wd1's loss weighs whole groups)")
    _check_rewards(c.reward)
    if tr.resume not in (None, "", "auto", "disable"):
        # Structure only (cheap): rl.checkpoint.resolve_resume hashes the files against the manifest.
        from rl.checkpoint import missing_parts

        missing = missing_parts(tr.resume)
        if missing:
            _bad("trainer.resume", tr.resume, f"expected 'auto', 'disable' or a complete .../global_step_N "
                 f"checkpoint directory (missing {', '.join(missing)})")
    return c


def _check_tasks(c: Config, splits: tuple[str, ...], model_dir: str) -> None:
    from rl.data.files import FORMS
    from rl.data.loader import load_split
    from rl.data.tasks import GENERATORS

    reads_images = vision_input_size(model_dir) is not None  # image rows are read (and checked) at load
    for split in splits:
        file, counts = getattr(c.task, f"{split}_file"), getattr(c.task, split)
        if file is None and (not counts or not set(counts) <= set(GENERATORS) or min(counts.values()) < 1):
            _bad(f"task.{split}", counts, f"expected a mapping of task names from {sorted(GENERATORS)} to row "
                 f"counts >= 1, or task.{split}_file")
        if file is not None or c.task.max_prompt_length is not None or reads_images:
            # Every row read and checked now, so a bad row never reaches an actor; the driver's load_split
            # then takes these rows rather than reading the file again.
            try:
                load_split(c.task, split, c.seed, model_dir=model_dir)
            except FileNotFoundError:
                _bad(f"task.{split}_file", file, f"expected an existing file or folder: {FORMS}")
            except ValueError as e:
                raise ConfigError(f"task.{split}{'_file' if file is not None else ''}: {e}") from None


def _check_types(prefix: str, cls: type, values: dict) -> None:
    """Each value against the type of the same-named field of a sampler dataclass, so a wrong type is
    named here rather than surfacing as a comparison error inside its checks (rollout is free-form)."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in hints:
            continue
        allowed = typing.get_args(hints[key]) or (hints[key],)  # float | None -> (float, NoneType)
        ok = isinstance(value, allowed) or (float in allowed and isinstance(value, int))
        if not ok or (isinstance(value, bool) and bool not in allowed):
            _bad(f"{prefix}{key}", value, f"expected {' or '.join(t.__name__ for t in allowed)}")


def _check_rollout(r: dict) -> None:
    if r.get("sampler") in SAMPLERS:
        _check_types("rollout.", SAMPLERS[r["sampler"]], r)
    try:
        sampler_config(r)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"rollout: {e}") from None
    image = r.get("image") or {}
    _check_types("rollout.image.", ImageSamplerConfig, image)
    try:
        ImageSamplerConfig(**image)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"rollout.image: {e}") from None
    missing = sorted(WORKER_KEYS - {"image"} - set(r))
    if missing:
        raise ConfigError(f"rollout: missing key(s) {missing}")
    _int("rollout.num_workers", r["num_workers"], 1)
    _int("rollout.micro_batch", r["micro_batch"], 0, " (rows per sampler call; 0 = all at once)")
    _int("rollout.val_n", r["val_n"], 1)
    _num("rollout.val_temperature", r["val_temperature"], 0, strict=False, why=" (0 = greedy)")


def _check_rewards(rw: RewardConfig) -> None:
    # Plugins are imported here, in the driver, so a missing file or function is one message before Ray starts.
    try:
        check_reward_config(rw.functions, rw.accuracy)
    except ValueError as e:
        raise ConfigError(str(e)) from None
