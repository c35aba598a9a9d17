"""Benchmarks in d1's protocol (rl/data/benchmarks.py, rl/data/sudoku.py, rewards/sudoku.py): record
layouts, d1's prompts, the Sudoku generator and reward, and d1-style answers scored by the option
files' rewards. No Ray."""
import dataclasses
import hashlib
import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rewards import SudokuReward, build_reward, check_reward_config, extract_grid
from rewards.worker import RewardWorker
from rl.data import benchmarks, sudoku
from rl.data.benchmarks import FORMATS
from rl.data.tasks import make_rows, validate_rows

ROOT = Path(__file__).resolve().parents[1]

# d1's first test puzzle (dataset/4x4_test_sudoku.csv).
PUZZLE, SOLUTION = "3102200002100320", "3142243142131324"
GSM8K_RECORD = {
    "question": "A shop sells 617 pens on Monday and twice as many on Tuesday. How many pens in all?",
    "answer": "Tuesday: 617*2=<<617*2=1234>>1234 pens.\nBut the question asks... \n#### 1,234",
}


def reasoned(answer: str) -> str:
    """A completion in the layout d1's prompts ask for."""
    return f"<reasoning>\nStep by step.\n</reasoning>\n<answer>\n{answer}\n</answer>"


def reward_worker(option: str) -> RewardWorker:
    cfg = OmegaConf.load(ROOT / "conf" / "reward" / f"{option}.yaml")
    functions = OmegaConf.to_container(cfg.functions, resolve=True)
    accuracy = [cfg.accuracy] if isinstance(cfg.accuracy, str) else list(cfg.accuracy)
    return RewardWorker(functions, accuracy)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- d1's prompts, verbatim -----------------------------------------------------------------------


def test_prompts_are_d1s_verbatim():
    # Digests of d1's own strings (eval/gsm8k.py, eval/math500.py, diffu-grpo/data_utils.py, eval/sudoku.py),
    # so that an edit here that d1 did not make fails.
    assert sha(benchmarks.GSM8K_PROMPT) == "f11d75a706090b95"
    assert sha(benchmarks.MATH500_PROMPT) == "3e82f3bac66b3bc1"
    assert sha(benchmarks.XML_SYSTEM_PROMPT) == "39e8b2254589acc4"
    assert sha(sudoku.SUDOKU_SYSTEM_PROMPT) == "758dc4e1b10cba4d"
    # d1's get_countdown_questions on {"nums": [44, 19, 35], "target": 98}.
    assert sha(FORMATS["countdown"]({"nums": [44, 19, 35], "target": 98})["prompt"]) == "247b52abb5f3588a"


# ---- FORMATS ----------------------------------------------------------------------------------------


def test_gsm8k_record_answer_is_the_number_after_hashes_without_commas():
    row = FORMATS["gsm8k"](GSM8K_RECORD)
    assert row["answer"] == "1234" and row["task"] == "gsm8k"
    assert row["prompt"] == f"{benchmarks.GSM8K_PROMPT}\n\n{GSM8K_RECORD['question']}"
    assert FORMATS["gsm8k"]({"question": "q", "answer": "x\n#### -5"})["answer"] == "-5"
    validate_rows([row], "gsm8k")


@pytest.mark.parametrize("record, column", [
    ({"answer": "#### 3"}, "question"),
    ({"question": "  ", "answer": "#### 3"}, "question"),
    ({"question": "q"}, "answer"),
    ({"question": "q", "answer": "no final line"}, "answer"),
    ({"question": "q", "answer": "#### three"}, "answer"),
])
def test_gsm8k_bad_record_names_the_column(record, column):
    with pytest.raises(ValueError, match=f"column '{column}'"):
        FORMATS["gsm8k"](record)


def test_math500_record_and_d1s_training_layout():
    row = FORMATS["math500"]({"problem": "Compute $\\frac{28}{6}$.", "answer": "\\frac{14}{3}", "unique_id": "x"})
    assert row == {"prompt": f"{benchmarks.MATH500_PROMPT}\n\nCompute $\\frac{{28}}{{6}}$.",
                   "answer": "\\frac{14}{3}", "task": "math500"}
    # d1 trains on MATH records without `answer`: the last \boxed{} of `solution` is the answer.
    solution = "So $x=\\boxed{2}$, hence $y = \\boxed{\\frac{1}{2}}$."
    assert FORMATS["math500"]({"problem": "p", "solution": solution})["answer"] == "\\frac{1}{2}"
    with pytest.raises(ValueError, match="column 'problem'"):
        FORMATS["math500"]({"answer": "3"})
    with pytest.raises(ValueError, match="column 'answer'"):
        FORMATS["math500"]({"problem": "p"})
    with pytest.raises(ValueError, match="column 'solution'"):
        FORMATS["math500"]({"problem": "p", "solution": "no box"})


def test_countdown_reads_both_of_d1s_layouts():
    # dataset/countdown_cd3_test.jsonl, and Jiayi-Pan/Countdown-Tasks-3to4 (d1's training set).
    test = FORMATS["countdown"]({"input": "30,100,93", "output": "23"})
    train = FORMATS["countdown"]({"nums": [30, 100, 93], "target": 23})
    assert test == train
    assert test["numbers"] == [30, 100, 93] and test["target"] == 23 and test["answer"] == "23"
    assert "Using only the numbers [30, 100, 93], create an arithmetic expression that evaluates to exactly 23." \
        in test["prompt"]
    assert FORMATS["countdown"]({"numbers": [1, 2], "target": "3"})["target"] == 3


@pytest.mark.parametrize("record, column", [
    ({"input": "30,x,93", "output": "23"}, "input"),
    ({"input": "30,100,93"}, "output"),
    ({"input": "30,100,93", "output": "2.5"}, "output"),
    ({"nums": "30,100", "target": 3}, "nums"),
    ({"nums": [30, "a"], "target": 3}, "nums"),
    ({"nums": [30, 100]}, "target"),
    ({"target": 3}, "nums' or 'numbers"),
])
def test_countdown_bad_record_names_the_column(record, column):
    with pytest.raises(ValueError, match=f"column '{column}'"):
        FORMATS["countdown"](record)


def test_sudoku_record_from_d1s_csv():
    row = FORMATS["sudoku"]({"Puzzle": PUZZLE, "Solution": SOLUTION})
    assert row["prompt"] == f"{sudoku.SUDOKU_SYSTEM_PROMPT}\n\nSolve the following Sudoku puzzle: {PUZZLE}\n"
    assert (row["answer"], row["puzzle"], row["task"]) == (SOLUTION, PUZZLE, "sudoku")
    assert FORMATS["sudoku"]({"puzzle": PUZZLE, "solution": SOLUTION}) == row
    # A CSV read without string types makes the puzzle an int and drops its leading zero.
    padded = FORMATS["sudoku"]({"Puzzle": int("0140432014020000"), "Solution": 2143432114323214})
    assert padded["puzzle"] == "0140432014020000"


@pytest.mark.parametrize("record, column", [
    ({"Solution": SOLUTION}, "Puzzle' or 'puzzle"),
    ({"Puzzle": PUZZLE}, "Solution' or 'solution"),
    ({"Puzzle": PUZZLE[:15], "Solution": SOLUTION}, "Puzzle"),
    ({"Puzzle": PUZZLE.replace("0", "."), "Solution": SOLUTION}, "Puzzle"),
    ({"Puzzle": SOLUTION, "Solution": SOLUTION}, "Puzzle"),  # nothing to fill
    ({"Puzzle": PUZZLE, "Solution": "1" * 16}, "Solution"),
    ({"Puzzle": "4" + PUZZLE[1:], "Solution": SOLUTION}, "Solution"),  # disagrees with a given
    ({"Puzzle": PUZZLE, "Solution": 3.5}, "Solution"),
])
def test_sudoku_bad_record_names_the_column(record, column):
    with pytest.raises(ValueError, match=f"column '{column}'"):
        FORMATS["sudoku"](record)


# ---- the Sudoku generator ----------------------------------------------------------------------------


def test_generated_sudoku_is_valid_uniquely_solvable_and_like_a_file_row():
    rows = make_rows("sudoku", 200, seed=3)
    validate_rows(rows, "sudoku")
    assert len({r["puzzle"] for r in rows}) > 150
    for row in rows:
        puzzle, solution = row["puzzle"], row["answer"]
        assert sudoku.check_pair(puzzle, solution) is None
        assert puzzle.count("0") == 8  # as every puzzle of d1's test set
        assert sudoku.count_solutions(puzzle, limit=5) == 1
        assert row == FORMATS["sudoku"]({"Puzzle": puzzle, "Solution": solution})
    assert len(sudoku.all_solutions()) == len(set(sudoku.all_solutions())) == 288


def test_generator_is_seeded_and_splits_differ():
    assert make_rows("sudoku", 20, seed=1) == make_rows("sudoku", 20, seed=1)
    assert make_rows("sudoku", 20, seed=1) != make_rows("sudoku", 20, seed=2)
    assert make_rows("sudoku", 20, seed=1) != make_rows("sudoku", 20, seed=1, split="val")
    assert sudoku.generate(random.Random(5)) == sudoku.generate(random.Random(5))


def test_count_solutions():
    assert sudoku.count_solutions(SOLUTION) == 1
    assert sudoku.count_solutions("0" * 16, limit=300) == 288
    assert sudoku.count_solutions("11" + "0" * 14) == 0  # clashing givens
    # One of d1's test puzzles with two solutions: the file's, and this one.
    assert sudoku.count_solutions("3040413004000304", limit=5) == 2


def test_reference_completion_scores_full_marks():
    row = sudoku.generate(random.Random(0))
    assert SudokuReward()(None, [row["solution"]], puzzle=[row["puzzle"]], answer=[row["answer"]]) == [1.0]


# ---- the sudoku reward ---------------------------------------------------------------------------------


def score(text: str, exact: bool = False) -> float:
    return SudokuReward(exact=exact)(None, [text], puzzle=[PUZZLE], answer=[SOLUTION])[0]


def test_sudoku_reward_is_d1s_fraction_of_empty_cells():
    assert score(reasoned(SOLUTION)) == 1.0
    # Empty cells of PUZZLE: 2, 4, 5, 6, 7, 10, 11, 15 (8 of them). One wrong -> 7/8.
    wrong_one = SOLUTION[:2] + "3" + SOLUTION[3:]
    assert score(reasoned(wrong_one)) == 7 / 8
    # Given cells do not count: changing one leaves the score at 1.
    assert score(reasoned("4" + SOLUTION[1:])) == 1.0
    # d1 keeps only the digits of the answer, so separators do not matter...
    assert score(reasoned("3142\n2431\n4213\n1324")) == 1.0
    assert score("<answer>3 1 4 2 | 2 4 3 1 | 4 2 1 3 | 1 3 2 4</answer>") == 1.0
    # ...and pads a short answer with '0' (those cells are wrong) and cuts a long one at 16 digits.
    assert score(reasoned(SOLUTION[:8])) == 4 / 8
    assert score(reasoned(SOLUTION + "4444")) == 1.0
    # The last complete answer tag counts.
    assert score(f"<answer>{wrong_one}</answer> then <answer>{SOLUTION}</answer>") == 1.0
    assert score(reasoned(wrong_one), exact=True) == 0.0 and score(reasoned(SOLUTION), exact=True) == 1.0


@pytest.mark.parametrize("text", [
    "",
    SOLUTION,  # no answer tag
    f"<answer>{SOLUTION}",  # unclosed
    "<reasoning>x</reasoning><answer>\nno digits here\n</answer>",
    "<answer></answer>",
    "<answer>" + "٣١٤٢" * 4 + "</answer>",  # Arabic-Indic digits: kept, as str.isdigit does, but never equal
])
def test_sudoku_reward_malformed_answers_score_zero(text):
    assert score(text) == 0.0


def test_sudoku_reward_never_runs_the_answer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative marker: digits in the tmp path would be read as cells
    marker = tmp_path / "ran"
    injection = "__import__('os').system('touch ran'); exec('open(\"ran\", \"w\")')"
    assert score(f"<answer>{injection}</answer>") == 0.0
    assert not marker.exists()
    # Only its digits count, as in d1: digits around code are read as cells, never evaluated.
    assert score(f"<answer>{SOLUTION} {injection}</answer>") == 1.0
    assert not marker.exists()
    assert score("<answer>" + "9" * 10**6 + "</answer>") == 0.0  # a huge answer: only 16 digits read
    assert extract_grid("<answer>" + "1" * 10**6 + "</answer>") == "1" * 16


def test_sudoku_reward_columns():
    with pytest.raises(ValueError, match="'puzzle'"):
        SudokuReward()(None, ["x"], answer=[SOLUTION])
    with pytest.raises(ValueError, match="'ground_truth' or 'answer'"):
        SudokuReward()(None, ["x"], puzzle=[PUZZLE])
    with pytest.raises(ValueError, match=r"ground truth \[0\]"):
        SudokuReward()(None, ["x"], puzzle=[PUZZLE], answer=["12"])
    with pytest.raises(ValueError, match="exact"):
        SudokuReward(exact="yes")
    reward = build_reward("sudoku", {"exact": True})
    assert reward.score(None, [reasoned(SOLUTION)], puzzle=[PUZZLE], ground_truth=[SOLUTION]).scores == [1.0]


# ---- the option files' rewards on d1-style answers ------------------------------------------------------


@pytest.mark.parametrize("option", ["math", "sudoku", "countdown", "text_reasoning"])
def test_reward_option_files_pass_the_config_check(option):
    cfg = OmegaConf.load(ROOT / "conf" / "reward" / f"{option}.yaml")
    check_reward_config(OmegaConf.to_container(cfg.functions, resolve=True), cfg.accuracy)


def test_sudoku_option_file_trains_on_cells_and_counts_solved_puzzles():
    worker = reward_worker("sudoku")
    row = FORMATS["sudoku"]({"Puzzle": PUZZLE, "Solution": SOLUTION})
    wrong_one = SOLUTION[:2] + "3" + SOLUTION[3:]
    s = worker.score([row["prompt"]] * 3, [reasoned(SOLUTION), reasoned(wrong_one), "no answer"], [row] * 3)
    assert s.total == [1.0, 7 / 8, 0.0]
    assert s.accuracy == [1.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def math_worker():
    worker = reward_worker("math")
    yield worker
    worker.close()


def test_math_option_file_scores_d1_style_answers_on_gsm8k_and_math500(math_worker):
    gsm = FORMATS["gsm8k"]({"question": "q", "answer": "...\n#### 72"})
    math = FORMATS["math500"]({"problem": "p", "answer": "\\frac{14}{3}"})
    rows = [gsm, gsm, gsm, math, math]
    completions = [
        "<reasoning>\n48 + 24 = 72\n</reasoning>\n<answer>\n\\boxed{72}\n</answer>",
        reasoned("\\boxed{71}"),
        reasoned("72"),  # d1's training prompt asks for the bare number: also read
        reasoned("\\boxed{\\dfrac{14}{3}}"),
        reasoned("\\boxed{\\frac{3}{14}}"),
    ]
    s = math_worker.score([r["prompt"] for r in rows], completions, rows)
    assert s.components["math"] == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert s.components["format"] == [1.0] * 5  # d1's <reasoning> tags
    assert s.total == [2.5, 0.5, 2.5, 2.5, 0.5]
    assert s.accuracy == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_text_reasoning_scores_correctness_but_not_d1s_format():
    # Its format term wants <think> tags; d1's prompts ask for <reasoning>. Correctness still counts.
    worker = reward_worker("text_reasoning")
    try:
        row = FORMATS["gsm8k"](GSM8K_RECORD)
        s = worker.score([row["prompt"]], [reasoned("\\boxed{1234}")], [row])
        assert s.components == {"math": [1.0], "format": [0.0]} and s.accuracy == [1.0]
    finally:
        worker.close()


def test_countdown_option_file_scores_d1_style_answers():
    worker = reward_worker("countdown")
    rows = [FORMATS["countdown"]({"input": "30,100,93", "output": "23"}),
            FORMATS["countdown"]({"nums": [44, 19, 35], "target": 98})]
    completions = [reasoned("30-(100-93)"), reasoned("44+19+35")]
    s = worker.score([r["prompt"] for r in rows], completions, rows)
    assert s.components["countdown"] == [1.0, 1.0] and s.accuracy == [1.0, 1.0]
    wrong = worker.score([rows[0]["prompt"]] * 2, [reasoned("30+100-93"), "30-(100-93)"], [rows[0]] * 2)
    assert wrong.components["countdown"] == [0.1, 0.0]  # d1: 0.1 for a wrong equation in the tags, 0 without


# ---- the task option files ---------------------------------------------------------------------------


def _has_format_key() -> bool:
    from rl.config import TaskConfig
    return "format" in {f.name for f in dataclasses.fields(TaskConfig)}


@pytest.mark.skipif(not _has_format_key(), reason="task.format comes with the file loader (branch data)")
@pytest.mark.parametrize("task, reward, fmt", [
    ("sudoku", "sudoku", "sudoku"), ("countdown", "countdown", "countdown"),
    ("gsm8k", "math", "gsm8k"), ("math500", "math", "math500"),
])
def test_task_option_files_compose(task, reward, fmt):
    from tests.conftest import compose_cfg

    cfg = compose_cfg(f"task={task}", f"reward={reward}", base=[])
    assert cfg.task.format == fmt
    if task == "sudoku":
        assert dict(cfg.task.train) == {"sudoku": 5000} and dict(cfg.task.val) == {"sudoku": 128}
