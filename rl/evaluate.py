"""Held-out evaluation of a checkpoint, without training.

    python -m rl.evaluate model.path=DIR task.val_file=FILE [eval.lengths=[128,256,512]] [key=value ...]

The same conf/ and checks as rl.train (model, task, rollout, reward groups; rl.config.validate) plus
the `eval` section (rl.config.EvalConfig; the default is d1's protocol: LLaDA's reference sampler,
greedy, blocks of 32, length/2 steps). model.path may be a training checkpoint (rl.models.resolve_model_dir).
Only rollout and reward workers start (rl.actors.Actors(learners=False)). For each generation length,
task.val's prompts (the first eval.limit) go in chunks of eval.batch_size prompts x eval.n samples to
the rollout workers, one chunk per worker at a time, then to the reward workers; reward.accuracy
decides correct (score >= 0.5).

In the output directory (eval.output_dir, default the Hydra run dir):
  generations.jsonl  one line per sample, appended chunk by chunk, in (length, prompt, sample) order
                     once the evaluation is complete
  eval_config.json   the settings the lines were made with
  summary.json       per length: accuracy (= pass@1 over all samples), pass@k, prompts, samples,
                     mean tokens, seconds (this invocation's); also printed to stdout
  results.md         the same as a markdown table

Resuming: rerun on the same directory. Lines already there are kept (a torn last line is dropped),
only chunks with a missing line are generated again, and each chunk's seed depends only on (seed,
length, its first prompt), so the result equals an uninterrupted run's, sampled or greedy. Different
settings in the directory are refused (other lengths may be added).

`pass_at_k` below is the in-process library version (recipes/eval_tiny.py, recipes/build_tiny_llada.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from rl.config import ConfigError
from rl.errors import write_atomic
from rollout.rollout import rollout
from rollout.sampler import SamplerConfig

log = logging.getLogger("dllm_rl")

# score(completions, rows) -> 1.0 / 0.0 per completion
Scorer = Callable[[list[str], list[dict]], list[float]]


def unbiased_pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k samples drawn from n (c of them correct) is correct:
    1 - C(n-c, k) / C(n, k) (Chen et al. 2021, unbiased for pass@k)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def pass_at_k(model, tokenizer, rows: list[dict], k: int, sampler: SamplerConfig, score: Scorer,
              batch_size: int = 64, seed: int = 0) -> dict:
    """pass@1 = mean success over the k samples; pass@k = fraction of prompts with any success
    (the unbiased estimator with n = k samples)."""
    was_training = model.training
    model.eval()
    batch = rollout(model, tokenizer, rows, k, sampler, torch.Generator().manual_seed(seed), micro_batch=batch_size)
    model.train(was_training)
    scores = score(batch.completions, batch.rows)
    hits = (torch.tensor(scores, dtype=torch.float64).view(len(rows), k) > 0.5).sum(1).tolist()
    return {"pass@1": sum(hits) / (k * len(rows)),
            f"pass@{k}": sum(unbiased_pass_at_k(k, c, k) for c in hits) / len(rows), "n": len(rows)}


# ---- settings -----------------------------------------------------------------------------------
def sampler_override(cfg: DictConfig, length: int) -> dict:
    """RolloutWorker.generate's `sampler` for one generation length."""
    e = cfg.eval
    return {"sampler": e.sampler, "gen_length": length, "block_length": e.block_length,
            "steps": length // 2 if e.steps is None else e.steps, "temperature": e.temperature}


def chunk_seed(seed: int, length: int, first: int) -> int:
    return (seed * 1_000_003 + length * 7919 + first) % 2**31


def fingerprint(cfg: DictConfig, model_path: str, rows: list[dict], samplers: dict) -> dict:
    """What the lines of generations.jsonl depend on. The worker count does not: chunks are fixed."""
    text = json.dumps(rows, sort_keys=True, ensure_ascii=False, default=str).encode()
    reward = OmegaConf.to_container(cfg.reward, resolve=True)
    return {"model": model_path, "rows_sha256": hashlib.sha256(text).hexdigest(), "prompts": len(rows),
            "seed": cfg.seed, "n": cfg.eval.n, "batch_size": cfg.eval.batch_size,
            "micro_batch": cfg.rollout.micro_batch,
            "reward": {"functions": reward["functions"], "accuracy": reward["accuracy"]},
            "samplers": samplers}


def _differences(old: dict, new: dict) -> list[str]:
    out = [f"{k}: {old.get(k)!r} there, {new[k]!r} now" for k in new if k != "samplers" and old.get(k) != new[k]]
    for length, settings in new["samplers"].items():
        before = old.get("samplers", {}).get(length)
        if before is not None and before != settings:
            out += [f"length {length} {k}: {before.get(k)!r} there, {v!r} now"
                    for k, v in settings.items() if before.get(k) != v]
    return out


# ---- the output directory -----------------------------------------------------------------------
class Generations:
    """generations.jsonl and its eval_config.json: the lines kept so far, by (length, prompt, sample)."""

    def __init__(self, out_dir: Path, settings: dict):
        self.path, self.config_path = out_dir / "generations.jsonl", out_dir / "eval_config.json"
        self.records = self._load()
        if self.config_path.exists():
            old = json.loads(self.config_path.read_text())
            diffs = _differences(old, settings)
            if diffs:
                raise ConfigError(f"{out_dir} holds an evaluation made with other settings ({'; '.join(diffs)}); "
                                  f"evaluate into another eval.output_dir, or delete it")
            settings = {**settings, "samplers": {**old["samplers"], **settings["samplers"]}}
        elif self.records:
            raise ConfigError(f"{self.path} has no {self.config_path.name} beside it, so its settings are "
                              f"unknown; evaluate into another eval.output_dir")
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_text(self.config_path, json.dumps(settings, indent=2) + "\n")

    def _load(self) -> dict[tuple, dict]:
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # killed mid-write: that sample is generated again
            log.warning("%s: dropping a torn last line", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(end)
        records = {}
        for i, line in enumerate(data[:end].splitlines()):
            try:
                r = json.loads(line)
                records[(r["length"], r["prompt_index"], r["sample"])] = r
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{self.path}: line {i + 1} is damaged (not a generation record); "
                                  f"evaluate into another eval.output_dir") from None
        return records

    def append(self, records: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        self.records.update({(r["length"], r["prompt_index"], r["sample"]): r for r in records})

    def sort(self) -> None:
        """Rewrite in (length, prompt, sample) order: a resumed evaluation's file equals an uninterrupted one's."""
        _write_text(self.path, "".join(json.dumps(self.records[key], ensure_ascii=False) + "\n"
                                         for key in sorted(self.records)))


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, text.encode("utf-8"))


# ---- the evaluation -----------------------------------------------------------------------------
class Evaluator:
    def __init__(self, cfg: DictConfig, out_dir: str | Path):
        from rl.actors import Actors
        from rl.config import model_path, validate
        from rl.data.loader import has_images, load_split
        from rollout.worker import override_sampler

        validate(cfg, splits=("val",))  # no training rows needed: task=gsm8k with only task.val_file
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.model_path = model_path(cfg)
        self.accuracy_keys = ([cfg.reward.accuracy] if isinstance(cfg.reward.accuracy, str)
                              else list(cfg.reward.accuracy))
        self.rows = load_split(cfg.task, "val", cfg.seed, model_dir=self.model_path)[:cfg.eval.limit]
        if has_images(self.rows):
            raise ConfigError("task.val: rl.evaluate scores text answers; these rows hold images")
        rollout_keys = OmegaConf.to_container(cfg.rollout, resolve=True)
        samplers = {}
        for length in cfg.eval.lengths:
            try:
                samplers[str(length)] = vars(override_sampler(rollout_keys, sampler_override(cfg, length)))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"eval (length {length}): {e}") from None
        self.samplers = samplers
        self.store = Generations(self.out_dir, fingerprint(cfg, self.model_path, self.rows, samplers))
        self.generated = {length: 0 for length in cfg.eval.lengths}  # samples generated by this invocation
        self.actors = Actors(cfg, self.model_path, self.accuracy_keys, learners=False)

    def run(self) -> dict:
        from tqdm import tqdm

        e, P, workers = self.cfg.eval, len(self.rows), len(self.actors.rollout)
        chunks = [range(lo, min(lo + e.batch_size, P)) for lo in range(0, P, e.batch_size)]
        todo = {length: [c for c in chunks if not self._complete(length, c)] for length in e.lengths}
        seconds = dict.fromkeys(e.lengths, 0.0)
        done = len(e.lengths) * P - sum(len(c) for cs in todo.values() for c in cs)
        with tqdm(total=len(e.lengths) * P, initial=done, desc="eval", unit="prompt", dynamic_ncols=True) as bar:
            for length, cs in todo.items():
                for lo in range(0, len(cs), workers):
                    t0 = time.perf_counter()
                    self._run_chunks(length, cs[lo:lo + workers])
                    seconds[length] += time.perf_counter() - t0
                    bar.update(sum(len(c) for c in cs[lo:lo + workers]))
        self.store.sort()
        summary = self.summarize(seconds)
        _write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        _write_text(self.out_dir / "results.md", results_table(summary))
        return summary

    def _complete(self, length: int, chunk: range) -> bool:
        return all((length, i, s) in self.store.records for i in chunk for s in range(self.cfg.eval.n))

    def _run_chunks(self, length: int, chunks: list[range]) -> None:
        """One chunk per rollout worker, each with its own seed; the whole group scored at once; each
        chunk's missing lines appended. A chunk is always generated whole, so that its seed draws the
        same samples as in an uninterrupted run."""
        from rl.batch import RolloutBatch

        n, override = self.cfg.eval.n, sampler_override(self.cfg, length)
        parts = self.actors.call("rollout", lambda i, w: w.generate.remote(
            [self.rows[j] for j in chunks[i]], n, chunk_seed(self.cfg.seed, length, chunks[i][0]), None, override)
            if i < len(chunks) else None)
        batch = RolloutBatch.concat([parts[i] for i in sorted(parts)], self.actors.pad_id)
        scores, _ = self.actors.score(batch)
        tokens = batch.answer_mask.sum(-1).long().tolist()  # up to and including the first end token
        row = 0
        for chunk in chunks:
            new = []
            for i in chunk:
                for s in range(n):
                    if (length, i, s) not in self.store.records:
                        new.append(self._record(length, i, s, batch.completions[row], scores, row, tokens[row]))
                    row += 1
            self.store.append(new)
            self.generated[length] += len(chunk) * n

    def _record(self, length: int, i: int, s: int, completion: str, scores, row: int, tokens: int) -> dict:
        # the reward that decided correctness (rewards.worker.accuracy_of: the first that applies)
        key = next((k for k in self.accuracy_keys if k in scores.components
                    and not math.isnan(scores.components[k][row])), None)
        correct = scores.accuracy[row]
        return {"length": length, "prompt_index": i, "sample": s, "prompt": self.rows[i]["prompt"],
                "answer": self.rows[i].get("answer"), "completion": completion,
                "extracted": extracted(scores, self.accuracy_keys, row, completion),
                "score": None if key is None else scores.components[key][row], "reward": scores.total[row],
                "correct": None if math.isnan(correct) else bool(correct), "tokens": tokens}

    def summarize(self, seconds: dict) -> dict:
        e, P = self.cfg.eval, len(self.rows)
        first = self.samplers[str(e.lengths[0])]
        sampler = {**{k: v for k, v in first.items() if k not in ("gen_length", "steps")}, "sampler": e.sampler,
                   "steps": "length/2" if e.steps is None else e.steps}
        out = {"model": self.model_path,
               "task": self.cfg.task.val_file or OmegaConf.to_container(self.cfg.task.val),
               "sampler": sampler, "n": e.n, "k": list(e.k), "seed": self.cfg.seed, "lengths": {}}
        for length in e.lengths:
            records = [self.store.records[(length, i, s)] for i in range(P) for s in range(e.n)]
            known = [r for r in records if r["correct"] is not None]  # a reward timeout leaves correctness unknown
            hits = [[r["correct"] for r in records[i * e.n:(i + 1) * e.n] if r["correct"] is not None]
                    for i in range(P)]
            entry = {"accuracy": sum(r["correct"] for r in known) / max(len(known), 1)}
            for k in e.k:
                scored = [h for h in hits if len(h) >= k]
                entry[f"pass@{k}"] = sum(unbiased_pass_at_k(len(h), sum(h), k) for h in scored) / max(len(scored), 1)
            entry.update({"prompts": P, "samples": len(records), "unscored": len(records) - len(known),
                          "steps": self.samplers[str(length)]["steps"],
                          "mean_tokens": sum(r["tokens"] for r in records) / max(len(records), 1),
                          "seconds": round(seconds[length], 2)})
            out["lengths"][str(length)] = entry
        return out

    def close(self) -> None:
        self.actors.close()


def extracted(scores, accuracy_keys: list[str], row: int, completion: str):
    """What the accuracy reward says it extracted (a verl-style extra named `extracted` or `pred`),
    else rewards.math_reward's extraction (answer tag, then \\boxed, then the last number)."""
    from rewards.math_reward import extract_answer

    for name in (f"{k}/{x}" for k in accuracy_keys for x in ("extracted", "pred")):
        value = scores.extras.get(name, [None] * len(scores))[row]
        if value is not None:
            return value
    return extract_answer(completion)


def results_table(summary: dict) -> str:
    ks = [f"pass@{k}" for k in summary["k"]]
    head = ["length", "accuracy", *ks, "prompts", "mean tokens"]
    lines = [f"# {summary['model']}", "", f"task: {summary['task']}; sampler: {summary['sampler']}; "
             f"n = {summary['n']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for length, r in summary["lengths"].items():
        cells = [length, f"{r['accuracy']:.4f}", *(f"{r[k]:.4f}" for k in ks), str(r["prompts"]),
                 f"{r['mean_tokens']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _console_warnings_only() -> None:
    """Hydra's job logging: the log file keeps every record, the console only warnings (the bar is enough)."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from rl.tracking import quiet_libraries

    _console_warnings_only()
    quiet_libraries(str(cfg.trainer.device))  # before Ray starts: local workers inherit the environment
    try:
        evaluator = Evaluator(cfg, cfg.eval.output_dir or HydraConfig.get().runtime.output_dir)
    except ConfigError as e:
        log.error("%s", e)
        sys.exit(2)
    try:
        summary = evaluator.run()
    finally:
        evaluator.close()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
