"""Dataset files as task.train_file/val_file (rl/data/files.py): the file kinds, TRL's and verl's column
layouts, configurable columns, overlong-prompt filtering, the task.format hook and one-line errors."""
import json
import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewards.worker import RewardWorker, columns_of
from rl.config import ConfigError, TaskConfig, validate
from rl.data import benchmarks, loader
from rl.data.encode import encode_prompts
from rl.data.files import load_file
from rl.data.loader import load_split
from rl.models import TINY_CHECKPOINT, load_tokenizer
from tests.conftest import compose_cfg

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
ROWS = [{"prompt": "1+1?", "answer": "2", "numbers": [1, 1], "meta": {"level": 1}},
        {"prompt": "3+4?", "answer": "7", "numbers": [3, 4], "meta": {"level": 2}}]
VERL = [{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": f"{a}+{a}?"}], "ability": "math",
         "reward_model": {"ground_truth": str(2 * a), "style": "rule"}, "extra_info": {"split": "train", "index": i}}
        for i, a in enumerate((1, 2, 3))]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def task(**settings):
    return {"train": {}, "val": {}, "train_file": None, "val_file": None, **settings}


def error(path, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        load_file(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_every_file_kind_loads_the_same_rows(tmp_path):
    from datasets import Dataset, DatasetDict

    files = [write_jsonl(tmp_path / "d.jsonl", ROWS),
             tmp_path / "d.json",
             write_parquet(tmp_path / "d.parquet", ROWS),
             tmp_path / "d"]
    files[1].write_text(json.dumps(ROWS, indent=1))
    Dataset.from_list(ROWS).save_to_disk(str(files[3]))
    expected = [{**r, "task": "d"} for r in ROWS]
    for f in files:
        assert load_file(f) == expected, f
    (tmp_path / "lines.json").write_text(files[0].read_text())  # JSON lines in a .json file
    assert load_file(tmp_path / "lines.json") == [{**r, "task": "lines"} for r in ROWS]
    # A DatasetDict folder: train_file takes its train split, val_file its validation (or test) split.
    DatasetDict(train=Dataset.from_list(ROWS[:1]), test=Dataset.from_list(ROWS[1:])).save_to_disk(str(tmp_path / "dd"))
    assert [r["answer"] for r in load_file(tmp_path / "dd", "train")] == ["2"]
    assert [r["answer"] for r in load_file(tmp_path / "dd", "val")] == ["7"]
    assert load_file(tmp_path / "dd", "val")[0]["task"] == "dd"
    DatasetDict(train=Dataset.from_list(ROWS)).save_to_disk(str(tmp_path / "only_train"))
    assert re.search(r"only_train: a DatasetDict with splits \['train'\]; task.val_file takes its 'validation' or "
                     r"'test' split", error(tmp_path / "only_train", split="val"))


def test_verl_parquet_loads_and_extra_info_reaches_the_reward_as_plain_python(tmp_path):
    f = write_parquet(tmp_path / "gsm8k_train.parquet", VERL)
    rows = load_file(f)
    assert [r["answer"] for r in rows] == ["2", "4", "6"] and {r["task"] for r in rows} == {"openai/gsm8k"}
    assert rows[0]["prompt"] == VERL[0]["prompt"] and rows[0]["extra_info"] == {"split": "train", "index": 0}
    columns = columns_of(rows)
    assert type(columns["extra_info"][1]) is dict and type(columns["extra_info"][1]["index"]) is int
    plugin = tmp_path / "verl_reward.py"
    plugin.write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info):\n"
        "    return {'score': float(solution_str == ground_truth), 'info': type(extra_info).__name__,\n"
        "            'index': type(extra_info['index']).__name__, 'source': data_source}\n")
    out = RewardWorker([{"name": f"{plugin}:compute_score", "key": "exact"}], ["exact"]).score(
        [r["prompt"] for r in rows], ["2", "5", "6"], rows)
    assert out.accuracy == [1.0, 0.0, 1.0]
    assert out.extras["exact/info"] == ["dict"] * 3 and out.extras["exact/index"] == ["int"] * 3
    assert out.extras["exact/source"] == ["openai/gsm8k"] * 3
    # A `task` column wins over data_source; an `answer` column over reward_model.ground_truth.
    own = [{**VERL[0], "task": "mine", "answer": "two"}]
    row = load_file(write_parquet(tmp_path / "own.parquet", own))[0]
    assert row["task"] == "mine" and row["answer"] == "two"


def test_a_structured_verl_ground_truth_reaches_a_verl_reward_unchanged(tmp_path):
    # verl's Countdown parquet (TinyZero): the ground truth is {"target", "numbers"}, not a string.
    records = [{**VERL[0], "reward_model": {"ground_truth": {"target": 98, "numbers": [44, 19, 35]}, "style": "rule"}}]
    rows = load_file(write_parquet(tmp_path / "countdown.parquet", records))
    assert rows[0]["ground_truth"] == {"numbers": [44, 19, 35], "target": 98}
    assert json.loads(rows[0]["answer"]) == rows[0]["ground_truth"]
    plugin = tmp_path / "countdown_reward.py"
    plugin.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info):\n"
                      "    return float(eval_free(solution_str) == ground_truth['target'])\n"
                      "def eval_free(text):\n"
                      "    return sum(int(x) for x in text.split('+'))\n")
    out = RewardWorker([{"name": f"{plugin}:compute_score", "key": "cd"}], ["cd"]).score(
        [r["prompt"] for r in rows], ["44+19+35"], rows)
    assert out.accuracy == [1.0]


def test_verl_images_column(tmp_path):
    none = [{**VERL[0], "images": None}, {**VERL[1], "images": None}]
    assert "images" not in load_file(write_jsonl(tmp_path / "none.jsonl", none))[0]
    some = [{**VERL[0], "images": []}, {**VERL[1], "images": [{"bytes": None, "path": "cat.png"}]}]
    rows = load_file(write_jsonl(tmp_path / "some.jsonl", some))
    assert "images" not in rows[0] and rows[1]["images"] == [{"bytes": None, "path": "cat.png"}]
    # kept for a model that reads images (tests/test_llada_v_rl.py); a text or unified-token model refuses them
    with pytest.raises(ValueError, match=r"some\.jsonl: row 1 has prompt images \('images', verl's multimodal"):
        loader.load_split({"train_file": str(tmp_path / "some.jsonl")}, "train", 0, model_dir=str(TINY_CHECKPOINT))
    assert re.match(r".*bad\.jsonl:1: row 0 column 'images': expected a list of images, got str",
                    error(write_jsonl(tmp_path / "bad.jsonl", [{**VERL[0], "images": "cat.png"}])))


def test_trl_extra_columns_reach_the_rewards_as_plain_lists(tmp_path):
    records = [{"prompt": CHAT, "answer": 4, "solution_steps": ["2+2=4", "done"]},
               {"prompt": "1+2?", "answer": "3", "solution_steps": ["1+2=3"]}]
    rows = load_file(write_jsonl(tmp_path / "trl.jsonl", records))
    assert rows[0]["prompt"] == CHAT and rows[0]["answer"] == "4"
    steps = columns_of(rows)["solution_steps"]
    assert steps == [["2+2=4", "done"], ["1+2=3"]] and all(type(s) is list for s in steps)
    same_types = [{**r, "prompt": "q", "answer": "1"} for r in records]  # a parquet column has one type
    parquet_rows = load_file(write_parquet(tmp_path / "trl.parquet", same_types))
    assert all(type(s) is list and type(s[0]) is str for s in columns_of(parquet_rows)["solution_steps"])


def test_a_trl_solution_column_reaches_a_trl_reward(tmp_path):
    # TRL's accuracy_reward(completions, solution, **kwargs): the ground truth is the `solution` column.
    from rewards.registry import Reward

    def accuracy_reward(completions, solution, **kwargs):
        return [float(c.strip() == s) for c, s in zip(completions, solution)]

    records = [{"prompt": "1+1?", "answer": "2", "solution": "2"}, {"prompt": "2+2?", "answer": "4", "solution": "4"}]
    rows = load_file(write_jsonl(tmp_path / "trl.jsonl", records))
    reward = Reward("accuracy_reward", accuracy_reward, "trl")
    assert reward([r["prompt"] for r in rows], ["2", "5"], **columns_of(rows)) == [1.0, 0.0]


def test_renamed_and_dotted_columns(tmp_path):
    records = [{"question": "1+1?", "target": 2, "gt": {"value": "2", "kind": "int"}}]
    f = write_parquet(tmp_path / "renamed.parquet", records)
    row = load_file(f, prompt_key="question", answer_key="target")[0]
    assert row["prompt"] == "1+1?" and row["answer"] == "2" and "question" not in row and row["target"] == 2
    assert load_file(f, prompt_key="question", answer_key="gt.value")[0]["answer"] == "2"
    assert load_file(write_parquet(tmp_path / "v.parquet", VERL), answer_key="reward_model.ground_truth")[2][
        "answer"] == "6"
    assert re.match(r".*renamed\.parquet: no column 'prompt' \(task\.prompt_key='prompt'\); its columns are "
                    r"\['gt', 'question', 'target'\]$", error(f))
    assert re.match(r".*renamed\.parquet: row 0 has no 'gt\.nope'",
                    error(f, prompt_key="question", answer_key="gt.nope"))
    # Through load_split, as the driver reads a config.
    rows = load_split(task(val_file=str(f), prompt_key="question", answer_key="target"), "val", 0)
    assert rows == [{"prompt": "1+1?", "answer": "2", "target": 2, "gt": {"value": "2", "kind": "int"},
                     "task": "renamed"}]


def prompt_lengths(prompts):
    return encode_prompts(load_tokenizer(TINY_CHECKPOINT), prompts)[1].sum(1).tolist()


def test_overlong_prompts_are_dropped_and_counted_or_refused(tmp_path, caplog):
    long = "a fairly long question " * 20
    records = [{"prompt": "1+1?", "answer": "2"}, {"prompt": long, "answer": "x"}, {"prompt": "2+2?", "answer": "4"}]
    f = write_jsonl(tmp_path / "mixed.jsonl", records)
    short_len, long_len, _ = prompt_lengths([r["prompt"] for r in records])
    limit = (short_len + long_len) // 2
    cfg = task(train_file=str(f), max_prompt_length=limit)
    with caplog.at_level(logging.WARNING, logger="dllm_rl"):
        rows = load_split(cfg, "train", 0, model_dir=str(TINY_CHECKPOINT))
    assert [r["answer"] for r in rows] == ["2", "4"]
    assert re.search(rf"mixed\.jsonl: dropped 1 of 3 rows .*task\.max_prompt_length={limit} tokens \(the longest is "
                     rf"{long_len}\)", caplog.text)
    with pytest.raises(ValueError, match=rf"mixed\.jsonl: row 1 prompt is {long_len} tokens, longer than "
                                         rf"task\.max_prompt_length={limit}"):
        load_split({**cfg, "filter_overlong_prompts": False}, "train", 0, model_dir=str(TINY_CHECKPOINT))
    with pytest.raises(ValueError, match=r"every prompt is longer than task\.max_prompt_length=1 tokens"):
        load_split({**cfg, "max_prompt_length": 1}, "train", 0, model_dir=str(TINY_CHECKPOINT))
    # Message lists are measured chat-templated, system turn included.
    assert prompt_lengths([CHAT])[0] > prompt_lengths([CHAT[1]["content"]])[0]


@pytest.mark.parametrize("records, message", [
    ([{"prompt": "a", "answer": "1"}, {"question": "b", "answer": "2"}],
     r"bad\.jsonl:2: row 1 has no 'prompt' \(expected a non-empty string or a chat message list\)"),
    ([{"prompt": "a", "answer": True}],
     r"bad\.jsonl:1: row 0 column 'answer' is bool True, expected a string, a number or a non-empty structure"),
    ([{"prompt": "a", "answer": {}}], r"bad\.jsonl:1: row 0 column 'answer' is dict \{\}, expected a string"),
    ([{"prompt": "a", "answer": "1"}, {"prompt": [{"role": "robot", "content": "?"}], "answer": "1"}],
     r"bad\.jsonl:2: row 1 'prompt' message 0 is \{'role': 'robot'"),
])
def test_bad_rows_are_one_line_naming_file_row_and_column(tmp_path, records, message):
    assert re.search(message, error(write_jsonl(tmp_path / "bad.jsonl", records)))


def test_bad_files_are_one_line_naming_the_file(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", oops}\n')
    assert re.search(r"broken\.jsonl:3: not valid JSON", error(f))
    listed = tmp_path / "broken.json"
    listed.write_text('[{"prompt": "a", "answer": "1"},\n {"prompt": }]')
    assert re.search(r"broken\.json:2: not valid JSON", error(listed))
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"version": 1, "data": ROWS}, indent=1))
    assert re.search(r"nested\.json: a JSON dict with keys \['data', 'version'\]; expected a list", error(nested))
    no_answer = write_parquet(tmp_path / "no_answer.parquet", [{"prompt": "a", "ans": "1"}])
    assert re.search(r"no_answer\.parquet: no column 'answer' \(task\.answer_key='answer'\); its columns are "
                     r"\['ans', 'prompt'\]", error(no_answer))
    null_prompt = write_parquet(tmp_path / "null.parquet", [{"prompt": "a", "answer": "1"},
                                                            {"prompt": None, "answer": "2"}])
    assert re.search(r"null\.parquet: row 1 has no 'prompt'", error(null_prompt))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    assert re.search(r"garbage\.parquet: cannot read it as parquet", error(garbage))
    assert re.search(r"data\.txt: unknown kind of task file '\.txt'; expected \.jsonl, \.json .*\.parquet",
                     error(write_jsonl(tmp_path / "data.txt", ROWS)))
    (tmp_path / "plain_dir").mkdir()
    assert re.search(r"plain_dir: a folder without the state\.json .*; expected \.jsonl", error(tmp_path / "plain_dir"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_file(tmp_path / "missing.parquet")


def test_the_format_hook(tmp_path, monkeypatch):
    def qa(record):
        if not isinstance(record.get("question"), str):
            raise ValueError("column 'question' is missing or not a string")
        return {"prompt": f"Q: {record['question']}", "answer": record["final"], "task": "qa"}

    monkeypatch.setitem(benchmarks.FORMATS, "qa", qa)
    f = write_jsonl(tmp_path / "qa.jsonl", [{"question": "1+1?", "final": 2}, {"question": "2+2?", "final": "4"}])
    assert load_file(f, format="qa") == [{"prompt": "Q: 1+1?", "answer": "2", "task": "qa"},
                                         {"prompt": "Q: 2+2?", "answer": "4", "task": "qa"}]
    bad = write_jsonl(tmp_path / "qa_bad.jsonl", [{"question": "1+1?", "final": 2}, {}, {"question": 3}])
    assert re.search(r"qa_bad\.jsonl:2: row 1: task\.format 'qa': column 'question' is missing",
                     error(bad, format="qa"))
    assert TaskConfig(format="qa").format == "qa"
    with pytest.raises(ConfigError, match=r"task\.format='nope': expected null or one of \[.*'qa'"):
        TaskConfig(format="nope")
    with pytest.raises(ConfigError, match="task.format='qa': reads the columns itself"):
        TaskConfig(format="qa", prompt_key="question")


def test_config_check_names_a_bad_file_and_the_driver_reuses_the_rows(tmp_path, monkeypatch):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    with pytest.raises(ConfigError, match=r"^task\.train_file: .*bad\.jsonl:2: row 1 has no 'answer'"):
        validate(compose_cfg(f"task.train_file={bad}"))
    with pytest.raises(ConfigError, match=r"task\.val_file='.*nope\.parquet': expected an existing file or folder"):
        validate(compose_cfg(f"task.val_file={tmp_path / 'nope.parquet'}"))
    with pytest.raises(ConfigError, match=r"task\.max_prompt_length=0: expected an integer >= 1"):
        validate(compose_cfg("task.max_prompt_length=0"))
    good = write_parquet(tmp_path / "good.parquet", VERL)
    cfg = compose_cfg(f"task.train_file={good}", "task.max_prompt_length=512")
    validate(cfg)

    def read_again(*args, **kwargs):
        raise AssertionError("the task file was read a second time")

    monkeypatch.setattr(loader, "load_file", read_again)
    rows = load_split(cfg.task, "train", cfg.seed, model_dir=str(TINY_CHECKPOINT))
    assert [r["answer"] for r in rows] == ["2", "4", "6"]
    rows[0]["image_codes"] = [1]  # the driver's additions stay its own
    assert "image_codes" not in load_split(cfg.task, "train", cfg.seed, model_dir=str(TINY_CHECKPOINT))[0]


def test_d1_sudoku_csv_keeps_leading_zeros_and_names_a_short_row(tmp_path):
    puzzle, solution = "0012020003202030", "3412124343212134"  # a grid is text: its leading zeros matter
    f = tmp_path / "4x4_test_sudoku.csv"
    f.write_text(f"Puzzle,Solution\n{puzzle},{solution}\n")
    (row,) = load_file(f, format="sudoku")
    assert row["puzzle"] == puzzle and row["answer"] == solution and row["task"] == "sudoku"
    f.write_text(f"Puzzle,Solution\n{puzzle},{solution}\n{puzzle}\n")
    assert re.match(r".*4x4_test_sudoku\.csv:3: 1 columns where the header has 2$", error(f, format="sudoku"))
