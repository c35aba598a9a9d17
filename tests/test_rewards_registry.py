"""Reward registry, custom loading of TRL- and verl-shaped functions, and the weighted sum."""
from __future__ import annotations

import math
import pickle
import re
import sys
import textwrap

import pytest

from rewards import (
    PRESETS,
    Reward,
    RewardSpec,
    WeightedReward,
    available_rewards,
    build_reward,
    check_reward_config,
    load_reward,
    preset,
    register_reward,
)

PLUGIN = textwrap.dedent(
    '''
    import numpy as np

    NOT_CALLABLE = 3

    def length_reward(completions, target_len, **kwargs):
        """TRL-style."""
        return [-abs(len(c) - t) for c, t in zip(completions, target_len)]

    def needs_prompts(prompts, completions, bonus=0.0):
        return [bonus + (1.0 if p in c else 0.0) for p, c in zip(prompts, completions)]

    def not_applicable(completions, task, **kwargs):
        return [1.0 if t == "mine" else None for t in task]

    def as_array(completions, **kwargs):
        return np.ones(len(completions))

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        """verl-style with a dict result."""
        hit = float(solution_str.strip() == ground_truth)
        return {"score": hit, "source": data_source, "weight": (extra_info or {}).get("w")}

    def exact_match(solution_str, ground_truth, scale=1.0):
        """verl-style, older two-argument form, float result."""
        return scale * float(solution_str == ground_truth)

    def odd(a, b):
        return [0.0] * len(b)

    def short(completions, **kwargs):
        return [1.0]

    def wordy(completions, **kwargs):
        return ["good"] * len(completions)

    def infinite(completions, **kwargs):
        return [float("inf")] * len(completions)

    def no_score(solution_str, ground_truth):
        return {"acc": 1.0}

    def out_of_range(completions, value, **kwargs):
        """Returns the column `value` as it is: the boundary's test subject."""
        return list(value)

    def verl_huge(solution_str, ground_truth):
        return {"score": 1e39, "note": "too big"}

    def rich_extras(solution_str, ground_truth):
        import threading
        return {"score": float(solution_str == ground_truth), "label": "ok", "flag": True,
                "scalar": np.float32(0.5), "tokens": [1, 2], "lock": threading.Lock(), "missing": None}

    class Stateful:
        def __init__(self, offset):
            self.offset = offset

        def __call__(self, prompts, completions, **columns):
            return [self.offset + len(c) for c in completions]
    '''
)


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(PLUGIN)
    return path


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    package = tmp_path / "reward_plugin_pkg_for_tests"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "reward_plugin_pkg_for_tests.scoring"


# ---- built-ins by name ------------------------------------------------------------------------------


def test_builtins_by_name():
    assert {"math", "format", "countdown"} <= set(available_rewards())
    fmt = build_reward("format", {"partial_credit": True})
    assert isinstance(fmt, Reward) and fmt.shape == "trl" and fmt.name == "format"
    assert fmt(["p"], ["<think>a</think><answer>b</answer>"]) == [1.0]
    with pytest.raises(ValueError, match=r"unknown reward 'nope': expected one of \["):
        build_reward("nope")
    with pytest.raises(ValueError, match=r"reward 'math': unknown kwargs \['bogus'\]; it accepts"):
        build_reward("math", {"bogus": 1})
    with pytest.raises(ValueError, match="built in and TRL-shaped"):
        build_reward("format", shape="verl")


def test_register_reward():
    register_reward("always_one_for_tests", lambda: (lambda prompts, completions, **c: [1.0] * len(completions)))
    try:
        assert build_reward("always_one_for_tests")(None, ["a", "b"]) == [1.0, 1.0]
        with pytest.raises(ValueError, match="already registered"):
            register_reward("always_one_for_tests", lambda: None)
        with pytest.raises(ValueError, match="without ':', '/' or '.'"):
            register_reward("a.b", lambda: None)
    finally:
        register_reward("always_one_for_tests", lambda: None, overwrite=True)


# ---- custom rewards: both shapes, both path forms ------------------------------------------------------


def test_load_trl_shape_from_file(plugin):
    reward = load_reward(f"{plugin}:length_reward")
    assert reward.shape == "trl" and reward.name == "length_reward"
    assert reward(["p", "p"], ["abc", "a"], target_len=[3, 3], unused=[0, 0]) == [0.0, -2.0]
    # Without **kwargs a function gets only what it names; bound kwargs are passed on every call.
    picky = load_reward(f"{plugin}:needs_prompts", kwargs={"bonus": 0.5})
    assert picky(["x", "y"], ["has x", "no"], answer=["1", "2"]) == [1.5, 0.5]
    # None means "does not apply" (TRL), arrays are accepted.
    scores = load_reward(f"{plugin}:not_applicable")(None, ["a", "b"], task=["mine", "other"])
    assert [math.isnan(s) for s in scores] == [False, True]
    assert load_reward(f"{plugin}:as_array")(None, ["a", "b"]) == [1.0, 1.0]


def test_load_verl_shape_from_dotted_paths(plugin_package):
    reward = load_reward(f"{plugin_package}:compute_score")
    assert reward.shape == "verl"
    result = reward.score(
        ["q", "q"],
        [" 42 ", "41"],
        data_source=["gsm8k", "gsm8k"],
        ground_truth=["42", "42"],
        extra_info=[{"w": 2}, None],
    )
    assert result.scores == [1.0, 0.0]
    assert result.extras == {"source": ["gsm8k", "gsm8k"], "weight": [2, None]}
    # Dotted form without ':' and this project's column names (answer, task) as aliases.
    older = load_reward(f"{plugin_package}.exact_match", kwargs={"scale": 2.0})
    assert older.shape == "verl"
    assert older(None, ["7", "8"], answer=["7", "7"], task=["t", "t"]) == [2.0, 0.0]


def test_class_targets_are_instantiated_with_kwargs(plugin):
    reward = load_reward(f"{plugin}:Stateful", kwargs={"offset": 10})
    assert reward(None, ["ab"]) == [12.0]


def test_forced_shape_calls_positionally(plugin):
    with pytest.raises(ValueError, match=r"cannot tell its shape from its parameters \['a', 'b'\].*shape='trl'"):
        load_reward(f"{plugin}:odd")
    assert load_reward(f"{plugin}:odd", shape="trl")(None, ["x", "y"]) == [0.0, 0.0]
    with pytest.raises(ValueError, match="shape must be one of"):
        load_reward(f"{plugin}:odd", shape="openai")


def test_load_errors_name_the_problem(plugin, tmp_path):
    with pytest.raises(FileNotFoundError, match="file '/no/such/rewards.py' does not exist"):
        load_reward("/no/such/rewards.py:f")
    with pytest.raises(AttributeError, match=r"has no attribute 'missing' \(its public callables: \[.*'compute_score'"):
        load_reward(f"{plugin}:missing")
    with pytest.raises(TypeError, match=r"is not callable \(it is a int\)"):
        load_reward(f"{plugin}:NOT_CALLABLE")
    with pytest.raises(ModuleNotFoundError, match="no module named 'no_such_reward_module_xyz'"):
        load_reward("no_such_reward_module_xyz.f")
    with pytest.raises(ValueError, match="name the function in the file"):
        load_reward(str(plugin))
    with pytest.raises(ValueError, match="expected 'pkg.module:func'"):
        load_reward("justaname:")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(ImportError, match=r"running .*broken.py failed: RuntimeError: boom at import"):
        load_reward(f"{broken}:f")
    text = tmp_path / "rewards.txt"
    text.write_text("")
    with pytest.raises(ValueError, match="is not a .py file"):
        load_reward(f"{text}:f")


def test_bad_results_and_calls_name_the_reward(plugin):
    with pytest.raises(ValueError, match=r"reward 'short' returned 1 values for 2 completions"):
        load_reward(f"{plugin}:short")(None, ["a", "b"])
    with pytest.raises(ValueError, match=r"reward 'wordy' returned str \('good'\) for sample 0; expected a float"):
        load_reward(f"{plugin}:wordy")(None, ["a"])
    with pytest.raises(ValueError, match="reward 'infinite' returned inf for sample 0; rewards must be finite"):
        load_reward(f"{plugin}:infinite")(None, ["a"])
    with pytest.raises(
        ValueError, match=r"reward 'no_score' returned a dict without key 'score' for sample 0 \(keys \['acc'\]\)"
    ):
        load_reward(f"{plugin}:no_score")(None, ["a"], ground_truth=["a"])
    with pytest.raises(ValueError, match=r"reward 'length_reward' requires argument 'target_len'"):
        load_reward(f"{plugin}:length_reward")(None, ["a"])
    with pytest.raises(
        ValueError, match=r"reward 'exact_match' \(verl-style\) needs column 'ground_truth' or 'answer'"
    ):
        load_reward(f"{plugin}:exact_match")(None, ["a"])
    with pytest.raises(ValueError, match=r"kwargs \['target_len'\] are also batch columns"):
        load_reward(f"{plugin}:length_reward", kwargs={"target_len": [1]})(None, ["a"], target_len=[1])


# ---- weighted sum --------------------------------------------------------------------------------------


def test_weighted_sum_keeps_components(plugin):
    specs = [
        {"name": "format", "weight": 0.5},
        RewardSpec(f"{plugin}:not_applicable", weight=2.0, key="mine"),
        {"name": f"{plugin}:compute_score", "weight": 1.0, "key": "exact"},
    ]
    combo = WeightedReward(specs)
    out = combo(
        ["p", "p"],
        ["<think>a</think><answer>b</answer>", "b"],
        task=["mine", "other"],
        ground_truth=["b", "b"],
        data_source=["d", "d"],
    )
    assert out["components"]["format"] == [1.0, 0.0]
    assert out["components"]["mine"][0] == 1.0 and math.isnan(out["components"]["mine"][1])
    assert out["components"]["exact"] == [0.0, 1.0]
    assert out["total"] == [0.5 * 1.0 + 2.0 * 1.0 + 0.0, 0.0 + 1.0]  # the NaN is skipped
    assert out["weights"] == {"format": 0.5, "mine": 2.0, "exact": 1.0}
    assert out["extras"]["exact/source"] == ["d", "d"]


def test_text_reasoning_preset_is_mmada_correctness_plus_format():
    assert [(s.name, s.weight) for s in preset("text_reasoning")] == [("math", 2.0), ("format", 0.5)]
    combo = WeightedReward(preset("text_reasoning"))
    try:
        out = combo(
            None,
            [
                "<think>half</think><answer>\\frac{1}{2}</answer>",
                "<answer>0.5</answer>",
                "<think>x</think><answer>3</answer>",
                "no",
            ],
            answer=["0.5"] * 4,
        )
        assert out["total"] == [2.5, 2.0, 0.5, 0.0]
        assert out["components"] == {"math": [1.0, 1.0, 0.0, 0.0], "format": [1.0, 0.0, 1.0, 0.0]}
    finally:
        combo.close()
    assert set(PRESETS) >= {"text_reasoning", "countdown"}
    with pytest.raises(ValueError, match="unknown reward preset 'nope'"):
        preset("nope")


def test_weighted_sum_rejects_bad_specs():
    with pytest.raises(ValueError, match=r"unknown keys \['wieght'\]"):
        WeightedReward([{"name": "format", "wieght": 2.0}])
    with pytest.raises(ValueError, match="missing key 'name'"):
        WeightedReward([{"weight": 2.0}])
    with pytest.raises(ValueError, match="weight must be a finite number"):
        RewardSpec("format", weight=float("inf"))
    with pytest.raises(ValueError, match=r"component keys \['format'\] appear twice"):
        WeightedReward(["format", {"name": "format", "weight": 2.0}])
    with pytest.raises(ValueError, match="non-empty list of reward specs"):
        WeightedReward([])
    with pytest.raises(ValueError, match="non-empty list of reward specs"):
        WeightedReward("format")


# ---- the reward boundary: finite, float32, None = does not apply ----------------------------------------


def test_reward_boundary_refuses_nan_and_values_outside_float32(plugin):
    reward = load_reward(f"{plugin}:out_of_range")
    # In range, at float32's edge, and None ("does not apply") pass.
    ok = reward(None, ["a", "b", "c"], value=[1.0, -3.4028234e38, None])
    assert ok[:2] == [1.0, -3.4028234e38] and math.isnan(ok[2])
    # 1e39 became inf after the float32 cast in training and silently turned learning off.
    for bad, shown in [(1e39, "1e+39"), (-1e39, "-1e+39"), (10**400, "1000000"), (float("inf"), "inf")]:
        expected = rf"reward 'out_of_range' returned {re.escape(shown)}.* for sample 1; .*float32 range"
        with pytest.raises(ValueError, match=expected):
            reward(None, ["a", "b"], value=[0.0, bad])
    with pytest.raises(ValueError, match=r"reward 'out_of_range' returned nan for sample 0; return None where"):
        reward(None, ["a"], value=[float("nan")])
    with pytest.raises(ValueError, match=r"reward 'verl_huge' returned 1e\+39 for sample 0"):
        load_reward(f"{plugin}:verl_huge")(None, ["a"], ground_truth=["a"])


def test_weighted_sum_names_the_batch_sample_and_bounds_the_total(plugin):
    # Limited to task "b", the plugin sees rows 1 and 3 as its samples 0 and 1; the error names row 3.
    combo = WeightedReward([{"name": f"{plugin}:out_of_range", "tasks": ["b"]}])
    with pytest.raises(ValueError, match=r"reward 'out_of_range' returned 1e\+39 for sample 3;"):
        combo(None, ["w", "x", "y", "z"], task=["a", "b", "a", "b"], value=[0.0, 1.0, 0.0, 1e39])
    # Each term in range, the weighted sum not.
    twice = WeightedReward([{"name": f"{plugin}:out_of_range", "weight": 2.0}])
    with pytest.raises(ValueError, match=r"weighted sum of the rewards is 6e\+38 for sample 0 .*'out_of_range': 3e\+3"):
        twice(None, ["a"], value=[3e38])


# ---- the plugin path: one rule for component keys, checked before any actor starts ---------------------


def test_a_plugin_is_the_accuracy_reward_by_file_path_and_by_dotted_path(plugin, plugin_package):
    from rewards.worker import RewardWorker

    for name, key in [(f"{plugin}:compute_score", "compute_score"), (f"{plugin_package}.exact_match", "exact_match"),
                      (f"{plugin_package}:compute_score", "compute_score")]:
        functions = [{"name": name, "weight": 2.0}, {"name": "format", "weight": 0.5}]
        # The config check and the worker agree on the key.
        assert check_reward_config(functions, accuracy=key) == [key, "format"]
        worker = RewardWorker(functions, accuracy=[key])
        out = worker.score(["q", "q"], ["7", "8"], [{"answer": "7"}, {"answer": "7"}])
        assert out.accuracy == [1.0, 0.0] and out.components[key] == [1.0, 0.0], name
    # An explicit key wins; the full path is not a key.
    keyed = [{"name": f"{plugin}:compute_score", "key": "exact"}]
    assert check_reward_config(keyed, ["exact"]) == ["exact"]
    with pytest.raises(ValueError, match=r"reward.accuracy='.*my_rewards.py:compute_score': expected one of the reward "
                                         r"components \['exact'\]"):
        check_reward_config(keyed, [f"{plugin}:compute_score"])
    assert RewardSpec(f"{plugin}:Stateful.__call__").component_key == "__call__"
    assert RewardSpec("math").component_key == "math"


def test_check_reward_config_loads_every_plugin_and_names_the_problem(plugin, tmp_path):
    def problem(functions, accuracy=()):
        with pytest.raises(ValueError) as info:
            check_reward_config(functions, list(accuracy))
        return str(info.value)

    assert problem([{"name": "format"}, {"name": "/no/such/file.py:f"}]).startswith(
        "reward.functions[1]: reward '/no/such/file.py:f': file '/no/such/file.py' does not exist")
    assert re.match(r"reward.functions\[0\]: reward '.*my_rewards.py:missing': .* has no attribute 'missing' "
                    r"\(its public callables: \[.*'compute_score'", problem([f"{plugin}:missing"]))
    broken = tmp_path / "broken_syntax.py"
    broken.write_text("def f(completions):\n    return [1.0 for c in completions\n")
    assert re.match(r"reward.functions\[0\]: reward '.*broken_syntax.py:f': running .*broken_syntax.py failed: "
                    r"SyntaxError: ", problem([{"name": f"{broken}:f"}]))
    assert re.match(r"reward.functions\[0\]: reward 'no_such_module_for_tests.f': no module named",
                    problem(["no_such_module_for_tests.f"]))
    assert re.match(r"reward.functions\[0\]: reward '.*:odd': cannot tell its shape", problem([f"{plugin}:odd"]))
    assert re.match(r"reward.functions\[0\]: reward '.*:needs_prompts': unknown kwargs \['bonsu'\]; it accepts "
                    r"\['bonus', 'completions', 'prompts'\]",
                    problem([{"name": f"{plugin}:needs_prompts", "kwargs": {"bonsu": 1.0}}]))
    assert re.match(r"reward.functions\[0\]: reward '.*:Stateful': unknown kwargs \['offest'\]",
                    problem([{"name": f"{plugin}:Stateful", "kwargs": {"offest": 1}}]))
    assert re.match(r"reward.functions\[0\]: reward '.*:NOT_CALLABLE' is not callable",
                    problem([f"{plugin}:NOT_CALLABLE"]))
    assert problem([{"name": "math", "kwargs": {"timeout": 1}}]).startswith(
        "reward.functions[0]: reward 'math': unknown kwargs ['timeout']; it accepts")
    assert problem([{"name": "format", "wieght": 1}]).startswith("reward.functions[0]: reward spec")
    assert problem(["nope"]).startswith("reward.functions[0]: unknown reward 'nope'")
    assert problem(["format", "format"]).startswith("reward.functions: component keys ['format'] appear twice")
    assert problem([]).startswith("reward.functions: expected a non-empty list")
    assert problem(["format"], ["math"]).startswith("reward.accuracy='math': expected one of the reward components")
    # Built-ins are checked by name and kwargs only, never built: CLIP would load a model here.
    assert check_reward_config([{"name": "clip", "kwargs": {"path": "/not/loaded/here"}}], []) == ["clip"]
    # A class plugin is checked, not instantiated.
    counting = tmp_path / "counting.py"
    counting.write_text("BUILT = []\nclass R:\n    def __init__(self):\n        BUILT.append(1)\n"
                        "    def __call__(self, completions):\n        return [0.0] * len(completions)\n")
    assert check_reward_config([f"{counting}:R"], ["R"]) == ["R"]
    assert load_reward(f"{counting}:R").fn.__class__.__module__.startswith("_reward_file_counting")
    assert sys.modules[load_reward(f"{counting}:R").fn.__class__.__module__].BUILT == [1, 1]


# ---- extras and the on_call hook ----------------------------------------------------------------------


def test_non_numeric_extras_reach_the_driver_as_plain_values(plugin):
    from rewards.worker import RewardWorker, Scores

    worker = RewardWorker([{"name": f"{plugin}:rich_extras", "key": "rich"}], accuracy=["rich"])
    out = worker.score(["q", "q"], ["a", "b"], [{"answer": "a"}, {"answer": "a"}])
    assert out.total == [1.0, 0.0]
    assert out.extras["rich/label"] == ["ok", "ok"] and out.extras["rich/flag"] == [True, True]
    assert out.extras["rich/scalar"] == [0.5, 0.5] and type(out.extras["rich/scalar"][0]) is float
    assert out.extras["rich/tokens"] == ["[1, 2]", "[1, 2]"]  # kept as its repr: logs show it, nothing breaks
    assert out.extras["rich/lock"][0].startswith("<unlocked _thread.lock")
    assert out.extras["rich/missing"] == [None, None]
    # They cross Ray (pickle) and join with parts that lack them.
    again = pickle.loads(pickle.dumps(out))
    other = RewardWorker(["format"], accuracy=[]).score(["q"], ["x"], [{"answer": "a"}])
    joined = Scores.concat([again, Scores(other.total, other.accuracy, {"rich": [0.0]}, {})])
    assert joined.extras["rich/label"] == ["ok", "ok", None]


def test_on_call_names_each_component_while_it_runs(plugin):
    from rewards.worker import RewardWorker

    calls = []
    worker = RewardWorker([{"name": "format"}, {"name": f"{plugin}:compute_score", "key": "exact"},
                           {"name": "countdown", "tasks": ["countdown"]}], accuracy=["exact"], on_call=calls.append)
    worker.score(["q"], ["a"], [{"answer": "a", "task": "arithmetic"}])
    assert calls == ["format", None, "exact", None]  # countdown applies to no row: not run, not named
    calls.clear()
    with pytest.raises(ValueError, match="needs column 'ground_truth'"):
        worker.score(["q"], ["a"], [{"task": "arithmetic"}])
    assert calls == ["format", None, "exact", None]  # None after a reward that raised, too
    with pytest.raises(ValueError, match="on_call must be callable"):
        WeightedReward(["format"], on_call="log")


def test_a_bad_reward_value_error_survives_pickling_as_itself(plugin):
    """It is raised in a Ray reward worker and re-raised on the driver: it must unpickle as itself."""
    with pytest.raises(ValueError) as caught:
        load_reward(f"{plugin}:out_of_range")(None, ["a"], value=[1e39])
    again = pickle.loads(pickle.dumps(caught.value))
    assert type(again) is type(caught.value) and str(again) == str(caught.value)
