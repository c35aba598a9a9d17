import json

import pytest
import torch

from bench.rollout import llada_published_generate, main
from rl.data.encode import encode_prompts
from rl.data.tasks import make_rows
from rl.models import TINY_CHECKPOINT, TINY_LONG_CHECKPOINT, load_checkpoint
from rollout.sampler import SamplerConfig, generate


def test_published_loop_matches_the_reference_sampler_greedy():
    """The timing baseline is the same algorithm: at temperature 0 both pick the same tokens."""
    model, tok = load_checkpoint(TINY_CHECKPOINT)
    rows = make_rows("arithmetic", 4, 0, "test")
    ids, mask = encode_prompts(tok, [r["prompt"] for r in rows])
    ref = generate(model.eval(), ids, mask, tok.mask_token_id, SamplerConfig(gen_length=32, block_length=16, steps=16))
    pub = llada_published_generate(model, ids, mask, 16, 32, 16, 0.0, tok.mask_token_id)
    assert torch.equal(pub, ref.answer_ids)


def test_bench_reports_every_sampler_and_checks_its_reference_shortcut(capsys):
    out = main(["--lengths", "64", "--prompts", "6", "--runs", "2", "--timing-prompts", "2", "--batch", "3"])
    entry = out["lengths"]["64"]
    for key in ("ref_tokens_per_s", "fast_tokens_per_s", "speedup", "ref_accuracy", "fast_accuracy"):
        assert isinstance(entry[key], float), key
    for name in ("ref", "ref_d1", "fast", "cache_only", "threshold_only", "early_stop_only", "cache_and_threshold"):
        assert entry[name]["seconds_median"] > 0
    assert entry["ref"]["forward_passes"] == 64 and entry["ref_d1"]["forward_passes"] == 32
    assert entry["ref"]["tokens_per_step"] == 1.0 and entry["fast"]["tokens_per_step"] > 1.0
    assert entry["ref_exact_agreement"] == 1.0  # the accuracy shortcut reproduces the reference
    assert entry["answer_lengths"]["ref"]["max"] <= 64
    assert json.loads(capsys.readouterr().out)["lengths"]["64"]["speedup"] == entry["speedup"]
    with pytest.raises(SystemExit):
        main(["--prompts", "4", "--runs", "3", "--timing-prompts", "2"])


def test_bench_long_task_reports_each_technique_without_early_stop():
    out = main(["--task", "long", "--lengths", "64", "--prompts", "4", "--runs", "2", "--timing-prompts", "2",
                "--no-baselines"])
    entry = out["lengths"]["64"]
    assert out["checkpoint"] == str(TINY_LONG_CHECKPOINT)
    for name in ("cache_only", "threshold_only", "cache_and_threshold"):
        assert entry[name]["early_stop"] is False and entry[name]["speedup"] > 0
        assert entry[name]["ref_accuracy"] == entry["ref_accuracy"]  # every prompt was timed
        assert 0.0 <= entry[name]["fast_accuracy"] <= 1.0
    # answers_closed: the share of answers whose </answer> fit, where task long scores the chain alone
    assert all(0.0 <= entry[k]["answers_closed"] <= 1.0 for k in ("ref", "fast", "cache_and_threshold"))
    assert entry["fast"]["early_stop"] is True
    assert entry["speedup_without_early_stop"] == entry["cache_and_threshold"]["speedup"]
    assert entry["ref_accuracy_method"] == "reference sampler (every prompt timed)"
    assert "ref_d1" not in entry and "published_llada_seconds_median" not in entry
    # The long-answer checkpoint writes answers that fill most of the length.
    for lengths in entry["answer_lengths"].values():
        assert lengths["min"] >= 0.7 * 64
