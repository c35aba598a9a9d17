"""The lm-eval model `dllm_rl` on the tiny checkpoint: lm-eval's own CLI end to end over local tasks
(tests/fixtures/lm_eval), and the loglikelihood / generate_until contracts in process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from rl.data.tasks import make_rows  # noqa: E402
from rl.lm_eval import DiffusionLM  # noqa: E402
from rl.models import TINY_CHECKPOINT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "lm_eval"


def write_tasks_data(path: Path, n: int = 8) -> None:
    """arithmetic.jsonl as the fixture YAMLs read it: the held-out rows, the worked solution up to
    <answer> (the multiple-choice prefill), and four candidate answers with the true one's index."""
    with open(path, "w") as f:
        for i, row in enumerate(make_rows("arithmetic", n, split="test")):
            a, s = int(row["answer"]), row["solution"]
            options = [a, a + 1, a + 2, a - 1]
            options = options[i % 4:] + options[:i % 4]
            f.write(json.dumps({**row, "head": s[:s.rindex("<answer>") + len("<answer>")],
                                "choices": [str(o) for o in options], "label": options.index(a)}) + "\n")


def test_cli_runs_local_tasks(tmp_path):
    write_tasks_data(tmp_path / "arithmetic.jsonl")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rl.lm_eval", "--model", "dllm_rl",
           "--model_args", f"pretrained={TINY_CHECKPOINT},gen_length=64,steps=32,block_length=16,mc_num=4",
           "--batch_size", "4", "--device", "cpu", "--limit", "4", "--apply_chat_template",
           "--tasks", "dllm_rl_arith_gen,dllm_rl_arith_mc", "--include_path", str(FIXTURES),
           "--output_path", str(out), "--log_samples"]
    # cwd: the YAMLs' relative data_files resolve against it
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert 0 <= results["dllm_rl_arith_gen"]["exact_match,answer"] <= 1
    assert 0 <= results["dllm_rl_arith_mc"]["acc,none"] <= 1
    gen = [json.loads(line) for line in next(out.rglob("samples_dllm_rl_arith_gen_*.jsonl")).open()]
    assert gen and all("</answer>" not in s["resps"][0][0] for s in gen)  # cut at `until`


@pytest.fixture(scope="module")
def lm():
    return DiffusionLM(pretrained=str(TINY_CHECKPOINT), gen_length=32, steps=16, block_length=16,
                       mc_num=8, batch_size=4)


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def chat(lm, row):
    return lm.apply_chat_template([{"role": "user", "content": row["prompt"]}])


def test_loglikelihood_deterministic_and_ranks_a_memorised_continuation(lm):
    row = make_rows("arithmetic", 1, split="test")[0]
    s = row["solution"]
    context = chat(lm, row) + s[:s.rindex("</answer>")]  # ...</think><answer>4
    right, wrong = request("loglikelihood", context, "</answer>"), request("loglikelihood", context, "<think>")
    first = lm.loglikelihood([right, wrong])
    assert lm.loglikelihood([wrong, right]) == first[::-1]  # seeded per request, not per position
    (ll_right, greedy_right), (ll_wrong, greedy_wrong) = first
    assert ll_right > ll_wrong + 5
    assert greedy_right and not greedy_wrong


def test_generate_until_cuts_at_until_and_max_gen_toks(lm):
    rows = make_rows("arithmetic", 3, split="test")
    contexts = [chat(lm, r) for r in rows]
    full = lm.generate_until([request("generate_until", c, {"until": []}) for c in contexts])
    assert all("<answer>" in t for t in full)  # sanity: the tiny model answers in its format
    cut = lm.generate_until([request("generate_until", c, {"until": ["<answer>", "\n\n"]}) for c in contexts])
    assert cut == [t[:t.index("<answer>")] for t in full]
    short = lm.generate_until([request("generate_until", c, {"until": [], "max_gen_toks": 3}) for c in contexts])
    assert all(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) <= 3 for t in short)


def test_plain_context_has_no_chat_template(lm):
    # without --apply_chat_template a context is plain text, encoded with the tokenizer's own specials
    assert lm.encode("12+3") == lm.tokenizer("12+3")["input_ids"]
    templated = chat(lm, {"prompt": "12+3"})
    assert lm.encode(templated) == lm.tokenizer(templated, add_special_tokens=False)["input_ids"]


def test_rolling_loglikelihood_adds_the_bounds_of_its_windows(lm):
    text = make_rows("arithmetic", 1, split="test")[0]["solution"]
    (whole,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    assert whole == lm.loglikelihood([request("loglikelihood", "", text)])[0][0] < 0  # one window: [BOS] + text
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    short = DiffusionLM(pretrained=str(TINY_CHECKPOINT), mc_num=8, batch_size=4, max_length=len(ids) // 2 + 1)
    (split,) = short.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    # lm-eval's first window: [BOS] -> the first max_length tokens; the rest add their own negative bounds
    first = short._mc_loglikelihood([lm.tokenizer.bos_token_id], ids[:short.max_length],
                                    torch.Generator().manual_seed(short.seed))
    assert split < first < 0


def test_import_without_lm_eval_names_the_extra(monkeypatch):
    import importlib

    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None: "not installed" to the import system
    monkeypatch.delitem(sys.modules, "rl.lm_eval")
    with pytest.raises(ImportError, match=r"pip install -e \.\[eval\]"):
        importlib.import_module("rl.lm_eval")


def test_bad_model_args_are_named():
    with pytest.raises(ValueError, match="mc_num=6"):
        DiffusionLM(pretrained=str(TINY_CHECKPOINT), mc_num=6, batch_size=4)
    with pytest.raises(ValueError, match="gen_lenght"):
        DiffusionLM(pretrained=str(TINY_CHECKPOINT), gen_lenght=64)
    with pytest.raises(ValueError, match="cfg_scale"):  # `cfg` is its name here, as in LLaDA's script
        DiffusionLM(pretrained=str(TINY_CHECKPOINT), cfg_scale=0.5)
