"""Rewards by name or by path, all behind one call signature.

Uniform call, for built-in and loaded rewards alike:

    reward(prompts, completions, **columns) -> list[float]

- `prompts`: one entry per completion (the prompt text for text tasks; anything, or None, else).
- `completions`: list[str], the decoded answers.
- `columns`: per-sample lists, one entry per completion, named like the dataset columns. Names
  with a fixed meaning: `ground_truth` (alias `answer`, this project's task rows) the reference
  answer; `data_source` (alias `task`) the task name; `extra_info` a dict per sample (verl).
  Task-specific columns pass through (`numbers`, `target` for Countdown).
- Returns one float per completion (the wrapper turns a function's None, "does not apply to this
  sample", into NaN, which the weighted sum skips).

The boundary (`Reward`): a function returns a real number or None per sample. NaN and infinities
are refused, as are values outside float32 range (|x| > 3.4028235e38): training casts rewards to
float32, where 1e39 becomes inf and every update after it NaN. NaN is not accepted as "does not
apply" (TRL itself only documents None): a NaN is far more often a 0/0 in the reward than a
choice, and silently dropping it would change the sum. The error names the reward and the sample.

`Reward.score(...)` returns the same scores plus `extras`: the additional keys of verl-style dict
results, one list per key (None where a sample lacked it), for logging. Numbers, strings, bools and
None pass as they are, 0-d arrays as their Python scalar, anything else as its (shortened) repr, so
that extras always pickle (they cross Ray) and never hold a model's tensors.

Shapes accepted from user code (`load_reward`), told apart by parameter names, or forced with
`shape=`:

- "trl":  `reward_func(prompts, completions, **columns) -> list[float | None]`, one call per
  batch. Parameters are passed by name; without `**kwargs` a function gets only the columns it
  names. (Completions are plain strings, not TRL's chat-message lists.)
- "verl": `compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict`,
  one call per sample; a dict must hold "score", its other keys become extras.

A name containing `solution_str` selects "verl", `completions` selects "trl"; a forced shape whose
parameter names do not match is called positionally. `kwargs` given with the reward are passed on
every call (verl's `reward_kwargs`); if the target is a class it is instantiated with them instead.
Either way they must be parameters of the target (or it takes `**kwargs`).

`check_reward` does every check `build_reward` does without building anything, for the config
check before any actor starts.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rewards._common import check_batch
from rewards.clip import ClipReward
from rewards.countdown import CountdownReward
from rewards.exact import ExactReward
from rewards.format import FormatReward
from rewards.math_reward import MathReward
from rewards.sudoku import SudokuReward

SHAPES = ("trl", "verl")
# numpy.finfo(numpy.float32).max: rewards become float32 tensors in training.
FLOAT32_MAX = 3.4028234663852886e38
_EXTRA_REPR_CHARS = 200
_VERL_PARAMS = ("data_source", "solution_str", "ground_truth", "extra_info")
_COLUMN_ALIASES = {
    "data_source": ("data_source", "task"),
    "ground_truth": ("ground_truth", "answer"),
    "extra_info": ("extra_info",),
}

_REGISTRY: dict[str, Callable[..., Callable]] = {
    "math": MathReward,
    "format": FormatReward,
    "countdown": CountdownReward,
    "exact": ExactReward,
    "sudoku": SudokuReward,
    "clip": ClipReward,
}


class RewardValueError(ValueError):
    """A reward returned a value that training cannot use, for sample `index` of its call."""

    def __init__(self, reward: str, index: int, value: str, why: str):
        self.reward, self.index, self.value, self.why = reward, index, value, why
        super().__init__(f"reward {reward!r} returned {value} for sample {index}; {why}")

    def __reduce__(self):
        # Rebuilt from its four fields: it crosses from a Ray reward worker to the driver by pickle.
        return type(self), (self.reward, self.index, self.value, self.why)

    def at(self, index: int) -> "RewardValueError":
        """The same error with another sample index (the batch's, for a reward called on some rows)."""
        return RewardValueError(self.reward, index, self.value, self.why)


@dataclass
class RewardResult:
    scores: list[float]
    extras: dict[str, list[Any]] = field(default_factory=dict)


class Reward:
    """A reward function of either shape, called through the uniform signature (module docstring)."""

    def __init__(self, name: str, fn: Callable, shape: str, kwargs: Mapping[str, Any] | None = None):
        if shape not in SHAPES:
            raise ValueError(f"reward {name!r}: shape must be one of {SHAPES}, got {shape!r}")
        self.name, self.fn, self.shape = name, fn, shape
        self.kwargs = dict(kwargs or {})
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        self._takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        self._params = {k: p for k, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        names = set(self._params)
        self._by_name = ("completions" in names) if shape == "trl" else ("solution_str" in names)

    def __repr__(self) -> str:
        return f"Reward({self.name!r}, shape={self.shape!r})"

    def __call__(
        self, prompts: Sequence[Any] | None, completions: Sequence[str], **columns: Sequence[Any]
    ) -> list[float]:
        return self.score(prompts, completions, **columns).scores

    def score(
        self, prompts: Sequence[Any] | None, completions: Sequence[str], **columns: Sequence[Any]
    ) -> RewardResult:
        n = check_batch(self.name, prompts, completions, columns)
        clash = sorted(set(self.kwargs) & set(columns))
        if clash:
            raise ValueError(f"reward {self.name!r}: kwargs {clash} are also batch columns; rename one of them")
        if self.shape == "trl":
            return RewardResult(self._check_list(self._call_trl(prompts, completions, columns), n))
        return self._score_verl(completions, columns, n)

    def _call_trl(self, prompts, completions, columns) -> Any:
        if not self._by_name:
            return self.fn(prompts, completions, **columns, **self.kwargs)
        offered = {"prompts": prompts, "completions": completions, **columns, **self.kwargs}
        args = offered if self._takes_any else {k: v for k, v in offered.items() if k in self._params}
        self._check_required(args, columns)
        return self.fn(**args)

    def _score_verl(self, completions, columns, n) -> RewardResult:
        per_column = {
            param: next((columns[c] for c in aliases if c in columns), None)
            for param, aliases in _COLUMN_ALIASES.items()
        }
        needs_truth = not self._by_name or self._takes_any or "ground_truth" in self._params
        if needs_truth and per_column["ground_truth"] is None:
            raise ValueError(
                f"reward {self.name!r} (verl-style) needs column 'ground_truth' or 'answer'; "
                f"the batch has columns {sorted(columns)}"
            )
        scores: list[float] = []
        extras: dict[str, list[Any]] = {}
        for i in range(n):
            values = {p: (None if col is None else col[i]) for p, col in per_column.items()}
            values["solution_str"] = completions[i]
            if self._by_name:
                args = {k: v for k, v in values.items() if self._takes_any or k in self._params}
                self._check_required({**args, **self.kwargs}, columns)
                out = self.fn(**args, **self.kwargs)
            else:
                out = self.fn(*(values[p] for p in _VERL_PARAMS), **self.kwargs)
            if isinstance(out, Mapping):
                if "score" not in out:
                    raise ValueError(
                        f"reward {self.name!r} returned a dict without key 'score' for sample {i} "
                        f"(keys {sorted(out)}); expected a number or a dict with 'score'"
                    )
                for key, value in out.items():
                    if key != "score":
                        extras.setdefault(key, [None] * n)[i] = _plain(value)
                out = out["score"]
            scores.append(self._to_float(out, i))
        return RewardResult(scores, extras)

    def _check_required(self, args: Mapping[str, Any], columns: Mapping[str, Any]) -> None:
        for name, p in self._params.items():
            if p.default is p.empty and name not in args:
                raise ValueError(
                    f"reward {self.name!r} requires argument {name!r}, which is neither a batch column "
                    f"nor one of its kwargs; the batch has columns {sorted(columns)}"
                )

    def _check_list(self, out: Any, n: int) -> list[float]:
        if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
            out = out.tolist()
        if not isinstance(out, (list, tuple)):
            raise TypeError(f"reward {self.name!r} returned {type(out).__name__}; expected a list of {n} floats")
        if len(out) != n:
            raise ValueError(
                f"reward {self.name!r} returned {len(out)} values for {n} completions; expected one per completion"
            )
        return [self._to_float(v, i) for i, v in enumerate(out)]

    def _to_float(self, value: Any, index: int) -> float:
        """A returned value as a float, NaN for None ("does not apply"); see the module docstring."""
        if value is None:
            return math.nan
        if hasattr(value, "item") and not isinstance(value, numbers.Real) and getattr(value, "ndim", 1) == 0:
            value = value.item()
        if not isinstance(value, numbers.Real):
            raise RewardValueError(self.name, index, f"{type(value).__name__} ({value!r:.80})",
                                   "expected a float, or None where the reward does not apply")
        if value != value:  # NaN, of any numeric type
            raise RewardValueError(self.name, index, "nan", "return None where the reward does not apply, never NaN")
        if not abs(value) <= FLOAT32_MAX:  # compared before float(): an int past float64 would raise there
            shown = f"{value:.6g}" if isinstance(value, float) else f"{value!r:.40}"
            raise RewardValueError(self.name, index, shown, f"rewards must be finite and within float32 range "
                                   f"(|x| <= {FLOAT32_MAX:.8g}): training casts them to float32, where it would be inf")
        return float(value)

    def close(self) -> None:
        """Release what the reward holds (MathReward's worker process), if it has a `close`."""
        close = getattr(self.fn, "close", None)
        if callable(close):
            close()


def _plain(value: Any) -> Any:
    """An extra's value as something that pickles and logs (module docstring)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        try:
            return value.item()
        except Exception:
            pass
    return repr(value)[:_EXTRA_REPR_CHARS]


def register_reward(name: str, factory: Callable[..., Callable], overwrite: bool = False) -> None:
    """Make `factory(**kwargs)` (returning a TRL-shaped callable) available as `name`."""
    if not isinstance(name, str) or not name or any(c in name for c in ":/."):
        raise ValueError(f"reward name must be a non-empty string without ':', '/' or '.', got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(factory):
        raise TypeError(f"reward {name!r}: factory must be callable, got {type(factory).__name__}")
    _REGISTRY[name] = factory


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def is_reward_path(name: str) -> bool:
    """Whether a reward name is a path (module or file) rather than a registered name: only paths
    contain ':', '.' or '/' (`register_reward` refuses those characters)."""
    return any(c in name for c in ":./") or os.sep in name


def split_reward_path(target: str) -> tuple[str, str]:
    """`pkg.module:func`, `pkg.module.func` or `/path/to/file.py:func` -> (module or file, attribute)."""
    if ":" in target:
        source, attr = target.rsplit(":", 1)
    elif target.endswith(".py"):
        raise ValueError(f"reward {target!r}: name the function in the file, as '{target}:func'")
    else:
        source, _, attr = target.rpartition(".")
    if not source or not attr:
        raise ValueError(
            f"reward {target!r}: expected 'pkg.module:func', 'pkg.module.func' or '/path/to/file.py:func'"
        )
    return source, attr


def component_key(name: str, key: str | None = None) -> str:
    """The one rule for a reward's key among the components (logs, `reward.accuracy`): `key` if
    given, else for a path the function's name (`/x/my.py:score` -> `score`, `pkg.mod.Cls.method`
    -> `method`), else the registered name. The config check and the reward worker both use it."""
    if key:
        return key
    if is_reward_path(name):
        return split_reward_path(name)[1].rsplit(".", 1)[-1]
    return name


def check_reward(name: str, kwargs: Mapping[str, Any] | None = None, shape: str | None = None) -> None:
    """Every check `build_reward` makes, without building: for a built-in, its name, shape and kwargs
    against the factory's signature (building CLIP would load a model); for a path, the module or
    file is imported and the attribute found, its shape detected (or the forced one accepted) and
    the kwargs checked against its signature (a class is not instantiated). Raises what
    `build_reward` would."""
    kwargs = dict(kwargs or {})
    if _builtin(name, kwargs, shape) is None:
        _check_shape_arg(name, shape)
        _check_target(name, _resolve(name), kwargs, shape)


def build_reward(name: str, kwargs: Mapping[str, Any] | None = None, shape: str | None = None) -> Reward:
    """A registered reward by name, else a function by path (see `load_reward`)."""
    kwargs = dict(kwargs or {})
    factory = _builtin(name, kwargs, shape)
    if factory is not None:
        return Reward(name, factory(**kwargs), "trl")
    return load_reward(name, shape=shape, kwargs=kwargs)


def load_reward(target: str, shape: str | None = None, kwargs: Mapping[str, Any] | None = None,
                name: str | None = None) -> Reward:
    """Load `pkg.module:func`, `pkg.module.func` or `/path/to/file.py:func` (attribute paths like
    `module:Class.method` work too) and wrap it as a `Reward` named `name` (default: its
    `component_key`, the function's name)."""
    kwargs = dict(kwargs or {})
    _check_shape_arg(target, shape)
    obj = _resolve(target)
    shape = _check_target(target, obj, kwargs, shape)
    if inspect.isclass(obj):
        obj, kwargs = obj(**kwargs), {}
    return Reward(name or component_key(target), obj, shape, kwargs)


def _builtin(name: str, kwargs: Mapping[str, Any], shape: str | None) -> Callable | None:
    """The checked factory of a registered reward; None for a path; an error for anything else."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        if shape not in (None, "trl"):
            raise ValueError(f"reward {name!r} is built in and TRL-shaped; shape={shape!r} does not apply")
        _check_kwargs(name, _REGISTRY[name], kwargs)
        return _REGISTRY[name]
    if is_reward_path(name):
        return None
    raise ValueError(
        f"unknown reward {name!r}: expected one of {available_rewards()}, a dotted path "
        "('pkg.module:func' or 'pkg.module.func') or a file path ('/path/to/file.py:func')"
    )


def _check_shape_arg(target: str, shape: str | None) -> None:
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"reward {target!r}: shape must be one of {SHAPES} or None (detect), got {shape!r}")


def _resolve(target: str) -> Any:
    """The object a path names (the module is imported, a file run)."""
    source, attr = split_reward_path(target)
    is_file = source.endswith(".py") or "/" in source or os.sep in source
    module = _import_file(source, target) if is_file else _import_module(source, target)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
            raise AttributeError(
                f"reward {target!r}: {source} has no attribute {attr!r} (its public callables: {public})"
            )
        obj = getattr(obj, part)
    return obj


def _check_target(target: str, obj: Any, kwargs: Mapping[str, Any], shape: str | None) -> str:
    """Check a loaded target without calling it; its shape. A class gets the kwargs when it is
    instantiated and is called through `__call__`; a function gets them with every call."""
    if inspect.isclass(obj):
        if not any("__call__" in vars(k) for k in obj.__mro__ if k is not object):
            raise TypeError(f"reward {target!r} is a class whose instances are not callable (it defines no __call__)")
        call = functools.partial(obj.__call__, None)  # the signature without `self`
    elif callable(obj):
        call = obj
    else:
        raise TypeError(f"reward {target!r} is not callable (it is a {type(obj).__name__})")
    _check_kwargs(target, obj, kwargs)
    return _detect_shape(call, shape, target)


def _detect_shape(fn: Callable, shape: str | None, target: str) -> str:
    if shape is not None:
        return shape
    try:
        names = set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        names = set()
    if "solution_str" in names:
        return "verl"
    if "completions" in names:
        return "trl"
    raise ValueError(
        f"reward {target!r}: cannot tell its shape from its parameters {sorted(names)}; expected TRL-style "
        "(prompts, completions, **columns) or verl-style (data_source, solution_str, ground_truth, extra_info). "
        "Pass shape='trl' or shape='verl' to call it positionally in that shape."
    )


def _check_kwargs(name: str, factory: Callable, kwargs: Mapping[str, Any]) -> None:
    if not kwargs:
        return
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return  # a builtin without a signature: the first call will tell
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        accepted = sorted(k for k, p in params.items() if p.kind is not p.VAR_POSITIONAL)
        raise ValueError(f"reward {name!r}: unknown kwargs {unknown}; it accepts {accepted}")


def _import_module(source: str, target: str):
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as e:
        if e.name is not None and (source == e.name or source.startswith(e.name + ".")):
            raise ModuleNotFoundError(f"reward {target!r}: no module named {source!r} (is it on sys.path?)") from e
        raise ImportError(f"reward {target!r}: importing {source} failed: {type(e).__name__}: {e}") from e
    except Exception as e:  # the module's own code failed (a SyntaxError, an import-time error)
        raise ImportError(f"reward {target!r}: importing {source} failed: {type(e).__name__}: {e}") from e


def _import_file(source: str, target: str):
    path = Path(source).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"reward {target!r}: file {source!r} does not exist (resolved to {path})")
    if path.suffix != ".py":
        raise ValueError(f"reward {target!r}: {source!r} is not a .py file")
    # One module per file path, so loading the same file twice gives the same functions.
    module_name = f"_reward_file_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise ImportError(f"reward {target!r}: running {path} failed: {type(e).__name__}: {e}") from e
    return module
