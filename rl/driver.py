"""The single controller: owns the loop, the data cursor and the actors.

One step: prompts -> G answers per prompt over the rollout workers -> rewards over the reward
workers -> group advantages -> mu inner updates on the learner ranks -> new weights to every rollout
worker. `Driver.train_step` is that sentence in code. With trainer.rollout_ahead=1 the next step's
rollouts and rewards run during this step's update, on the weights from before it (one update stale).

Faults are handled per phase, in rl/actors.py: a rollout or reward worker that dies is restarted and
only its own call is sent again (generate, score and load_weights give the same answer twice); a reward
call past reward.timeout_s is killed; the learner update is never sent twice.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
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
from rl.metrics import accuracies, batch_metrics, staleness, timer
from rl.models import vision_input_size
from rl.tracking import Tracker

log = logging.getLogger("dllm_rl")


class Driver:
    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        validate(cfg)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model_path = model_path(cfg)
        self.G = cfg.algorithm.group_size
        self.accuracy_keys = ([cfg.reward.accuracy] if isinstance(cfg.reward.accuracy, str)
                              else list(cfg.reward.accuracy))
        # The rows validate() read (rl.data.loader keeps them), not a second reading of the files.
        train_rows = load_split(cfg.task, "train", cfg.seed, model_dir=self.model_path)
        self.val_rows = load_split(cfg.task, "val", cfg.seed, model_dir=self.model_path)
        self.image_tokenizer = None
        # (A LLaDA-V model's rows come with their pixels; a unified-token model's get image codes here.)
        if vision_input_size(self.model_path) is None and (has_images(train_rows) or has_images(self.val_rows)):
            from rl.models.vq import load_image_tokenizer
            self.image_tokenizer = load_image_tokenizer(image_tokenizer_path(cfg))
            attach_image_codes(train_rows, self.image_tokenizer, "task.train")
            attach_image_codes(self.val_rows, self.image_tokenizer, "task.val")
        self.cursor = PromptCursor(train_rows, cfg.seed)
        self._reference: dict | None = None  # scores of the ground-truth images of the held-out t2i rows
        self.step = 0
        # trainer.rollout_ahead=1: the next step's (batch, scores, timeouts, timing), generated during this
        # step's update; the update runs on a thread that waits for the learners meanwhile.
        self._ahead: tuple | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="learner-update")
        self._skip_streak = 0  # training steps in a row whose optimizer steps were all skipped
        self.ckpt = CheckpointManager(self.run_dir, keep_last=cfg.trainer.keep_last)
        # Before any actor starts: a damaged checkpoint named by trainer.resume is one message, not a crash later.
        resume_from = resolve_resume(cfg.trainer.resume, self.run_dir)
        self.actors = Actors(cfg, self.model_path, self.accuracy_keys)
        state = self._load(resume_from) if resume_from else {}
        self.tracker = Tracker(self.run_dir, list(cfg.trainer.logger), cfg.trainer.project,
                               cfg.trainer.experiment_name or cfg.algorithm.name,
                               OmegaConf.to_container(cfg, resolve=True),
                               cfg.trainer.total_steps, wandb_mode=cfg.logger.wandb_mode,
                               resume_id=state.get("wandb_id"))
        if resume_from:
            self.tracker.truncate_after(self.step)

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> None:
        tr = self.cfg.trainer
        if self.step == 0 and tr.val_before_train:
            self.tracker.log(0, self.evaluate())
        while self.step < tr.total_steps:
            self.step += 1
            metrics = self.train_step(self.cursor.next(tr.prompts_per_step) if self._ahead is None else None)
            if tr.val_every and (self.step % tr.val_every == 0 or self.step == tr.total_steps):
                metrics.update(self.evaluate())
            self.tracker.log(self.step, metrics)
            if self._save_step(self.step):
                self.save()

    def _save_step(self, step: int) -> bool:
        tr = self.cfg.trainer
        return bool(tr.save_every) and (step % tr.save_every == 0 or step == tr.total_steps)

    def _rollout(self, rows: list[dict], step: int) -> tuple[RolloutBatch, Scores, int, dict]:
        """Step `step`'s answers to `rows` with the rollout workers' weights of now, and their rewards."""
        timing = {}
        with timer(timing, "gen"):
            batch = self.generate(rows, self.G, seed=self._seed("rollout", step))
        with timer(timing, "reward"):
            scores, timeouts = self.score(batch)
        return batch, scores, timeouts, timing

    def train_step(self, rows: list[dict] | None) -> dict:
        """One step on `rows`, or, with trainer.rollout_ahead=1, on the batch the previous step generated
        while the learner updated (rows=None). At rollout_ahead=1 this step likewise generates and scores
        the next step's batch while the learner updates on this one, with the weights from before this
        update: that batch is one update stale (rollout/staleness). Not past a checkpoint: a checkpointed
        step's next batch is generated after the save, from the saved weights, so a resumed run
        regenerates it exactly as the uninterrupted run did."""
        t0 = time.perf_counter()
        tr = self.cfg.trainer
        if self._ahead is None:
            batch, scores, timeouts, timing = self._rollout(rows, self.step)
            timing["wait_rollout"] = timing["gen"] + timing["reward"]
        else:
            (batch, scores, timeouts, timing), self._ahead = self._ahead, None
            timing["wait_rollout"] = 0.0
        with timer(timing, "adv"):
            batch.rewards = torch.tensor(scores.total, dtype=torch.float32)
            a = self.cfg.algorithm
            batch.advantages = group_advantages(batch.rewards, self.G, a.scale_adv_by_std, baseline=a.adv_baseline)
        start = time.perf_counter()
        # Set before the update starts: a rollout worker restarted from here on with no live peer takes
        # the learner's weights, which are this update's once it is done.
        self.actors.learner_version = self.step
        update = self._pool.submit(self._update_until_done, batch)
        ahead = tr.rollout_ahead and self.step < tr.total_steps and not self._save_step(self.step)
        if ahead:
            self._ahead = self._rollout(self.cursor.next(tr.prompts_per_step), self.step + 1)
        ahead_done = time.perf_counter()
        if ahead:
            timing["rollout_ahead"] = ahead_done - start
        actor, update_done = update.result()
        timing["update_actor"] = update_done - start
        if ahead:
            timing["wait_rollout"] += max(0.0, ahead_done - update_done)  # the learner idles for the rollout
        with timer(timing, "update_weights"):
            sync = self.sync_weights()
        timing["step"] = time.perf_counter() - t0
        metrics = {**{f"timing_s/{k}": v for k, v in timing.items()},
                   **batch_metrics(batch, scores, self.cfg.rollout.gen_length, timing["step"]),
                   **staleness(batch, self.step), **sync,
                   "reward/timeouts": timeouts, **{f"actor/{k}": v for k, v in actor.items()}}
        self._warn_no_learning(metrics)
        return metrics

    def _update_until_done(self, batch: RolloutBatch) -> tuple[dict, float]:
        return self.update(batch), time.perf_counter()

    def _warn_no_learning(self, metrics: dict) -> None:
        """Say so when a step could not change the policy: silent non-learning looks like a finished run."""
        if metrics["reward/frac_zero_std"] == 1.0:
            log.warning("step %d: every group's rewards are equal, so every advantage is 0 and this step has no "
                        "gradient (too easy or too hard prompts, or a reward that does not vary)", self.step)
        skipped_all = metrics["actor/skipped_steps"] >= self.cfg.algorithm.mu
        self._skip_streak = self._skip_streak + 1 if skipped_all else 0
        n = self.cfg.trainer.skip_warn_steps
        if self._skip_streak == n:  # once per streak
            log.warning("steps %d-%d: %d training steps in a row skipped every optimizer step (non-finite gradient "
                        "norm), so the policy is not training; check the reward scale (reward/mean, reward/std) "
                        "and trainer.optim.lr", self.step - n + 1, self.step, n)

    def evaluate(self) -> dict:
        """Held-out metrics: accuracy overall and per task (where a correctness reward applies) and, per
        task, the mean of every reward component on its image answers, next to the same score of the
        ground-truth images (`_reference`). Image answers are also saved as a PNG grid."""
        rows, n = self.val_rows, self.cfg.rollout.val_n
        # n answers per prompt: at a sampling temperature one answer each leaves a few points of noise.
        batch = self.generate(rows, n, seed=self.cfg.seed, temperature=self.cfg.rollout.val_temperature)
        scores, timeouts = self.score(batch)
        out = {"val/reward/mean": float(sum(scores.total) / len(scores.total)), "val/reward/timeouts": timeouts,
               **accuracies(batch.rows, scores.accuracy, "val")}
        images = batch.images
        has_images = any(x is not None for x in images)
        if has_images and self._reference is None:
            truth = [r.get("image_codes") if x is not None else None for r, x in zip(batch.rows, images)]
            reference, timeouts = self.score(batch, truth)
            if not timeouts:  # kept for the whole run: never from a call that ran out of time
                self._reference = reference.components
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
        n = len(self.actors.rollout)
        chunks = [rows[i::n] for i in range(n)]  # strided, so every worker gets a share of small sets
        parts = self.actors.call("rollout", lambda i, w: w.generate.remote(chunks[i], group_size, seed + i, temperature)
                                 if chunks[i] else None)
        return RolloutBatch.concat([parts[i] for i in sorted(parts)], self.actors.pad_id)

    def score(self, batch: RolloutBatch, images: list | None = None) -> tuple[Scores, int]:
        return self.actors.score(batch, images)

    def update(self, batch: RolloutBatch) -> dict:
        """mu inner updates on every learner rank. Never retried: an update that ran must not run twice."""
        seed = self._seed("learner", self.step)
        refs = [learner.update.remote(batch, seed) for learner in self.actors.learners]
        return self.actors.on_learners(refs)[0]  # averaged

    def sync_weights(self) -> dict:
        return self.actors.sync_weights(self.step)

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self) -> None:
        def save_actor(path: Path) -> None:
            ray.get([learner.save.remote(str(path / "actor")) for learner in self.actors.learners])

        state = {"step": self.step, "cursor": self.cursor.state(), "wandb_id": self.tracker.wandb_id}
        self.ckpt.save(self.step, save_actor, state)

    def _load(self, path: Path) -> dict:
        state = self.ckpt.load(path)
        ray.get([learner.load.remote(str(path / "actor")) for learner in self.actors.learners])
        self.step = state["step"]
        self.cursor = PromptCursor(self.cursor.rows, self.cfg.seed, **state["cursor"])
        self.sync_weights()
        log.info("resumed from %s at step %d", path, self.step)
        return state

    def _seed(self, purpose: str, step: int) -> int:
        return (self.cfg.seed * 1_000_003 + step * 7919 + {"rollout": 0, "learner": 1}[purpose]) % 2**31

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.tracker.close()
        self.actors.close()
