import json
from pathlib import Path

import pytest
import torch

from bench.learner import ESTIMATORS, main, model_config, recipe_hyper, synthetic_batch
from rl.estimators import build_estimator, token_logps
from rl.models.llada import LLaDAModelLM

UPDATE = str(Path(__file__).resolve().parent.parent / "rl" / "update.py")


def test_bench_reports_every_estimator_with_its_passes(capsys):
    out = main(["--sizes", "tiny", "--repeats", "1", "--prompt-length", "8", "--threads", "1",
                "--estimators", *ESTIMATORS, "--variant", UPDATE])
    assert json.loads(capsys.readouterr().out) == out
    assert out["settings"]["mu"] == 2 and out["config"]["tiny"]["positions"] == 8 + 32
    base = out["baseline"]["tiny"]
    assert base["tokens_per_s"] > 0 and base["passes"] == 1.0 and isinstance(base["peak_mb"], float)
    # grad + no-grad forward passes over the batch per inner step, counted at the model, at mu=2: the
    # reference once per inner step, old once per update (the first inner step's old log-probs are its own)
    passes = {"unigrpo": (1, 1.5), "diffu_grpo": (1, 1.5), "coupled_grpo": (3, 4.5), "wd1": (1, 0), "spg": (2, 0)}
    for name, (grad, nograd) in passes.items():
        e = out[name]["tiny"]
        for key in ("tokens_per_s", "overhead", "overhead_per_pass", "peak_mb", "seconds_median"):
            assert isinstance(e[key], float) and e[key] == e[key], (name, key)
        assert e["tokens_per_s"] > 0 and e["overhead"] > 0
        assert (e["grad_passes"], e["nograd_passes"], e["passes"]) == (grad, nograd, grad + nograd)
        assert e["overhead_per_pass"] == pytest.approx(e["overhead"] / e["passes"], abs=1e-3)
        # the same policy_update loaded as a variant: the same passes, timed against the same baselines
        v = out[f"{name}@update"]["tiny"]
        assert v["passes"] == e["passes"] and v["seconds_vs_current"] > 0


class NoSpan(torch.nn.Module):
    """The model behind a forward that takes no logits_span: the head runs on every position."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_answer_only_head_gives_the_same_log_probs():
    cfg = model_config("tiny", 1000)
    torch.manual_seed(0)
    model = LLaDAModelLM(cfg)
    batch = synthetic_batch(8, 12, 32, cfg.vocab_size, cfg.mask_token_id, cfg.eos_token_id, 0)
    for name in ESTIMATORS:
        est = build_estimator(name, **recipe_hyper(name), mask_id=cfg.mask_token_id)
        plan = est.plan(batch, 1, torch.Generator().manual_seed(1))[0]
        span = token_logps(model, batch, plan, cfg.mask_token_id, entropy=True)
        full = token_logps(NoSpan(model), batch, plan, cfg.mask_token_id, entropy=True)
        torch.testing.assert_close(span.logp, full.logp, rtol=0, atol=1e-6)
        torch.testing.assert_close(span.entropy, full.entropy, rtol=0, atol=1e-6)
