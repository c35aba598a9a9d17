"""The whole path a user with real data takes, on the tiny model: the synthetic arithmetic rows written
as a GSM8K-format file and as a verl-format parquet; a few LoRA training steps from the parquet;
rl.evaluate of the run at two lengths over the GSM8K file; lm-eval on its local fixture task with the
run as `pretrained`; rl.export of the run, reloaded through transformers with bit-identical logits."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rl.data.tasks import make_rows
from rl.driver import Driver
from rl.evaluate import Evaluator
from rl.export import export
from rl.models import load_checkpoint, resolve_model_dir
from tests.conftest import ROOT, compose_cfg
from tests.test_lm_eval import FIXTURES, write_tasks_data


def write_gsm8k(path, rows):
    """openai/gsm8k's layout: the worked solution ends with '#### N'."""
    with open(path, "w") as f:
        for r in rows:
            steps = r["solution"].split("<think>")[1].split("</think>")[0]
            f.write(json.dumps({"question": r["prompt"], "answer": f"{steps}\n#### {r['answer']}"}) + "\n")


def write_verl(path, rows):
    """verl's RL parquet, as its examples/data_preprocess scripts write it."""
    records = [{"data_source": "arithmetic", "prompt": [{"role": "user", "content": r["prompt"]}], "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": r["answer"]},
                "extra_info": {"split": "train", "index": i}} for i, r in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(records), path)


@pytest.mark.slow
def test_parquet_training_then_evaluate_lm_eval_and_export(local_ray, tmp_path):
    write_verl(tmp_path / "train.parquet", make_rows("arithmetic", 32))
    write_gsm8k(tmp_path / "test.jsonl", make_rows("arithmetic", 6, split="test"))
    run = tmp_path / "run"
    driver = Driver(compose_cfg(f"task.train_file={tmp_path / 'train.parquet'}", "task.val={arithmetic: 4}",
                                "model.lora={r: 4, alpha: 8}", "trainer.val_every=0", "trainer.save_every=2",
                                "trainer.val_before_train=false", "task.max_prompt_length=64"), run)
    try:
        assert [r["task"] for r in driver.cursor.rows] == ["arithmetic"] * 32
        assert driver.cursor.rows[0]["extra_info"] == {"split": "train", "index": 0}
        driver.fit()
    finally:
        driver.close()
    policy = resolve_model_dir(run)
    assert policy == run / "checkpoints" / "global_step_2" / "actor" / "hf"

    cfg = compose_cfg(f"model.path={run}", "task=gsm8k", f"task.val_file={tmp_path / 'test.jsonl'}",
                      "eval.lengths=[16,32]", "eval.block_length=16", f"eval.output_dir={tmp_path / 'eval'}",
                      "ray.num_cpus=6", base=[])
    evaluator = Evaluator(cfg, cfg.eval.output_dir)
    try:
        summary = evaluator.run()
    finally:
        evaluator.close()
    assert summary["model"] == str(policy) and set(summary["lengths"]) == {"16", "32"}
    assert all(r["prompts"] == 6 and 0 <= r["accuracy"] <= 1 for r in summary["lengths"].values())
    lines = [json.loads(x) for x in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and lines[0]["prompt"].startswith("You are a math expert")  # d1's GSM8K prompt
    assert lines[0]["answer"] == make_rows("arithmetic", 1, split="test")[0]["answer"]  # the number after ####

    write_tasks_data(tmp_path / "arithmetic.jsonl", n=4)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "rl.lm_eval", "--model", "dllm_rl", "--model_args",
                           f"pretrained={run},gen_length=32,steps=16,block_length=16,mc_num=4", "--batch_size", "4",
                           "--device", "cpu", "--apply_chat_template", "--tasks", "dllm_rl_arith_gen",
                           "--include_path", str(FIXTURES), "--output_path", str(tmp_path / "lm_eval")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "lm_eval").rglob("results_*.json")).read_text())
    assert 0 <= results["results"]["dllm_rl_arith_gen"]["exact_match,answer"] <= 1
    assert results["config"]["model"] == "dllm_rl"
    out = tmp_path / "export"
    export(run, out, max_shard_size="200KB")
    assert (out / "model.safetensors.index.json").is_file()
    from transformers import AutoModel

    exported = AutoModel.from_pretrained(out)
    trained, tok = load_checkpoint(policy)
    ids = torch.tensor([tok("12+3?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, trained(ids).logits)
