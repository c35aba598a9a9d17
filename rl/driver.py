"""The single controller: owns the loop, the data cursor and the actors.

One step: prompts -> G answers per prompt over the rollout workers -> rewards over the reward
workers -> group advantages -> mu inner updates on the learner ranks -> new weights to every rollout
worker. `Driver.train_step` is that sentence in code.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import ray
import torch
from omegaconf import DictConfig, OmegaConf

from rewards.worker import Scores
from rl.actors import Actors
from rl.advantages import group_advantages
from rl.batch import RolloutBatch
from rl.checkpoint import CheckpointManager, resolve_resume
from rl.config import image_tokenizer_path, model_path, validate
from rl.data.loader import PromptCursor, attach_image_codes, has_images, load_split
from rl.metrics import accuracies, batch_metrics, timer
from rl.tracking import Tracker

log = logging.getLogger("dllm_rl")


class Driver:
    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        validate(cfg)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model_path = model_path(cfg)
        self.G = cfg.algorithm.group_size
        self.accuracy_keys = [cfg.reward.accuracy] if isinstance(cfg.reward.accuracy, str) else list(cfg.reward.accuracy)
        train_rows, self.val_rows = load_split(cfg.task, "train", cfg.seed), load_split(cfg.task, "val", cfg.seed)
        self.image_tokenizer = None
        if has_images(train_rows) or has_images(self.val_rows):
            from rl.models.vq import load_image_tokenizer
            self.image_tokenizer = load_image_tokenizer(image_tokenizer_path(cfg))
            attach_image_codes(train_rows, self.image_tokenizer, "task.train")
            attach_image_codes(self.val_rows, self.image_tokenizer, "task.val")
        self.cursor = PromptCursor(train_rows, cfg.seed)
        self._reference: dict | None = None  # scores of the ground-truth images of the held-out t2i rows
        self.step = 0
        self.actors = Actors(cfg, self.model_path, self.accuracy_keys)
        self.ckpt = CheckpointManager(self.run_dir, keep_last=cfg.trainer.keep_last)
        resume_from = resolve_resume(cfg.trainer.resume, self.run_dir)
        state = self._load(resume_from) if resume_from else {}
        self.tracker = Tracker(self.run_dir, list(cfg.trainer.logger), cfg.trainer.project,
                               cfg.trainer.experiment_name or cfg.algorithm.name, OmegaConf.to_container(cfg, resolve=True),
                               cfg.trainer.total_steps, wandb_mode=cfg.logger.wandb_mode,
                               resume_id=state.get("wandb_id"))
        if resume_from:
            self.tracker.truncate_after(self.step)

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> None:
        tr = self.cfg.trainer
        if self.step == 0 and tr.val_before_train:
            self.tracker.log(0, self.actors.with_retries(self.evaluate, self.step))
        while self.step < tr.total_steps:
            self.step += 1
            rows = self.cursor.next(tr.prompts_per_step)  # outside the retry: a retried step keeps its prompts
            metrics = self.actors.with_retries(lambda: self.train_step(rows), self.step)
            if tr.val_every and (self.step % tr.val_every == 0 or self.step == tr.total_steps):
                metrics.update(self.actors.with_retries(self.evaluate, self.step))
            self.tracker.log(self.step, metrics)
            if tr.save_every and (self.step % tr.save_every == 0 or self.step == tr.total_steps):
                self.save()

    def train_step(self, rows: list[dict]) -> dict:
        t0 = time.perf_counter()
        timing = {}
        with timer(timing, "gen"):
            batch = self.generate(rows, self.G, seed=self._seed("rollout"))
        with timer(timing, "reward"):
            scores = self.score(batch)
        with timer(timing, "adv"):
            batch.rewards = torch.tensor(scores.total, dtype=torch.float32)
            batch.advantages = group_advantages(batch.rewards, self.G, self.cfg.algorithm.scale_adv_by_std)
        with timer(timing, "update_actor"):
            actor = self.update(batch)
        with timer(timing, "update_weights"):
            self.sync_weights()
        timing["step"] = time.perf_counter() - t0
        return {**{f"timing_s/{k}": v for k, v in timing.items()},
                **batch_metrics(batch, scores, self.cfg.rollout.gen_length, timing["step"]),
                **{f"actor/{k}": v for k, v in actor.items()}}

    def evaluate(self) -> dict:
        """Held-out metrics: accuracy overall and per task (where a correctness reward applies) and, per
        task, the mean of every reward component on its image answers, next to the same score of the
        ground-truth images (`_reference`). Image answers are also saved as a PNG grid."""
        rows, n = self.val_rows, self.cfg.rollout.val_n
        # n answers per prompt: at a sampling temperature one answer each leaves a few points of noise.
        batch = self.generate(rows, n, seed=self.cfg.seed, temperature=self.cfg.rollout.val_temperature)
        scores = self.score(batch)
        out = {"val/reward/mean": float(sum(scores.total) / len(scores.total)),
               **accuracies(batch.rows, scores.accuracy, "val")}
        images = batch.images
        has_images = any(x is not None for x in images)
        if has_images and self._reference is None:
            truth = [r.get("image_codes") if x is not None else None for r, x in zip(batch.rows, images)]
            self._reference = self.score(batch, truth).components
        for task in sorted({r["task"] for r in rows}):
            idx = [i for i, r in enumerate(batch.rows) if r["task"] == task]
            if any(images[i] is not None for i in idx):
                for key, values in scores.components.items():
                    vals = torch.tensor([values[i] for i in idx])
                    if (~vals.isnan()).any():
                        out[f"val/{task}/{key}"] = vals.nanmean().item()
                        out[f"val/{task}/{key}_reference"] = torch.tensor(
                            [self._reference[key][i] for i in idx]).nanmean().item()
        if has_images:
            self._save_grid(batch)
        return out

    def _save_grid(self, batch: RolloutBatch) -> None:
        """The first answer of each of the first 16 image prompts (a batch holds group_size answers each)."""
        from rl.tracking import save_image_grid
        n = batch.group_size
        pairs = [(r["prompt"], codes, r.get("image_codes"))
                 for r, codes in zip(batch.rows[::n], batch.images[::n]) if codes is not None][:16]
        generated = self.image_tokenizer.decode([p[1] for p in pairs]).numpy()
        truth = self.image_tokenizer.decode([p[2] for p in pairs]).numpy() if all(p[2] for p in pairs) else None
        path = self.run_dir / "samples" / f"step_{self.step:06d}.png"
        save_image_grid(path, generated, [p[0] for p in pairs], truth)
        log.info("step %d: image samples in %s", self.step, path)

    # ---- one phase each ------------------------------------------------------------------------
    def generate(self, rows, group_size, seed, temperature=None) -> RolloutBatch:
        pool = self.actors.rollout
        chunks = [rows[i::len(pool)] for i in range(len(pool))]  # strided, so every worker gets a share of small sets
        futures = [w.generate.remote(c, group_size, seed + i, temperature) for i, (w, c) in enumerate(zip(pool, chunks)) if c]
        return RolloutBatch.concat(self.actors.get(futures, [f"rollout-{i}" for i in range(len(pool))]), self.actors.pad_id)

    def score(self, batch: RolloutBatch, images: list | None = None) -> Scores:
        """Rewards of the batch's answers (`images`: other image codes to score in place of the batch's)."""
        rows, completions = batch.rows, batch.completions
        images = batch.images if images is None else images
        m = len(self.actors.reward)
        bounds = [len(rows) * i // m for i in range(m + 1)]
        futures = [w.score.remote([r["prompt"] for r in rows[lo:hi]], completions[lo:hi], rows[lo:hi], images[lo:hi])
                   for w, lo, hi in zip(self.actors.reward, bounds, bounds[1:]) if hi > lo]
        return Scores.concat(self.actors.get(futures, [f"reward-{i}" for i in range(m)]))

    def update(self, batch: RolloutBatch) -> dict:
        futures = [l.update.remote(batch, self._seed("learner")) for l in self.actors.learners]
        return ray.get(futures)[0]  # already averaged across ranks

    def sync_weights(self) -> None:
        refs = [l.state_dict_for_rollout.remote() for l in self.actors.learners]  # every ZeRO-3 rank must gather
        self.actors.weights = refs[0]
        ray.get(refs)
        pool = self.actors.rollout
        self.actors.get([w.load_weights.remote(refs[0]) for w in pool], [f"rollout-{i}" for i in range(len(pool))])

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self) -> None:
        def save_actor(path: Path) -> None:
            ray.get([l.save.remote(str(path / "actor")) for l in self.actors.learners])

        state = {"step": self.step, "cursor": self.cursor.state(), "wandb_id": self.tracker.wandb_id}
        self.ckpt.save(self.step, save_actor, state)

    def _load(self, path: Path) -> dict:
        state = self.ckpt.load(path)
        ray.get([l.load.remote(str(path / "actor")) for l in self.actors.learners])
        self.step = state["step"]
        self.cursor = PromptCursor(self.cursor.rows, self.cfg.seed, **state["cursor"])
        self.sync_weights()
        log.info("resumed from %s at step %d", path, self.step)
        return state

    def _seed(self, purpose: str) -> int:
        return (self.cfg.seed * 1_000_003 + self.step * 7919 + {"rollout": 0, "learner": 1}[purpose]) % 2**31

    def close(self) -> None:
        self.tracker.close()
        self.actors.close()
