import json

import pytest

from rl.data.files import load_file
from rl.data.tasks import make_mixture, make_rows, validate_rows


def test_rows_are_deterministic_and_splits_differ():
    a = make_rows("arithmetic", 50, seed=1)
    assert a == make_rows("arithmetic", 50, seed=1)
    assert a != make_rows("arithmetic", 50, seed=2)
    val = {r["prompt"] for r in make_rows("arithmetic", 200, seed=1, split="val")}
    assert len(val & {r["prompt"] for r in make_rows("arithmetic", 200, seed=1)}) < 10
    assert all(r["task"] == "arithmetic" and r["answer"].isdigit() for r in a)


def test_countdown_rows_carry_numbers_and_target():
    rows = make_rows("countdown", 100, seed=0)
    for r in rows:
        assert len(r["numbers"]) == 3 and 1 <= r["target"] <= 60 and r["answer"] == str(r["target"])
        assert f"make {r['target']}" in r["prompt"]


def test_mixture_contains_each_task():
    rows = make_mixture({"arithmetic": 5, "countdown": 7}, seed=0)
    assert sorted(r["task"] for r in rows) == ["arithmetic"] * 5 + ["countdown"] * 7


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        make_rows("chess", 1)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        make_rows("arithmetic", 1, split="dev")


def test_row_without_answer_is_named():
    with pytest.raises(ValueError, match=r"mydata: row 1 has no 'answer'"):
        validate_rows([{"prompt": "a", "answer": "1"}, {"prompt": "b"}], "mydata")
    with pytest.raises(ValueError, match=r"row 0 has no 'prompt'"):
        validate_rows([{"prompt": "  ", "answer": "1"}], "x")


def test_jsonl_loading_names_file_and_line(tmp_path):
    good = tmp_path / "gsm.jsonl"
    rows = [json.dumps({"prompt": "1+1?", "answer": 2}), "", json.dumps({"prompt": "2+2?", "answer": "4"})]
    good.write_text("\n".join(rows) + "\n")
    rows = load_file(good)
    assert [r["answer"] for r in rows] == ["2", "4"] and rows[0]["task"] == "gsm"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_file(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_file(tmp_path / "missing.jsonl")


def test_jsonl_row_errors_name_the_line(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text(json.dumps({"prompt": "a", "answer": 1}) + "\n\n" + json.dumps({"question": "b", "answer": 2}) + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl:3: row 1 has no 'prompt' \(expected a non-empty string or"):
        load_file(f)


def test_message_list_prompts_are_checked():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    assert validate_rows([{"prompt": chat, "answer": "2"}], "x")[0]["prompt"] == chat
    with pytest.raises(ValueError, match=r"x: row 0 'prompt' message 1 is \{'role': 'robot'"):
        validate_rows([{"prompt": [chat[0], {"role": "robot", "content": "?"}], "answer": "2"}], "x")
    with pytest.raises(ValueError, match="does not end with a 'user' message"):
        validate_rows([{"prompt": [*chat, {"role": "assistant", "content": "2"}], "answer": "2"}], "x")
    with pytest.raises(ValueError, match="image rows take a string"):
        validate_rows([{"prompt": chat, "answer": "2", "mode": "t2i", "scene": []}], "x")


def test_long_rows_count_every_step_and_fill_the_length_they_are_made_for():
    from transformers import AutoTokenizer

    from rl.data.tasks import long_count_range
    from rl.models import TINY_CHECKPOINT
    from rl.models.tokenizer import EOT

    tok = AutoTokenizer.from_pretrained(TINY_CHECKPOINT)
    for L in (64, 256, 512):
        rows = make_rows("long", 100, seed=0, split="test", length=L)
        for r in rows:
            a, b = (int(w.rstrip(".")) for w in r["prompt"].split()[2::2])
            assert r["answer"] == " ".join(str(x) for x in range(a, b + 1)) and 100 <= a < b <= 999
            assert a // 100 == b // 100  # no carry into the hundreds
            assert r["solution"] == f"<answer>{r['answer']}</answer>"
            used = len(tok(r["solution"] + EOT, add_special_tokens=False)["input_ids"])
            assert 0.75 * L <= used <= 0.9 * L, (L, used)
    free = make_rows("long", 200, seed=0)
    assert len({len(r["answer"].split()) for r in free}) > 50  # training rows of every count
    with pytest.raises(ValueError, match="task 'long': length 2048"):
        long_count_range(2048)
    with pytest.raises(ValueError, match=r"task 'arithmetic' takes no option \['length'\]"):
        make_rows("arithmetic", 2, length=64)
