"""The shipped tiny checkpoint, the recipe that builds it and the pass@k evaluation that measured it."""
import json
import random

import torch

from recipes import build_tiny_llada, build_tiny_llada_long
from rl.data.tasks import make_rows
from rl.evaluate import pass_at_k
from rl.models import TINY_CHECKPOINT, TINY_LONG_CHECKPOINT, load_checkpoint
from rollout.sampler import SamplerConfig


def test_shipped_checkpoint_loads_and_is_small():
    size = sum(p.stat().st_size for p in TINY_CHECKPOINT.iterdir())
    assert size <= 20 * 2**20
    model, tok = load_checkpoint(TINY_CHECKPOINT)
    assert model.config.mask_token_id == tok.mask_token_id and tok.padding_side == "left"
    info = json.loads((TINY_CHECKPOINT / "build_info.json").read_text())
    assert info["recipe"] == "python -m recipes.build_tiny_llada" and info["selection_history"]


def test_shipped_long_answer_checkpoint_and_its_recipe(tmp_path):
    model, tok = load_checkpoint(TINY_LONG_CHECKPOINT)
    assert tok.get_vocab() == load_checkpoint(TINY_CHECKPOINT)[1].get_vocab()  # fine-tuned, same tokenizer
    info = json.loads((TINY_LONG_CHECKPOINT / "build_info.json").read_text())
    assert info["recipe"] == "python -m recipes.build_tiny_llada_long" and info["selection_history"]
    build_tiny_llada_long.main(["--out", str(tmp_path / "long"), "--max-steps", "2", "--eval-every", "1",
                                "--eval-rows", "2", "--eval-length", "64", "--threads", "1", "--train-rows", "2000"])
    info = json.loads((tmp_path / "long" / "build_info.json").read_text())
    assert info["steps"] == 2 and [h["step"] for h in info["selection_history"]] == [1, 2]
    assert {"accuracy", "numbers_right", "tokens_per_step"} <= set(info["selection_history"][-1])
    assert load_checkpoint(tmp_path / "long")[0].config.n_layers == model.config.n_layers


def test_pass_at_k_counts_per_prompt_successes():
    torch.manual_seed(0)
    model, tok = load_checkpoint(TINY_CHECKPOINT)
    rows = make_rows("arithmetic", 4, 0, "val")
    sampler = SamplerConfig(gen_length=32, block_length=16, steps=16, temperature=0.9)
    seen = []

    def every_other(completions, batch_rows):
        seen.extend(r["prompt"] for r in batch_rows)
        return [float(i % 2 == 0) for i in range(len(completions))]

    res = pass_at_k(model, tok, rows, 2, sampler, every_other, batch_size=3)
    assert res == {"pass@1": 0.5, "pass@2": 1.0, "n": 4}
    assert seen == [r["prompt"] for r in rows for _ in range(2)]  # k consecutive samples per prompt
    real = pass_at_k(model, tok, rows, 2, sampler, build_tiny_llada.exact_answer, batch_size=8)
    assert 0.0 <= real["pass@1"] <= real["pass@2"] <= 1.0


def test_recipe_builds_a_loadable_checkpoint_in_two_stages(tmp_path):
    small = ["--max-steps", "2", "--eval-every", "2", "--threads", "1", "--train-rows", "3000", "--val-rows", "4"]
    build_tiny_llada.main(["--out", str(tmp_path / "one"), *small])
    model, tok = load_checkpoint(tmp_path / "one")
    assert json.loads((tmp_path / "one" / "build_info.json").read_text())["steps"] == 2
    assert model.config.n_layers == 6 and tok.mask_token_id == model.config.mask_token_id
    build_tiny_llada.main(["--out", str(tmp_path / "two"), "--init", str(tmp_path / "one"), "--careless", "0.5",
                           "--warmup", "1", *small])
    info = json.loads((tmp_path / "two" / "build_info.json").read_text())
    assert [s["careless"] for s in info["stages"]] == [0.0, 0.5] and info["init"] == str(tmp_path / "one")
    assert load_checkpoint(tmp_path / "two")[1].get_vocab() == tok.get_vocab()  # the first stage's tokenizer


def test_careless_teacher_keeps_the_working_and_misses_the_answer():
    rng = random.Random(0)
    for row in make_rows("arithmetic", 50, 0, "train"):
        bad = build_tiny_llada.careless(row, rng)
        head, _, tail = bad["solution"].rpartition("<answer>")
        assert row["solution"].startswith(head + "<answer>") and tail.endswith("</answer>")
        wrong = tail[: -len("</answer>")]
        assert wrong != row["answer"] and int(wrong) >= 0 and bad["answer"] == row["answer"]
