"""The single controller: owns the loop, the data cursor and the actors.

One step: prompts -> G answers per prompt over the rollout workers -> rewards over the reward
workers -> group advantages -> mu inner updates on the learner ranks -> new weights to every rollout
worker. `Driver.train_step` is that sentence in code.
"""
from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import ray
import torch
from omegaconf import DictConfig, OmegaConf
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rl.advantages import group_advantages
from rl.batch import RolloutBatch
from rl.checkpoint import CheckpointManager, resolve_resume
from rl.config import image_tokenizer_path, model_path, validate
from rl.data.loader import PromptCursor, attach_image_codes, has_images, load_split
from rl.learner import Learner
from rl.tracking import Tracker
from rewards.worker import RewardWorker, Scores
from rollout.worker import RolloutWorker

log = logging.getLogger("dllm_rl")

ACTOR_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@ray.remote(num_cpus=0)
def _node_address() -> tuple[str, int]:
    """Where learner rank 0 will listen: its node's address and a free port there."""
    return ray.util.get_node_ip_address(), _free_port()


class ActorFailure(RuntimeError):
    pass


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
        self.weights = None  # ObjectRef of the newest policy weights, for (re)started rollout workers
        self._start_ray()
        self._place_actors()
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
            self.tracker.log(0, self._with_retries(self.validate))
        while self.step < tr.total_steps:
            self.step += 1
            rows = self.cursor.next(tr.prompts_per_step)  # outside the retry: a retried step keeps its prompts
            metrics = self._with_retries(lambda: self.train_step(rows))
            if tr.val_every and (self.step % tr.val_every == 0 or self.step == tr.total_steps):
                metrics.update(self._with_retries(self.validate))
            self.tracker.log(self.step, metrics)
            if tr.save_every and (self.step % tr.save_every == 0 or self.step == tr.total_steps):
                self.save()

    def train_step(self, rows: list[dict]) -> dict:
        t0 = time.perf_counter()
        timing = {}
        with _timer(timing, "gen"):
            batch, gen_seconds = self.generate(rows, self.G, seed=self._seed("rollout"))
        with _timer(timing, "reward"):
            scores = self.score(batch)
        with _timer(timing, "adv"):
            batch.rewards = torch.tensor(scores.total, dtype=torch.float32)
            batch.advantages = group_advantages(batch.rewards, self.G, self.cfg.algorithm.scale_adv_by_std)
        with _timer(timing, "update_actor"):
            actor = self.update(batch)
        with _timer(timing, "update_weights"):
            self.sync_weights()
        timing["step"] = time.perf_counter() - t0
        return {**{f"timing_s/{k}": v for k, v in timing.items()},
                **batch_metrics(batch, scores, self.cfg.rollout.gen_length, gen_seconds, timing["step"]),
                **{f"actor/{k}": v for k, v in actor.items()}}

    def validate(self) -> dict:
        """Held-out metrics: accuracy overall and per task (where a correctness reward applies) and, per
        task, the mean of every reward component on its image answers, next to the same score of the
        ground-truth images (`_reference`). Image answers are also saved as a PNG grid."""
        rows, n = self.val_rows, self.cfg.rollout.val_n
        # n answers per prompt: at a sampling temperature one answer each leaves a few points of noise.
        batch, _ = self.generate(rows, n, seed=self.cfg.seed, temperature=self.cfg.rollout.val_temperature)
        scores = self.score(batch)
        out = {"val/reward/mean": float(sum(scores.total) / len(scores.total)),
               **accuracies(batch.extras["rows"], scores.accuracy, "val")}
        images = batch.extras["images"]
        has_images = any(x is not None for x in images)
        if has_images and self._reference is None:
            truth = [r.get("image_codes") if x is not None else None for r, x in zip(batch.extras["rows"], images)]
            self._reference = self.score(batch, truth).components
        for task in sorted({r["task"] for r in rows}):
            idx = [i for i, r in enumerate(batch.extras["rows"]) if r["task"] == task]
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
                 for r, codes in zip(batch.extras["rows"][::n], batch.extras["images"][::n]) if codes is not None][:16]
        generated = self.image_tokenizer.decode([p[1] for p in pairs]).numpy()
        truth = self.image_tokenizer.decode([p[2] for p in pairs]).numpy() if all(p[2] for p in pairs) else None
        path = self.run_dir / "samples" / f"step_{self.step:06d}.png"
        save_image_grid(path, generated, [p[0] for p in pairs], truth)
        log.info("step %d: image samples in %s", self.step, path)

    # ---- one phase each ------------------------------------------------------------------------
    def generate(self, rows, group_size, seed, temperature=None) -> tuple[RolloutBatch, float]:
        n = len(self.rollout)
        chunks = [rows[i::n] for i in range(n)]  # strided, so every worker gets a share of small sets
        futures = [w.generate.remote(c, group_size, seed + i, temperature)
                   for i, (w, c) in enumerate(zip(self.rollout, chunks)) if c]
        parts = self._get(futures, [f"rollout-{i}" for i in range(n)])
        pad = self._pad_id
        batch = RolloutBatch(
            prompt_ids=RolloutBatch.left_pad([p["prompt_ids"] for p in parts], pad),
            prompt_mask=RolloutBatch.left_pad([p["prompt_mask"] for p in parts], 0),
            answer_ids=torch.cat([p["answer_ids"] for p in parts]),
            answer_mask=torch.cat([p["answer_mask"] for p in parts]),
            group_size=group_size,
            extras={"rows": [r for p in parts for r in p["rows"]],
                    "completions": [c for p in parts for c in p["completions"]],
                    "images": [x for p in parts for x in p["images"]],
                    "commit_step": torch.cat([p["commit_step"] for p in parts]),
                    "tokens_per_step": torch.cat([p["tokens_per_step"] for p in parts])},
        )
        return batch, max(p["seconds"] for p in parts)

    def score(self, batch: RolloutBatch, images: list | None = None) -> Scores:
        """Rewards of the batch's answers (`images`: other image codes to score in place of the batch's)."""
        rows, completions = batch.extras["rows"], batch.extras["completions"]
        images = batch.extras["images"] if images is None else images
        m = len(self.reward)
        bounds = [len(rows) * i // m for i in range(m + 1)]
        futures = [w.score.remote([r["prompt"] for r in rows[lo:hi]], completions[lo:hi], rows[lo:hi], images[lo:hi])
                   for w, lo, hi in zip(self.reward, bounds, bounds[1:]) if hi > lo]
        return Scores.concat(self._get(futures, [f"reward-{i}" for i in range(m)]))

    def update(self, batch: RolloutBatch) -> dict:
        futures = [l.update.remote(batch, self._seed("learner")) for l in self.learners]
        return ray.get(futures)[0]  # already averaged across ranks

    def sync_weights(self) -> None:
        refs = [l.state_dict_for_rollout.remote() for l in self.learners]  # every ZeRO-3 rank must gather
        self.weights = refs[0]
        ray.get(refs)
        self._get([w.load_weights.remote(self.weights) for w in self.rollout],
                  [f"rollout-{i}" for i in range(len(self.rollout))])

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self) -> None:
        def save_actor(path: Path) -> None:
            ray.get([l.save.remote(str(path / "actor")) for l in self.learners])

        state = {"step": self.step, "cursor": self.cursor.state(), "wandb_id": self.tracker.wandb_id}
        self.ckpt.save(self.step, save_actor, state)

    def _load(self, path: Path) -> dict:
        state = self.ckpt.load(path)
        ray.get([l.load.remote(str(path / "actor")) for l in self.learners])
        self.step = state["step"]
        self.cursor = PromptCursor(self.cursor.rows, self.cfg.seed, **state["cursor"])
        self.sync_weights()
        log.info("resumed from %s at step %d", path, self.step)
        return state

    # ---- actors ------------------------------------------------------------------------------
    def _start_ray(self) -> None:
        rc = self.cfg.ray
        if ray.is_initialized():
            return
        if rc.address is not None:
            extra = {"_node_ip_address": rc.node_ip_address} if rc.node_ip_address else {}
            ray.init(address=rc.address, log_to_driver=True, **extra)
        else:
            ray.init(_node_ip_address="127.0.0.1", num_cpus=rc.num_cpus, include_dashboard=rc.dashboard,
                     dashboard_host="127.0.0.1", log_to_driver=True)

    def _place_actors(self) -> None:
        cfg = self.cfg
        n, m, k = cfg.rollout.num_workers, cfg.reward.num_workers, cfg.trainer.num_learners
        gpu = 1 if cfg.trainer.device == "cuda" else 0
        bundles = [{"CPU": 1, "GPU": gpu}] * n + [{"CPU": 1}] * m + [{"CPU": 1, "GPU": gpu}] * k
        bundles = [{r: v for r, v in b.items() if v} for b in bundles]
        self.pg = placement_group(bundles, strategy=cfg.ray.placement_strategy)
        try:
            ray.get(self.pg.ready(), timeout=cfg.ray.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            need = {r: sum(b.get(r, 0) for b in bundles) for r in ("CPU", "GPU")}
            have = ray.cluster_resources()
            remove_placement_group(self.pg)
            raise RuntimeError(
                f"could not place {n} rollout + {m} reward + {k} learner actors within "
                f"{cfg.ray.placement_timeout_s}s: they need {need}, the cluster has "
                f"{ {r: have.get(r, 0) for r in need} } (lower rollout.num_workers / reward.num_workers / "
                f"trainer.num_learners, or add nodes)") from None
        nodes = ray.util.placement_group_table(self.pg)["bundles_to_node_id"]
        names = [f"rollout-{i}" for i in range(n)] + [f"reward-{i}" for i in range(m)] + [f"learner-{i}" for i in range(k)]
        log.info("placement: %s", ", ".join(f"{name}@{nodes[i][:8]}" for i, name in enumerate(names)))
        self.rollout = [self._make_rollout(i) for i in range(n)]
        self.reward = [self._make_reward(i) for i in range(m)]
        addr, port = ray.get(_node_address.options(scheduling_strategy=self._bundle(n + m)).remote())
        algo = OmegaConf.to_container(cfg.algorithm)
        algorithm = {"name": algo["name"], "mu": algo["mu"], **algo["hyper"]}
        optim = OmegaConf.to_container(cfg.trainer.optim)
        lora = OmegaConf.to_container(cfg.model.lora) if cfg.model.lora else None
        self.learners = [
            ray.remote(Learner).options(name=f"learner-{r}", num_cpus=1, num_gpus=gpu,
                                        scheduling_strategy=self._bundle(n + m + r), runtime_env=self._env()).remote(
                self.model_path, algorithm, optim, cfg.trainer.zero_stage, r, k, addr, port, lora, cfg.seed,
                cfg.trainer.device)
            for r in range(k)
        ]
        self._pad_id = ray.get(self.rollout[0].pad_id.remote())

    def _bundle(self, index: int):
        return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=index)

    def _env(self) -> dict:
        threads = str(self.cfg.ray.threads_per_actor)
        return {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}}

    def _make_rollout(self, i: int):
        r = self.cfg.rollout
        sampler = OmegaConf.to_container(r)  # the worker picks the sampler's keys (rollout.rollout.sampler_config)
        gpu = 1 if self.cfg.trainer.device == "cuda" else 0
        actor = ray.remote(RolloutWorker).options(
            name=f"rollout-{i}", num_cpus=1, num_gpus=gpu, scheduling_strategy=self._bundle(i),
            runtime_env=self._env()).remote(self.model_path, sampler, self.cfg.ray.threads_per_actor,
                                            self.cfg.trainer.device, r.micro_batch)
        if self.weights is not None:
            ray.get(actor.load_weights.remote(self.weights))
        return actor

    def _make_reward(self, i: int):
        functions = OmegaConf.to_container(self.cfg.reward.functions, resolve=True)
        return ray.remote(RewardWorker).options(
            name=f"reward-{i}", num_cpus=1, scheduling_strategy=self._bundle(self.cfg.rollout.num_workers + i),
            runtime_env=self._env()).remote(functions, self.accuracy_keys, image_tokenizer_path(self.cfg))

    # ---- faults ------------------------------------------------------------------------------
    def _get(self, futures, names):
        """ray.get that names the actor that died (ActorFailure carries its name)."""
        try:
            return ray.get(futures)
        except ACTOR_ERRORS as e:
            for i, f in enumerate(futures):
                try:
                    ray.get(f, timeout=0)
                except ACTOR_ERRORS:
                    raise ActorFailure(names[i]) from e
                except Exception:
                    pass
            raise ActorFailure(names[0]) from e

    def _with_retries(self, fn):
        tr = self.cfg.trainer
        for attempt in range(tr.max_retries + 1):
            try:
                return fn()
            except ActorFailure as e:
                name = str(e)
                log.error("step %d: actor %s died (%s)", self.step, name, e.__cause__)
                if tr.on_actor_failure == "fail" or attempt == tr.max_retries:
                    raise RuntimeError(f"step {self.step}: actor {name} died; stopping "
                                       f"(trainer.on_actor_failure={tr.on_actor_failure})") from e
                self._restart(name)
                log.warning("step %d: restarted %s, retrying the step (attempt %d)", self.step, name, attempt + 2)
        raise AssertionError("unreachable")

    def _restart(self, name: str) -> None:
        kind, idx = name.rsplit("-", 1)
        idx = int(idx)
        pool = {"rollout": self.rollout, "reward": self.reward}[kind]
        ray.kill(pool[idx], no_restart=True)
        pool[idx] = self._make_rollout(idx) if kind == "rollout" else self._make_reward(idx)

    def _seed(self, purpose: str) -> int:
        return (self.cfg.seed * 1_000_003 + self.step * 7919 + {"rollout": 0, "learner": 1}[purpose]) % 2**31

    def close(self) -> None:
        self.tracker.close()
        for a in [*self.rollout, *self.reward, *self.learners]:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)
        # Names are released asynchronously; a driver started next in the same Ray must find them free.
        names = [f"{kind}-{i}" for kind, pool in (("rollout", self.rollout), ("reward", self.reward),
                                                   ("learner", self.learners)) for i in range(len(pool))]
        deadline = time.monotonic() + 30
        while names and time.monotonic() < deadline:
            names = [n for n in names if _actor_alive(n)]
            if names:
                time.sleep(0.1)


def accuracies(rows: list[dict], accuracy: list[float], prefix: str) -> dict:
    """`prefix`/accuracy over all rows and `prefix`/<task>/accuracy per task, each over the rows a
    correctness reward applies to (accuracy not NaN); a key with no such row is left out."""
    acc = torch.tensor(accuracy)
    groups = {"": list(range(len(accuracy)))}
    for i, r in enumerate(rows):
        if r.get("task") is not None:
            groups.setdefault(f"{r['task']}/", []).append(i)
    return {f"{prefix}/{name}accuracy": acc[idx].nanmean().item()
            for name, idx in sorted(groups.items()) if (~acc[idx].isnan()).any()}


def batch_metrics(batch, scores, gen_length: int, gen_seconds: float, step_seconds: float) -> dict:
    """Per-step rollout metrics (verl's names where they exist). Length metrics cover text answers."""
    text = torch.tensor([x is None for x in batch.extras["images"]])
    lengths = batch.answer_mask.sum(-1)[text] if text.any() else batch.answer_mask.sum(-1)
    # A text answer is clipped when its last position (gen_length; image answers may be longer) is
    # still inside the answer mask: no end token came before it.
    clipped = batch.answer_mask[:, min(gen_length, batch.answer_mask.shape[1]) - 1] > 0
    gen_tokens = batch.answer_ids.numel()
    out = {
        "reward/mean": float(batch.rewards.mean()),
        "reward/std": float(batch.rewards.std()),
        "response_length/mean": float(lengths.float().mean()),
        "response_length/max": float(lengths.max()),
        "response_length/clip_ratio": float(clipped[text].float().mean()) if text.any() else 0.0,
        "perf/rollout_tokens_per_s": gen_tokens / max(gen_seconds, 1e-9),
        "rollout/tokens_per_step": float(batch.extras["tokens_per_step"].mean()),
        "perf/throughput": (batch.attention_mask.sum().item()) / max(step_seconds, 1e-9),
    }
    out.update(accuracies(batch.extras.get("rows", []), scores.accuracy, "train"))
    for key, values in scores.components.items():
        vals = [v for v in values if v == v]  # NaN = not applicable to that row
        if vals:
            out[f"reward/{key}/mean"] = sum(vals) / len(vals)
    return out


def _actor_alive(name: str) -> bool:
    try:
        ray.get_actor(name)
        return True
    except ValueError:
        return False


class _timer:
    def __init__(self, out: dict, key: str):
        self.out, self.key = out, key

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.out[self.key] = time.perf_counter() - self.t0
