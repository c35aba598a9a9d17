"""Format and Countdown rewards (pure Python, no worker process)."""
from __future__ import annotations

import time
from fractions import Fraction

import pytest

from rewards import CountdownReward, FormatReward, countdown_score, evaluate_equation, format_score
from rewards.format import PARTIAL_CREDIT_PER_TAG

# ---- format -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>a</think><answer>b</answer>", 1.0),
        ("  \n<think>\nsteps\n</think>\n\n<answer> 42 </answer>\n", 1.0),
        ("<think></think><answer>b</answer>", 1.0),  # empty reasoning is allowed
        ("<think>a</think><answer> </answer>", 0.0),  # empty answer is not
        ("<answer>b</answer><think>a</think>", 0.0),
        ("preamble <think>a</think><answer>b</answer>", 0.0),
        ("<think>a</think><answer>b</answer> trailing", 0.0),
        ("<think>a</think> between <answer>b</answer>", 0.0),
        ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),
        ("<think>a <think> b</think><answer>c</answer>", 0.0),
        ("<think>a</think>", 0.0),
        ("", 0.0),
    ],
)
def test_format_score_strict(text, expected):
    assert format_score(text) == expected


def test_format_partial_credit_and_options():
    assert format_score("<think>a</think> b", partial_credit=True) == 2 * PARTIAL_CREDIT_PER_TAG
    assert format_score("<answer>b</answer><think>a</think>", partial_credit=True) == 4 * PARTIAL_CREDIT_PER_TAG
    assert format_score("<think>a</think><answer>b</answer>", partial_credit=True) == 1.0
    assert format_score("<think>a</think> \\boxed{3}", answer_tag=None) == 1.0
    assert format_score("<think>a</think>  ", answer_tag=None) == 0.0
    assert format_score("<reasoning>a</reasoning><sol>b</sol>", think_tag="reasoning", answer_tag="sol") == 1.0
    reward = FormatReward(partial_credit=True)
    assert reward(["p", "p"], ["<think>a</think><answer>b</answer>", "<think>a"]) == [1.0, PARTIAL_CREDIT_PER_TAG]


def test_format_reward_rejects_bad_options():
    with pytest.raises(ValueError, match="think_tag must be a tag name"):
        FormatReward(think_tag="<think>")
    with pytest.raises(ValueError, match="must differ"):
        FormatReward(think_tag="x", answer_tag="x")
    with pytest.raises(ValueError, match="partial_credit must be true or false"):
        FormatReward(partial_credit="yes")


def test_format_is_linear_on_megabyte_inputs():
    cases = [
        ("<think>" + "a" * 1_000_000 + "</think><answer>1</answer>", 1.0),
        ("</think><answer>" * 60_000, 0.0),
        ("<think>" + "</answer>" * 100_000 + "<answer>", 0.0),
    ]
    for text, expected in cases:
        start = time.monotonic()
        assert format_score(text, partial_credit=False) == expected
        assert format_score(text, partial_credit=True) <= 1.0
        assert time.monotonic() - start < 2.0


# ---- countdown ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("<answer>(3 + 5) * 2</answer>", 1.0),
        ("<think>try</think><answer>2*(5+3)</answer>", 1.0),
        ("<answer>1</answer> ... <answer>(3+5)*2</answer>", 1.0),  # the last answer counts
        ("<answer>3 + 5 + 2</answer>", 0.1),  # wrong value
        ("<answer>(3 + 5) * 2 * 2</answer>", 0.1),  # a number used twice (d1: each exactly once)
        ("<answer>16</answer>", 0.1),  # numbers not used
        ("<answer>(3 + 5) * 2 = 16</answer>", 0.1),  # d1's character set has no '='
        ("<answer>2 ** 3 + 8</answer>", 0.1),
        ("<answer>sixteen</answer>", 0.1),
        ("(3 + 5) * 2", 0.0),  # no answer tag
        ("<answer>(3 + 5) * 2", 0.0),  # unclosed
    ],
)
def test_countdown_score_mirrors_d1(answer, expected):
    assert countdown_score(answer, 16, [3, 5, 2]) == expected


def test_countdown_is_exact_and_safe_on_division():
    assert countdown_score("<answer>8 / (3 - 3)</answer>", 0, [8, 3, 3]) == 0.1
    assert countdown_score("<answer>1 / 3 * 3</answer>", 1, [1, 3, 3]) == 1.0
    assert countdown_score("<answer>-3 + 5</answer>", 2, [3, 5]) == 1.0
    assert countdown_score("<answer>7 / 2</answer>", 3, [7, 2]) == 0.1  # 3.5, no rounding


def test_evaluate_equation_accepts_only_bounded_arithmetic():
    assert evaluate_equation("(1 + 2) * 3 - 4 / 8") == (Fraction(17, 2), [1, 2, 3, 4, 8])
    for bad in [
        "",
        "2 ** 3",
        "abs(-1)",
        "1.5 + 1",
        "__import__('os').system('touch pwned')",
        "1; 2",
        "[1]",
        "1 if 1 else 2",
        "1 // 2",
        "1 % 2",
        "(1)(2)",
        "1 +",
        "0123",
        "1e3",
        "1 / 0",
        "99999999 * 99999999",  # past the 10**12 bound
    ]:
        assert evaluate_equation(bad) is None, bad
    huge = 10_000
    assert evaluate_equation("(" * huge + "1" + ")" * huge) is None
    assert evaluate_equation("(" * huge + "1" + ")" * huge, max_chars=10**6) is None
    assert evaluate_equation("-" * huge + "1", max_chars=10**6) is None
    assert evaluate_equation("1+" * huge + "1", max_chars=10**6) is None


def test_countdown_reward_columns():
    reward = CountdownReward()
    completions = ["<answer>3*4</answer>", "<answer>3+4</answer>"]
    assert reward(None, completions, numbers=[[3, 4], [3, 4]], target=[12, 12]) == [1.0, 0.1]
    assert reward(None, completions, nums=[(3, 4), (4, 3)], target=[12.0, 7]) == [1.0, 1.0]
    truths = [{"target": 12, "numbers": [3, 4]}, {"target": 7, "numbers": [4, 3]}]
    assert reward(None, completions, ground_truth=truths) == [1.0, 1.0]
    swapped = CountdownReward(correct_score=2.0, format_score=0.0)
    assert swapped(None, completions, ground_truth=truths[::-1]) == [0.0, 0.0]


def test_countdown_reward_rejects_bad_columns():
    reward = CountdownReward()
    one = ["<answer>1</answer>"]
    with pytest.raises(ValueError, match="needs column 'target' or 'ground_truth'"):
        reward(None, one, answer=["1"])
    with pytest.raises(ValueError, match="needs column 'numbers' or 'nums'"):
        reward(None, one, target=[1])
    with pytest.raises(ValueError, match=r"numbers\[0\] must be a list of integers, got str"):
        reward(None, one, target=[1], numbers=["1, 2"])
    with pytest.raises(ValueError, match=r"target\[0\] must be an integer, got float \(1.5\)"):
        reward(None, one, target=[1.5], numbers=[[1]])
    with pytest.raises(ValueError, match=r"ground_truth\[0\] must be a dict with keys 'target' and 'numbers'"):
        reward(None, one, ground_truth=["12"])
    with pytest.raises(ValueError, match="format_score must be a finite number"):
        CountdownReward(format_score=float("nan"))


# ---- exact ------------------------------------------------------------------------------------------


def test_exact_reward_matches_the_answer_tag_as_text():
    from rewards import ExactReward, build_reward

    r = build_reward("exact")
    assert isinstance(r.fn, ExactReward)
    comps = ["<answer>101 102 103</answer>", "<answer>\n101  102\n103 </answer>", "<answer>101 102</answer>",
             "101 102 103", "<answer>101 102 103</answer><answer>9</answer>", "<answer>101 102 104</answer>"]
    assert r(None, comps, answer=["101 102 103"] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert r(None, ["<answer>7</answer>"], ground_truth=[7]) == [1.0]
    assert ExactReward(answer_tag="list")(None, ["<list>a b</list>"], answer=["a b"]) == [1.0]
    with pytest.raises(ValueError, match=r"reward 'exact': ground truth \[1\] must be a non-empty string"):
        r(None, ["x", "y"], answer=["1", None])
    with pytest.raises(ValueError, match="needs column 'ground_truth' or 'answer'"):
        r(None, ["x"], target=["1"])
    with pytest.raises(ValueError, match="answer_tag must be a tag name"):
        ExactReward(answer_tag="<a>")
    # prefix: the ground truth's words first, whatever follows; a longer last number is no match
    prefix = ExactReward(prefix=True)
    assert prefix(None, ["<answer>101 102 103 104</answer>", "<answer>101 102 1034</answer>",
                         "<answer>101 102</answer>", "<answer>101 102 103</answer>"],
                  answer=["101 102 103"] * 4) == [1.0, 0.0, 0.0, 1.0]
    # an answer the length cut off before </answer> is read to its end, in prefix mode only; the last
    # answer counts even when an earlier one was closed
    cut = ["<answer>101 102 103 104 10", "<answer>101 102 10", "<answer>9</answer> <answer>101 102 103",
           "<answer>101 102 103</answer> <answer>7 8"]
    assert prefix(None, cut, answer=["101 102 103"] * 4) == [1.0, 0.0, 1.0, 0.0]
    assert r(None, cut, answer=["101 102 103"] * 4) == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="prefix must be true or false"):
        ExactReward(prefix="yes")


def test_exact_reward_is_linear_on_megabyte_inputs():
    from rewards import ExactReward

    text = "<answer>" + "1 " * 500_000 + "</answer>" + "<answer>" * 100_000
    t0 = time.perf_counter()
    assert ExactReward()(None, [text], answer=["1 " * 500_000]) == [1.0]
    assert time.perf_counter() - t0 < 2.0
