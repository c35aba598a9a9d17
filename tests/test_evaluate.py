"""python -m rl.evaluate on the shipped tiny model: outputs, resume after a kill, refused settings, a
training checkpoint as model.path, and the pass@k estimator."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from rl.config import ConfigError
from rl.data.tasks import make_rows
from rl.evaluate import Evaluator, Generations, unbiased_pass_at_k
from rl.models import TINY_CHECKPOINT
from rollout.worker import RolloutWorker, override_sampler
from tests.conftest import ROOT, compose_cfg

RECORD_KEYS = {"length", "prompt_index", "sample", "prompt", "answer", "completion", "extracted", "score", "reward",
               "correct", "tokens"}
# 8 prompts x 2 samples x lengths 16 and 32, in chunks of 2 prompts, sampled (so seeds matter).
EVAL = ["eval.lengths=[16,32]", "eval.block_length=16", "eval.n=2", "eval.k=[1,2]", "eval.temperature=0.7",
        "eval.batch_size=2", "rollout.num_workers=2", "ray.num_cpus=6"]


def test_unbiased_pass_at_k_by_hand():
    assert unbiased_pass_at_k(5, 2, 1) == pytest.approx(2 / 5)  # pass@1 = c/n
    assert unbiased_pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert unbiased_pass_at_k(4, 1, 3) == pytest.approx(1 - 1 / 4)  # 1 - C(3,3)/C(4,3)
    assert unbiased_pass_at_k(5, 0, 3) == 0.0
    assert unbiased_pass_at_k(5, 3, 3) == 1.0  # fewer than k wrong: every draw of 3 holds a correct one


def test_a_per_call_sampler_override_keeps_the_rollout_groups_other_keys():
    fast = {"sampler": "fast", "gen_length": 32, "block_length": 16, "steps": 16, "temperature": 0.9,
            "remasking": "random", "cache": "dual", "threshold": 0.9, "num_workers": 1, "micro_batch": 0}
    ref = override_sampler(fast, {"sampler": "reference", "gen_length": 16, "steps": 8, "temperature": 0.0})
    assert vars(ref) == {"gen_length": 16, "block_length": 16, "steps": 8, "temperature": 0.0,
                         "remasking": "random", "cfg_scale": 0.0}  # fast-only keys dropped, not refused
    assert override_sampler(fast, {"threshold": 0.5}).threshold == 0.5
    with pytest.raises(ValueError, match="takes no \\['threshold'\\]"):
        override_sampler(fast, {"sampler": "reference", "threshold": 0.5})
    with pytest.raises(ValueError, match="block_length"):
        override_sampler(fast, {"gen_length": 24})
    worker = RolloutWorker(str(TINY_CHECKPOINT), fast)
    rows = [{"prompt": "1+1?", "answer": "2"}]
    batch = worker.generate(rows, 2, 0, sampler={"sampler": "reference", "gen_length": 16, "steps": 8})
    assert batch.answer_ids.shape == (2, 16) and worker.generate(rows, 1, 0).answer_ids.shape[1] <= 32


def test_generations_drop_a_torn_line_and_refuse_what_they_cannot_trust(tmp_path):
    settings = {"model": "m", "samplers": {"16": {"temperature": 0.0}}}
    Generations(tmp_path, settings).append([{"length": 16, "prompt_index": 0, "sample": 0}])
    with open(tmp_path / "generations.jsonl", "a") as f:
        f.write('{"length": 16, "prompt_ind')
    store = Generations(tmp_path, {**settings, "samplers": {"32": {"temperature": 1.0}}})  # a new length is fine
    assert list(store.records) == [(16, 0, 0)] and (tmp_path / "generations.jsonl").read_text().endswith("}\n")
    assert json.loads((tmp_path / "eval_config.json").read_text())["samplers"].keys() == {"16", "32"}
    with pytest.raises(ConfigError, match="other settings \\(model: 'm' there, 'x' now"):
        Generations(tmp_path, {**settings, "model": "x"})
    (tmp_path / "eval_config.json").unlink()
    with pytest.raises(ConfigError, match="no eval_config.json beside it"):
        Generations(tmp_path, settings)
    (tmp_path / "generations.jsonl").write_text("not json\n")
    with pytest.raises(ConfigError, match="line 1 is damaged"):
        Generations(tmp_path, settings)


@pytest.fixture(scope="module")
def val_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "val.jsonl"
    rows = make_rows("arithmetic", 8, split="test")
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
    return path


def evaluate(*overrides):
    cfg = compose_cfg(*overrides, base=[])
    evaluator = Evaluator(cfg, cfg.eval.output_dir)
    try:
        return evaluator.run(), evaluator.generated
    finally:
        evaluator.close()


def stable(summary):
    return {**summary, "lengths": {k: {m: v for m, v in r.items() if m != "seconds"}
                                   for k, r in summary["lengths"].items()}}


@pytest.mark.slow
def test_evaluate_writes_its_outputs_and_resumes_after_a_kill_exactly(local_ray, tmp_path, val_file):
    a, b = tmp_path / "a", tmp_path / "b"
    summary, generated = evaluate(*EVAL, f"task.val_file={val_file}", f"eval.output_dir={a}")
    assert generated == {16: 16, 32: 16}
    assert set(summary["lengths"]) == {"16", "32"}
    for r in summary["lengths"].values():
        assert 0 <= r["accuracy"] <= 1 and r["accuracy"] <= r["pass@2"] <= 1
        assert r["prompts"] == 8 and r["samples"] == 16 and 0 < r["mean_tokens"] <= 32
    assert json.loads((a / "summary.json").read_text()) == summary
    lines = [json.loads(x) for x in (a / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 8 * 2 * 2 and all(set(r) == RECORD_KEYS for r in lines)
    assert [(r["length"], r["prompt_index"], r["sample"]) for r in lines] == sorted(
        (L, i, s) for L in (16, 32) for i in range(8) for s in range(2))
    assert all(r["correct"] == (r["score"] >= 0.5) and r["answer"] is not None for r in lines)
    assert "| 16 |" in (a / "results.md").read_text()

    # Killed mid-way: 11 whole lines (length 16, prompts 0-4 and the first sample of 5) and a torn one.
    shutil.copytree(a, b)
    raw = (a / "generations.jsonl").read_text().splitlines(keepends=True)
    (b / "generations.jsonl").write_text("".join(raw[:11]) + raw[11][:20])
    (b / "summary.json").unlink()
    resumed, generated = evaluate(*EVAL, f"task.val_file={val_file}", f"eval.output_dir={b}")
    # Only the chunks with a missing line: prompts 4-7 at length 16 (chunk 4-5 again, whole, for its seed), all of 32.
    assert generated == {16: 8, 32: 16}
    assert (b / "generations.jsonl").read_bytes() == (a / "generations.jsonl").read_bytes()
    assert stable(resumed) == stable(summary)

    with pytest.raises(ConfigError, match=r"other settings \(length 16 temperature: 0.7 there, 0.5 now"):
        Evaluator(compose_cfg(*EVAL, f"task.val_file={val_file}", f"eval.output_dir={b}", "eval.temperature=0.5",
                              base=[]), b)


@pytest.mark.slow
def test_the_cli_evaluates_a_training_checkpoint(tmp_path, val_file):
    from rl.checkpoint import CheckpointManager
    from rl.models import TINY_CHECKPOINT

    CheckpointManager(tmp_path / "run", keep_last=None).save(
        1, lambda p: shutil.copytree(TINY_CHECKPOINT, p / "actor" / "hf"), {})
    step = tmp_path / "run" / "checkpoints" / "global_step_1"
    out = subprocess.run([sys.executable, "-m", "rl.evaluate", f"model.path={step}", f"task.val_file={val_file}",
                          "eval.lengths=[16]", "eval.block_length=16", "eval.limit=3", "ray.num_cpus=6",
                          f"hydra.run.dir={tmp_path / 'eval'}"],
                         check=False, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["model"] == str(step / "actor" / "hf") and summary["sampler"]["sampler"] == "reference"
    assert summary["lengths"]["16"]["prompts"] == 3 and summary["lengths"]["16"]["steps"] == 8
    assert json.loads((tmp_path / "eval" / "summary.json").read_text()) == summary
    assert len((tmp_path / "eval" / "generations.jsonl").read_text().splitlines()) == 3
