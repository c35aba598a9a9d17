"""Math reward, the killable worker pool, and hostile completions through every built-in reward."""
from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from rewards import (
    CountdownReward,
    FormatReward,
    MathReward,
    SubprocessPool,
    WeightedReward,
    extract_answer,
    normalize_answer,
    sanitize_answer,
)
from rewards.math_reward import _parse_gold, verify_answer, warm_up

HANG = "$9^{9^{9}}$"  # math-verify with its timeouts off spends minutes in sympy on this


# ---- jobs for the worker (module level: they travel to it by reference) ---------------------------


def sleep_then_echo(x, seconds):
    time.sleep(seconds)
    return x


def echo_or_die(x):
    if x == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def echo_or_raise(x):
    if x == "raise":
        raise ValueError("no")
    return x


def allocate(gib):
    return len(bytearray(gib << 30))


def worker_identity():
    return os.getpid(), os.getcwd()


@pytest.fixture(scope="module")
def pool():
    with SubprocessPool(timeout_s=3.0, initializer=warm_up) as p:
        yield p


def in_thread(fn, *args, **kwargs):
    """Run fn in a fresh non-main thread; return (its result, whether it ran off the main thread)."""
    out = {}

    def target():
        out["off_main"] = threading.current_thread() is not threading.main_thread()
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join(120)
    assert not t.is_alive(), "call did not return"
    if "error" in out:
        raise out["error"]
    return out["result"], out["off_main"]


# ---- extraction and sanitizing ----------------------------------------------------------------------


def test_extract_answer_prefers_last_tag_then_boxed_then_last_number():
    assert extract_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    assert extract_answer("<think>\\boxed{9}</think><answer>7</answer>") == "7"
    assert extract_answer("so \\boxed{\\frac{1}{2}} and \\boxed{\\frac{3}{4}}") == "\\frac{3}{4}"
    assert extract_answer("it is 12, no, 1,234.5 apples") == "1234.5"
    assert extract_answer("<ans>5</ans>", answer_tag="ans") == "5"
    assert extract_answer("no answer here") is None
    assert extract_answer("\\boxed{5} but untagged", fallback=False) is None
    # An unclosed box is not an answer; the last number still is.
    assert extract_answer("\\boxed{\\frac{1}{2") == "2"


def test_sanitize_answer_refuses_code_and_oversize():
    assert sanitize_answer("\\frac{1}{2}") == "\\frac{1}{2}"
    assert sanitize_answer(" x =\n 5 ") == "x = 5"
    assert sanitize_answer("(1, 2] \\cup [3, \\infty)") == "(1, 2] \\cup [3, \\infty)"
    for bad in [
        "__import__('os').system('ls')",
        "x__class__",
        "'1'",
        '"1"',
        "`1`",
        "exec(bytes((49,)).decode())",
        "lambda: 1",
        "1 # comment",
        "\udcff",
        "1" * 1001,
        "",
    ]:
        assert sanitize_answer(bad) is None, bad
    assert sanitize_answer("1" * 50, max_chars=10) is None


def test_no_model_text_with_letters_reaches_eval():
    """math-verify does call sympy's parse_expr (compile + eval). Spy on every string handed to it
    while verifying hostile answers that skip our sanitizer: only digit/operator strings arrive."""
    import math_verify.parser as mv_parser
    import sympy.parsing.sympy_parser as sympy_parser

    seen: list[str] = []
    original = sympy_parser.stringify_expr

    def spy(s, *args, **kwargs):
        seen.append(s)
        return original(s, *args, **kwargs)

    code = "__import__('os').system('touch pwned')"
    hostile = [
        code,
        f"${code}$",
        f"\\boxed{{{code}}}",
        f"exec(bytes({tuple(code.encode())}).decode())",
        "\\text{exec}(1) + \\mathrm{eval}(2)",
        "lambda: 1 + 2*(3-4)/5^2",
        "1.5E10 + 3,000.25 - 7 ÷ 2 × 3",
        "\\frac{1}{2} + 0.5",
        # What normalize_answer produces from full-width, Arabic-Indic, superscript and e-notation text.
        normalize_answer("１０００ + ٤٢ × 4² - 2.5e-4"),
        normalize_answer("ｅｘｅｃ(ｂｙｔｅｓ((49,)))"),
    ]
    # A first pass does sympy's lazy imports (sympy.physics.units sympifies its own constant names
    # at import time); then math-verify's caches are emptied so the second pass parses afresh.
    for text in hostile:
        verify_answer(text, "1")
    for cached in (mv_parser.parse_latex_cached, mv_parser.parse_expr_cached, mv_parser.extract_latex, _parse_gold):
        cached.cache_clear()
    sympy_parser.stringify_expr = spy
    try:
        for text in hostile:
            verify_answer(text, "1")
    finally:
        sympy_parser.stringify_expr = original
    assert seen, "the spy saw nothing: math-verify no longer reaches parse_expr this way; recheck the analysis"
    assert all(re.fullmatch(r"[\d.,eE\s+\-*/^()×÷]*", s) for s in seen), seen


# ---- correctness -----------------------------------------------------------------------------------


def test_math_reward_scores_equivalent_answers(pool):
    reward = MathReward(pool=pool)
    completions = [
        "<think>half</think><answer>\\frac{1}{2}</answer>",
        "<answer>0.5</answer>",
        "<answer>42</answer>",
        "<answer>43</answer>",
        "the result is \\boxed{42}",
        "so 40 + 2 = 42",
        "I do not know",
        "<answer>x = 5</answer>",
        "<answer>\\sqrt{2}</answer>",
    ]
    golds = ["0.5", "\\frac{1}{2}", "42.0", "42", "42", 42, "42", "5", "\\sqrt{2}"]
    assert reward(None, completions, answer=golds) == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    # ground_truth wins over answer; scores are configurable
    strict = MathReward(pool=pool, fallback=False, correct_score=2.0, incorrect_score=-0.5)
    assert strict(
        ["q", "q"], ["<answer>7</answer>", "\\boxed{7}"], ground_truth=["7", "7"], answer=["8", "8"]
    ) == [2.0, -0.5]
    assert strict.counters["no_answer"] == 1


def test_math_reward_rejects_bad_input_early():
    reward = MathReward()
    with pytest.raises(ValueError, match="needs column 'ground_truth' or 'answer'"):
        reward(None, ["<answer>1</answer>"], solution=["1"])
    with pytest.raises(ValueError, match="ground truth at index 0 is list"):
        reward(None, ["<answer>1</answer>"], answer=[[1]])
    with pytest.raises(ValueError, match="column 'answer' must be a list with one entry per completion"):
        reward(None, ["a", "b"], answer=["1"])
    with pytest.raises(TypeError, match=r"completions\[1\] is bytes"):
        reward(None, ["a", b"b"], answer=["1", "2"])
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        MathReward(timeout_s=0)
    with pytest.raises(ValueError, match="answer_tag must be a tag name"):
        MathReward(answer_tag="<answer>")
    assert reward._pool is None, "building or validating a reward must not start a worker"


def test_numbers_are_normalized_before_the_sanitizer():
    assert normalize_answer("1e3") == "1E3" and normalize_answer("2.5e-4") == "2.5E-4"
    # Euler's number and names keep their lower-case e.
    for kept in ["2e", "e^3", "x1e3", "1e3x", "\\frac{e}{2}"]:
        assert normalize_answer(kept) == kept
    assert normalize_answer("４２") == "42"  # full-width (NFKC)
    assert normalize_answer("٤٢") == "42" and normalize_answer("۴۲") == "42"  # Arabic-Indic, Eastern (not NFKC)
    assert normalize_answer("٣٫٥") == "3.5"
    # Scripts become exponents and indices before NFKC, which would make 4² into 42.
    assert normalize_answer("4²") == "4^{2}" and normalize_answer("10⁻³") == "10^{-3}"
    assert normalize_answer("x₂") == "x_{2}"
    # Normalizing never lets code past the sanitizer: full-width code is plain code after NFKC.
    for hostile in ["ｅｘｅｃ(1)", "＿＿import＿＿('os')", "＇1＇", "1½"]:
        assert sanitize_answer(normalize_answer(hostile)) is None, hostile
    # Too long: left as is, for the sanitizer to refuse, with no NFKC work spent on it.
    assert normalize_answer("４" * 1001) == "４" * 1001
    assert sanitize_answer(normalize_answer("４" * 1001)) is None


def test_math_reward_matches_exponents_unicode_digits_and_superscripts(pool):
    reward = MathReward(pool=pool)
    cases = [
        ("1e3", "1000", 1.0),
        ("1E3", "1000", 1.0),
        ("2.5e-4", "0.00025", 1.0),
        ("１０００", "1000", 1.0),
        ("٤٢", "42", 1.0),
        ("۴۲", "42", 1.0),
        ("4²", "16", 1.0),
        ("4²", "42", 0.0),
        ("10⁻³", "0.001", 1.0),
        ("42", "٤٢", 1.0),  # the ground truth is normalized the same way
    ]
    completions = [f"<answer>{a}</answer>" for a, _, _ in cases]
    assert reward(None, completions, answer=[g for _, g, _ in cases]) == [s for _, _, s in cases]


# ---- the worker pool ---------------------------------------------------------------------------------


def test_pool_times_out_one_item_and_keeps_scoring_the_rest_off_the_main_thread(pool):
    before = pool.counters
    start = time.monotonic()
    results, off_main = in_thread(pool.run, sleep_then_echo, [("a", 0), ("b", 60), ("c", 0)], timeout_s=1.5)
    elapsed = time.monotonic() - start
    assert off_main
    assert [r.status for r in results] == ["ok", "timeout", "ok"]
    assert results[0].value == "a" and results[2].value == "c"
    after = pool.counters
    assert after["timeouts"] == before["timeouts"] + 1
    assert after["calls"] == before["calls"] + 3
    assert elapsed < 1.5 + 30, elapsed  # one timeout plus a worker restart, loosely


def test_pool_counts_a_killed_worker_as_a_crash_and_restarts(pool):
    before = pool.counters
    results = pool.run(echo_or_die, [("a",), ("die",), ("c",)])
    assert [r.status for r in results] == ["ok", "crash", "ok"]
    assert results[2].value == "c"
    after = pool.counters
    assert after["crashes"] == before["crashes"] + 1
    assert after["restarts"] >= before["restarts"] + 1


def test_pool_reports_job_errors_without_losing_the_worker(pool):
    pid = pool.run(worker_identity, [()])[0].value[0]
    before = pool.counters
    results = pool.run(echo_or_raise, [("raise",), ("b",)])
    assert results == [("error", "ValueError"), ("ok", "b")]
    assert pool.counters["errors"] == before["errors"] + 1
    assert pool.run(worker_identity, [()])[0].value[0] == pid


def test_pool_caps_worker_memory(pool):
    assert pool.memory_limit_mb == 4096
    assert pool.run(allocate, [(8,), (0,)]) == [("error", "MemoryError"), ("ok", 0)]


def test_pool_refuses_functions_it_cannot_send(pool):
    with pytest.raises(TypeError, match="module-level function"):
        pool.run(lambda x: x, [(1,)])


def failing_initializer():
    raise ValueError("cannot warm up")


def test_pool_reports_jobs_and_initializers_the_worker_cannot_use(pool, tmp_path):
    from rewards import load_reward

    plugin = tmp_path / "only_in_parent.py"
    plugin.write_text("def f(completions):\n    return [1.0] * len(completions)\n")
    fn = load_reward(f"{plugin}:f").fn  # its module exists only in this process
    with pytest.raises(RuntimeError, match="could not load the job .*importable by module name"):
        pool.run(fn, [(["a"],)])
    assert pool.run(echo_or_raise, [("still fine",)])[0] == ("ok", "still fine")
    with pytest.raises(RuntimeError, match="initializer .*failing_initializer.* failed: ValueError: cannot warm up"):
        SubprocessPool(initializer=failing_initializer).run(echo_or_raise, [("x",)])


def test_pool_close_kills_its_worker():
    p = SubprocessPool(timeout_s=5.0)
    pid = p.run(worker_identity, [()])[0].value[0]
    spare_pid = p._spare.result(60).proc.pid
    p.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.kill(spare_pid, 0)
    assert p.run(echo_or_raise, [("again",)])[0] == ("ok", "again")  # usable after close
    p.close()


def slow_start():
    time.sleep(3.0)


def test_a_kill_hands_the_rest_of_the_batch_to_the_spare_without_a_restart_delay():
    with SubprocessPool(timeout_s=1.0, initializer=slow_start) as p:
        p.run(echo_or_raise, [("warm",)])
        p._spare.result(60)  # the first run started the spare in the background; wait until it is up
        start = time.monotonic()
        results = p.run(sleep_then_echo, [("a", 60), ("b", 0)])
        elapsed = time.monotonic() - start
        assert [r.status for r in results] == ["timeout", "ok"]
        assert p.counters["restarts"] == 1
        # 1 s timeout, then "b" runs at once in the spare; a restart would add the 3 s initializer.
        assert elapsed < 1.0 + 2.0, elapsed
        assert p._spare is not None  # the next spare is already starting


def test_pool_cuts_a_batch_off_at_its_time_budget(pool):
    pool.run(worker_identity, [()])
    before = pool.counters
    start = time.monotonic()
    results = pool.run(sleep_then_echo, [("a", 0), ("b", 60), ("c", 60), ("d", 0)], timeout_s=1.0, batch_timeout_s=1.5)
    elapsed = time.monotonic() - start
    # "b" times out at 1 s; "c" runs in the spare until the budget ends at 1.5 s and is cut off with "d".
    assert [r.status for r in results] == ["ok", "timeout", "over_budget", "over_budget"]
    assert pool.counters["over_budget"] == before["over_budget"] + 2
    assert elapsed < 1.5 + 1.5, elapsed
    assert pool.run(echo_or_raise, [("after",)])[0] == ("ok", "after")


def test_worker_does_not_outlive_a_killed_parent():
    # A SIGKILLed parent runs no finalizers; the worker must notice on its own.
    parent = (
        "import os; from rewards.sandbox import SubprocessPool; from tests.test_rewards import worker_identity; "
        "print(SubprocessPool().run(worker_identity, [()])[0].value[0], flush=True); os._exit(0)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True, cwd=root)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 15
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(pid), f"worker {pid} outlived its parent"


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan is reaped by whatever init the container has, or not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_math_reward_hanging_sympy_call_times_out_from_a_thread(pool):
    reward = MathReward(pool=pool, timeout_s=2.0, failure_score=-1.0)
    completions = ["<answer>1</answer>", f"<answer>{HANG}</answer>", "<answer>3</answer>"]
    start = time.monotonic()
    scores, off_main = in_thread(reward, None, completions, answer=["1", "1", "3"])
    elapsed = time.monotonic() - start
    assert off_main
    assert scores == [1.0, -1.0, 1.0]
    assert reward.counters["timeouts"] >= 1
    assert elapsed < 2.0 + 30, elapsed


def test_math_reward_bounds_a_batch_of_hanging_answers(pool):
    # 8 answers that each hang sympy: once 92 s (8 x (timeout + a worker restart)), now the budget.
    reward = MathReward(pool=pool, timeout_s=2.0, batch_timeout_s=4.0, failure_score=-1.0)
    pool.run(worker_identity, [()])  # a ready worker, as in a running job
    before = pool.counters
    start = time.monotonic()
    scores, _ = in_thread(reward, None, [f"<answer>{HANG}</answer>"] * 8, answer=["1"] * 8)
    elapsed = time.monotonic() - start
    assert scores == [-1.0] * 8
    timeouts = pool.counters["timeouts"] - before["timeouts"]
    cut = pool.counters["over_budget"] - before["over_budget"]
    assert timeouts + cut == 8 and cut >= 6, (timeouts, cut)
    assert reward.counters["over_budget"] >= cut
    assert elapsed < 4.0 + 2.0, elapsed


def test_rewards_package_does_not_import_sympy_in_the_caller():
    # The driver and reward actor stay light: only the worker process loads sympy. And no torch:
    # every worker process imports `rewards`, and torch would add seconds to each (re)start.
    out = subprocess.run(
        [sys.executable, "-c", "import rewards, sys; print('sympy' in sys.modules or 'torch' in sys.modules)"],
        capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.stdout.strip() == "False"


# ---- hostile completions through every reward ---------------------------------------------------------


def test_hostile_completions_through_every_reward(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # before the worker starts, so it runs there too
    code = "__import__('os').system('touch pwned')"
    payloads = [
        code,
        f"__import__('os').system('touch {tmp_path}/pwned_abs')",
        f"exec(bytes({tuple(code.encode())}).decode())",
        "10**10**10",
        "(" * 10_000 + "1" + ")" * 10_000,
        "-" * 10_000 + "1",
        "7" * 1_000_000,
        "<think>" * 200_000,
        b"\xff\xfe<answer>\xc3(</answer>".decode("utf-8", errors="surrogateescape"),
        "\udcff\ud800 1",
        HANG,
    ]
    completions = [c for p in payloads for c in (p, f"<think>t</think><answer>{p}</answer>")]
    n = len(completions)
    columns = {"answer": ["424242"] * n, "numbers": [[1, 2]] * n, "target": [3] * n}
    math_reward = MathReward(timeout_s=3.0, failure_score=-1.0)
    rewards = {"math": math_reward, "format": FormatReward(partial_credit=True), "countdown": CountdownReward()}
    try:
        worker_cwd = math_reward.pool.run(worker_identity, [()])[0].value[1]
        assert os.path.samefile(worker_cwd, tmp_path)
        scores = {}
        for name, reward in rewards.items():
            start = time.monotonic()
            scores[name] = reward(None, completions, **columns)
            elapsed = time.monotonic() - start
            assert len(scores[name]) == n, name
            assert all(isinstance(s, float) and math.isfinite(s) for s in scores[name]), name
            assert elapsed < (3.0 + 30 if name == "math" else 5.0), (name, elapsed)
        # Exactly the hanging answer hit the timeout; nothing hostile was scored correct.
        timed_out = [c for c, s in zip(completions, scores["math"]) if s == -1.0]
        assert timed_out == [f"<think>t</think><answer>{HANG}</answer>"]
        assert math_reward.counters["timeouts"] == 1
        assert max(scores["math"]) == 0.0
        assert max(scores["countdown"]) <= 0.1
        # The weighted sum passes them through too.
        total = WeightedReward([{"name": "format", "weight": 0.5}, {"name": "countdown"}])(None, completions, **columns)
        assert len(total["total"]) == n
    finally:
        math_reward.close()
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "pwned_abs").exists()
    assert not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(__file__)), "pwned"))
