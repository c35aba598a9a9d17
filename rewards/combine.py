"""A weighted sum of rewards that keeps every component for logging, and the named presets."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards._common import check_batch
from rewards.registry import FLOAT32_MAX, Reward, RewardValueError, build_reward, check_reward, component_key

_SPEC_KEYS = ("name", "weight", "kwargs", "shape", "key", "tasks")


@dataclass(frozen=True)
class RewardSpec:
    """One term of the sum. `name`: a registered reward or a path (see rewards.registry);
    `kwargs`: passed to it; `shape`: force "trl"/"verl" for a path; `key`: the component's name in
    logs and in `reward.accuracy` (default: see `component_key`); `tasks`: the task names (column
    `task`) it applies to, None = all
    (in a mixed batch, e.g. Countdown's reward only scores Countdown rows; others get NaN)."""

    name: str
    weight: float = 1.0
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    shape: str | None = None
    key: str | None = None
    tasks: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.tasks is not None:
            if isinstance(self.tasks, str) or not all(isinstance(t, str) for t in self.tasks):
                raise ValueError(f"RewardSpec {self.name!r}: tasks must be a list of task names, got {self.tasks!r}")
            object.__setattr__(self, "tasks", tuple(self.tasks))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"RewardSpec: name must be a non-empty string, got {self.name!r}")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"RewardSpec {self.name!r}: weight must be a finite number, got {w!r}")
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(f"RewardSpec {self.name!r}: kwargs must be a mapping, got {type(self.kwargs).__name__}")
        if self.key is not None and (not isinstance(self.key, str) or not self.key):
            raise ValueError(f"RewardSpec {self.name!r}: key must be a non-empty string, got {self.key!r}")
        self.component_key  # a malformed path fails here, when the spec is read

    @property
    def component_key(self) -> str:
        """This term's key among the components: `key`, else a path's function name, else the
        registered name (rewards.registry.component_key, the one rule for it)."""
        return component_key(self.name, self.key)

    @classmethod
    def parse(cls, spec: "RewardSpec | Mapping[str, Any] | str") -> "RewardSpec":
        """From a spec, a config mapping with keys among name/weight/kwargs/shape/key (Hydra's
        DictConfig is one), or a bare name (weight 1)."""
        if isinstance(spec, RewardSpec):
            return spec
        if isinstance(spec, str):
            return cls(spec)
        if isinstance(spec, Mapping):
            unknown = sorted(str(k) for k in spec if k not in _SPEC_KEYS)
            if unknown:
                raise ValueError(
                    f"reward spec {dict(spec)!r}: unknown keys {unknown}; expected keys among {list(_SPEC_KEYS)}"
                )
            if "name" not in spec:
                raise ValueError(f"reward spec {dict(spec)!r}: missing key 'name'")
            fields = {k: (dict(v) if k == "kwargs" and isinstance(v, Mapping) else v) for k, v in spec.items()}
            if fields.get("tasks") is not None and not isinstance(fields["tasks"], str):
                fields["tasks"] = tuple(fields["tasks"])  # Hydra ListConfig -> tuple
            return cls(**fields)
        raise ValueError(
            f"reward spec must be a RewardSpec, a mapping or a name, got {type(spec).__name__} ({spec!r:.80})"
        )


def check_reward_config(functions: Sequence[Any], accuracy: str | Sequence[str]) -> list[str]:
    """Check `reward.functions` and `reward.accuracy` before any actor starts; the component keys.

    Each spec is parsed and checked as `build_reward` would check it, without building anything:
    a built-in's name and kwargs against its factory (CLIP would load a model), a path's module or
    file imported and its function found, its shape detected and its kwargs checked. Each
    accuracy key must be a component key (`RewardSpec.component_key`, the rule the reward worker
    uses). Raises ValueError with one message naming `reward.functions[i]` or `reward.accuracy`.
    `functions` holds plain mappings or specs (pass `OmegaConf.to_container(..., resolve=True)`).
    """
    if isinstance(functions, (str, Mapping)) or not isinstance(functions, Sequence) or not functions:
        raise ValueError(f"reward.functions: expected a non-empty list of reward specs ({{name, weight, ...}}), "
                         f"got {functions!r:.80}")
    keys: list[str] = []
    for i, f in enumerate(functions):
        try:
            spec = RewardSpec.parse(f)
            check_reward(spec.name, spec.kwargs, spec.shape)
        except (ValueError, TypeError, ImportError, AttributeError, OSError) as e:
            # Our loader's messages name the reward and the problem; the traceback adds nothing.
            raise ValueError(f"reward.functions[{i}]: {e}") from None
        keys.append(spec.component_key)
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"reward.functions: component keys {duplicates} appear twice; give the specs distinct 'key's")
    names = [accuracy] if isinstance(accuracy, str) else accuracy
    if not isinstance(names, Sequence) or not all(isinstance(k, str) for k in names):
        raise ValueError(f"reward.accuracy={accuracy!r:.80}: expected a component key or a list of them")
    for k in names:
        if k not in keys:
            raise ValueError(
                f"reward.accuracy={k!r}: expected one of the reward components {keys} (a component's key is its "
                "spec's 'key', else the function name of a path, else the reward's name)"
            )
    return keys


# MMaDA (arXiv 2505.15809), UniGRPO text reasoning: correctness 2.0 + format 0.5.
PRESETS: dict[str, tuple[RewardSpec, ...]] = {
    "text_reasoning": (RewardSpec("math", 2.0), RewardSpec("format", 0.5)),
    # d1's Countdown reward (1.0 correct, 0.1 well-placed but wrong) on its own.
    "countdown": (RewardSpec("countdown", 1.0),),
}


def preset(name: str) -> list[RewardSpec]:
    if name not in PRESETS:
        raise ValueError(f"unknown reward preset {name!r}; expected one of {sorted(PRESETS)}")
    return list(PRESETS[name])


class WeightedReward:
    """`total[i] = sum_k weight_k * component_k[i]`, skipping NaN components ("does not apply").

    Call: `(prompts, completions, **columns)` as every reward (rewards.registry). Returns
    `{"total": [...], "components": {key: [...]}, "weights": {key: w}, "extras": {"key/extra": [...]}}`,
    all lists with one entry per completion; components are the unweighted scores. A total outside
    float32 range is refused like a component's value (rewards.registry, "The boundary").

    `on_call(key)` is called with a component's key just before that reward runs and with None
    after it (also when it raised), so that a caller watching from outside (the driver's deadline)
    can name the reward a hung or dead worker was running.
    """

    def __init__(self, specs: Sequence[RewardSpec | Mapping[str, Any] | str],
                 on_call: Callable[[str | None], None] | None = None):
        if on_call is not None and not callable(on_call):
            raise ValueError(f"WeightedReward: on_call must be callable or None, got {type(on_call).__name__}")
        self.on_call = on_call
        if isinstance(specs, (str, Mapping, RewardSpec)) or not specs:
            raise ValueError(f"WeightedReward needs a non-empty list of reward specs, got {specs!r:.80}")
        self.specs = [RewardSpec.parse(s) for s in specs]
        self.rewards: list[Reward] = []
        try:
            for spec in self.specs:
                self.rewards.append(build_reward(spec.name, spec.kwargs, spec.shape))
        except BaseException:
            self.close()
            raise
        self.keys = [spec.component_key for spec in self.specs]
        duplicates = sorted({k for k in self.keys if self.keys.count(k) > 1})
        if duplicates:
            self.close()
            raise ValueError(
                f"WeightedReward: component keys {duplicates} appear twice; give the specs distinct 'key's"
            )

    def __call__(
        self, prompts: Sequence[Any] | None, completions: Sequence[str], **columns: Sequence[Any]
    ) -> dict[str, Any]:
        n = check_batch("weighted sum", prompts, completions, columns)
        total = [0.0] * n
        components: dict[str, list[float]] = {}
        extras: dict[str, list[Any]] = {}
        for key, spec, reward in zip(self.keys, self.specs, self.rewards):
            idx = list(range(n)) if spec.tasks is None else _rows_of(spec, columns, n)
            if not idx:
                components[key] = [math.nan] * n
                continue
            pick = (lambda seq: [seq[i] for i in idx]) if spec.tasks is not None else (lambda seq: seq)
            if self.on_call is not None:
                self.on_call(key)
            try:
                result = reward.score(None if prompts is None else pick(prompts), pick(completions),
                                      **{c: pick(v) for c, v in columns.items()})
            except RewardValueError as e:
                raise e.at(idx[e.index]) from None  # the sample's index in the batch, not in the task's rows
            finally:
                if self.on_call is not None:
                    self.on_call(None)
            components[key] = scores = _spread(result.scores, idx, n, math.nan)
            extras.update({f"{key}/{name}": _spread(v, idx, n, None) for name, v in result.extras.items()})
            for i, s in enumerate(scores):
                if not math.isnan(s):
                    total[i] += spec.weight * s
        for i, t in enumerate(total):
            if not abs(t) <= FLOAT32_MAX:  # each term was in range; weights can still push the sum out
                terms = {k: components[k][i] for k in self.keys if k in components}
                raise ValueError(
                    f"the weighted sum of the rewards is {t:.6g} for sample {i} (components {terms}), outside "
                    f"float32 range (|x| <= {FLOAT32_MAX:.8g}); training would see it as inf: lower the weights"
                )
        return {
            "total": total,
            "components": components,
            "weights": {key: float(spec.weight) for key, spec in zip(self.keys, self.specs)},
            "extras": extras,
        }

    def close(self) -> None:
        for reward in self.rewards:
            reward.close()


def _rows_of(spec: RewardSpec, columns: Mapping[str, Sequence[Any]], n: int) -> list[int]:
    tasks = columns.get("task", columns.get("data_source"))
    if tasks is None:
        raise ValueError(
            f"reward {spec.name!r} is limited to tasks {list(spec.tasks)} but the batch has no 'task' column"
        )
    return [i for i in range(n) if tasks[i] in spec.tasks]


def _spread(values: Sequence[Any], idx: list[int], n: int, fill: Any) -> list[Any]:
    out = [fill] * n
    for j, i in enumerate(idx):
        out[i] = values[j]
    return out
