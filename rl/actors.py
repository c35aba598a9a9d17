"""The run's Ray actors: starting Ray, placing the rollout, reward and learner actors, calls that
name the actor that died, restarts and shutdown. The loop that uses them is rl/driver.py."""
from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable
from functools import partial

import ray
from omegaconf import DictConfig, OmegaConf
from ray.experimental import internal_kv
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rewards.worker import RewardWorker, Scores
from rl.batch import RolloutBatch
from rl.config import image_tokenizer_path
from rl.tracking import quiet_runtime_env
from rollout.worker import RolloutWorker

log = logging.getLogger("dllm_rl")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@ray.remote(num_cpus=0)
def _node_address() -> tuple[str, int]:
    """Where learner rank 0 will listen: its node's address and a free port there."""
    return ray.util.get_node_ip_address(), _free_port()


def _rank0_address(local: bool, strategy) -> tuple[str, int]:
    """Where learner rank 0 listens (its process group, the weight group's store): loopback when Ray
    runs on this machine alone (local), else its node's address, which every other node can reach."""
    if local:
        return "127.0.0.1", _free_port()
    return ray.get(_node_address.options(scheduling_strategy=strategy).remote())




def _running_key(actor: str) -> str:
    return f"dllm_rl/{actor}/current"


def _report_running(actor: str, key: str | None) -> None:
    """RewardWorker's on_call: the reward function running now, kept outside the actor (in Ray's
    key-value store, reachable from any node) so the driver can name it after a hang or a crash."""
    if key is None:
        internal_kv._internal_kv_del(_running_key(actor))
    else:
        internal_kv._internal_kv_put(_running_key(actor), key, overwrite=True)


def start_ray(rc: DictConfig, device: str) -> None:
    if ray.is_initialized():
        return
    quiet = quiet_runtime_env(device)  # every actor of the job, on every node, without progress bars
    if rc.address is not None:
        extra = {"_node_ip_address": rc.node_ip_address} if rc.node_ip_address else {}
        ray.init(address=rc.address, log_to_driver=True, runtime_env=quiet, **extra)
    else:
        ray.init(_node_ip_address="127.0.0.1", num_cpus=rc.num_cpus, include_dashboard=rc.dashboard,
                 dashboard_host="127.0.0.1", log_to_driver=True, runtime_env=quiet)


class Actors:
    """N rollout workers, M reward workers and K learner ranks in one placement group.
    learners=False (evaluation, rl/evaluate.py): no learner ranks, K = 0."""

    def __init__(self, cfg: DictConfig, model_path: str, accuracy_keys: list[str], learners: bool = True):
        self.cfg, self.model_path, self.accuracy_keys = cfg, model_path, accuracy_keys
        overrides = cfg.model.get("config_overrides")
        self.config_overrides = OmegaConf.to_container(overrides) if isinstance(overrides, DictConfig) else {}
        # Weight sync (sync_weights): the mode, chosen at the first sync; in object_store mode the ObjectRef
        # of the newest weights and their version, which a restarted rollout worker loads. The driver sets
        # learner_version to the step whose update it has submitted (sync_weights keeps it too).
        self.sync_mode: str | None = None
        self.weights, self.weights_version, self.learner_version = None, 0, 0
        self._group_formations = 0  # names each formation of the collective group (its store prefix)
        self._group_stale = False  # a rollout worker was restarted: the group forms again at the next sync
        self._store_addr: str | None = None  # learner rank 0's node address
        start_ray(cfg.ray, cfg.trainer.device)
        n, m, k = cfg.rollout.num_workers, cfg.reward.num_workers, cfg.trainer.num_learners if learners else 0
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
        names = ([f"rollout-{i}" for i in range(n)] + [f"reward-{i}" for i in range(m)]
                 + [f"learner-{i}" for i in range(k)])
        log.info("placement: %s", ", ".join(f"{name}@{nodes[i][:8]}" for i, name in enumerate(names)))
        self.rollout = [self._make_rollout(i) for i in range(n)]
        self.reward = [self._make_reward(i) for i in range(m)]
        self.learners = []
        try:
            self.learners = self._make_learners(k) if k else []
        except BaseException:
            self.close()  # the workers and the placement group, so that a next run finds their names free
            raise
        self.pad_id = ray.get(self.rollout[0].pad_id.remote())

    def _make_learners(self, k: int, attempts: int = 3) -> list:
        cfg, n, m = self.cfg, self.cfg.rollout.num_workers, self.cfg.reward.num_workers
        gpu = 1 if cfg.trainer.device == "cuda" else 0
        from rl.learner import Learner  # deepspeed: not in the reward workers, which load this module for on_call

        algo = OmegaConf.to_container(cfg.algorithm)
        algorithm = {"name": algo["name"], "mu": algo["mu"], **algo["hyper"]}
        optim = OmegaConf.to_container(cfg.trainer.optim)
        lora = OmegaConf.to_container(cfg.model.lora) if cfg.model.lora else None
        for attempt in range(1, attempts + 1):
            # The port is free when picked but bound only later, by rank 0's process group; anything
            # starting on that node meanwhile (Ray's own workers) may take it first. Then all ranks
            # are started again on another port.
            addr, port = _rank0_address(cfg.ray.address is None, self._bundle(n + m))
            learners = [
                ray.remote(Learner).options(name=f"learner-{r}", num_cpus=1, num_gpus=gpu,
                                            scheduling_strategy=self._bundle(n + m + r),
                                            runtime_env=self._env()).remote(
                    self.model_path, algorithm, optim, cfg.trainer.zero_stage, r, k, addr, port, lora, cfg.seed,
                    cfg.trainer.device, bf16=cfg.model.dtype == "bfloat16",
                    gradient_checkpointing=cfg.model.gradient_checkpointing, offload=cfg.trainer.offload,
                    micro_batch=cfg.trainer.micro_batch, ref_device=cfg.trainer.ref_device,
                    config_overrides=self.config_overrides)
                for r in range(k)
            ]
            try:
                ray.get([learner.__ray_ready__.remote() for learner in learners])
                return learners
            except ray.exceptions.RayActorError as e:
                for learner in learners:
                    ray.kill(learner, no_restart=True)
                if "EADDRINUSE" not in str(e) or attempt == attempts:
                    raise RuntimeError(f"the learner ranks could not start: {e}") from e
                log.warning("learner rank 0's port %s:%d was taken before it could listen; starting the learners "
                            "again on another port", addr, port)
                _wait_gone([f"learner-{r}" for r in range(k)])

    def _bundle(self, index: int):
        return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=index)

    def _env(self) -> dict:
        threads = str(self.cfg.ray.threads_per_actor)
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if self.cfg.trainer.rollout_ahead or self.cfg.rollout.num_workers > 1:
            # Actors that compute at the same time (rollout and learner at rollout_ahead=1, or several
            # rollout workers) may share cores; OpenMP threads that spin while they wait then take those
            # cores from the others (default recipe on 2 cores, 2 threads each, rollout_ahead=1: 13.2 s
            # per step spinning, 9.2 s passive; docs/BENCHMARKS.md).
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        return {"env_vars": env}

    def _make_rollout(self, i: int):
        r = self.cfg.rollout
        sampler = OmegaConf.to_container(r)  # the worker picks the sampler's keys (rollout.rollout.sampler_config)
        gpu = 1 if self.cfg.trainer.device == "cuda" else 0
        actor = ray.remote(RolloutWorker).options(
            name=f"rollout-{i}", num_cpus=1, num_gpus=gpu, scheduling_strategy=self._bundle(i),
            runtime_env=self._env()).remote(self.model_path, sampler, self.cfg.ray.threads_per_actor,
                                            self.cfg.trainer.device, r.micro_batch, self.cfg.model.dtype,
                                            self.config_overrides)
        return actor

    def _make_reward(self, i: int):
        functions = OmegaConf.to_container(self.cfg.reward.functions, resolve=True)
        name = f"reward-{i}"
        # RewardWorker reports the function it runs through on_call, so a hang or a crash can be named.
        return ray.remote(RewardWorker).options(
            name=name, num_cpus=1, scheduling_strategy=self._bundle(self.cfg.rollout.num_workers + i),
            runtime_env=self._env()).remote(functions, self.accuracy_keys, image_tokenizer_path(self.cfg),
                                            on_call=partial(_report_running, name))

    # ---- calls and faults --------------------------------------------------------------------
    def call(self, kind: str, submit: Callable, timeout: float | None = None, on_timeout: str = "fail") -> dict:
        """{i: result} of `submit(i, worker)` (an ObjectRef, or None for no call) over the pool `kind`
        (rollout or reward). A worker that dies is restarted and only its call resubmitted, at most
        trainer.max_retries times per call: every such call (generate with its seed, score,
        load_weights) gives the same answer twice. A call still running after `timeout` seconds kills
        and restarts its worker, then fails (on_timeout=fail) or gives None (zero)."""
        tr, pool = self.cfg.trainer, getattr(self, kind)
        futures = {i: (f, _deadline(timeout)) for i, w in enumerate(pool) if (f := submit(i, w)) is not None}
        results, deaths = {}, 0
        while futures:
            i, (future, deadline) = next(iter(futures.items()))
            name = f"{kind}-{i}"
            try:
                results[i] = ray.get(future,
                                     timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                running = self._running(name)
                self.restart(name)
                msg = f"{name} gave no answer within reward.timeout_s={timeout:g}{running}; restarted it"
                if on_timeout == "fail":
                    raise RuntimeError(f"{msg}; stopping (reward.on_timeout=fail)") from None
                log.error("%s; its samples score 0 (reward.on_timeout=%s)", msg, on_timeout)
                results[i] = None
            except ray.exceptions.RayActorError as e:
                running = self._running(name)
                deaths += 1
                log.error("actor %s died%s (%s)", name, running, e)
                if tr.on_actor_failure == "fail" or deaths > tr.max_retries:
                    raise RuntimeError(f"actor {name} died{running}; stopping (trainer.on_actor_failure="
                                       f"{tr.on_actor_failure}, trainer.max_retries={tr.max_retries})") from e
                self.restart(name)
                futures[i] = (submit(i, pool[i]), _deadline(timeout))
                log.warning("restarted %s, retrying its call (attempt %d)", name, deaths + 1)
                continue
            del futures[i]
        return results

    def score(self, batch: RolloutBatch, images: list | None = None) -> tuple[Scores, int]:
        """Rewards of the batch's answers (`images`: other image codes to score in place of the batch's),
        and how many samples scored 0 because their reward call ran out of time (reward.on_timeout=zero)."""
        rows, completions = batch.rows, batch.completions
        images = batch.images if images is None else images
        m = len(self.reward)
        bounds = [len(rows) * i // m for i in range(m + 1)]

        def submit(i, worker):
            lo, hi = bounds[i], bounds[i + 1]
            return worker.score.remote([r["prompt"] for r in rows[lo:hi]], completions[lo:hi], rows[lo:hi],
                                       images[lo:hi]) if hi > lo else None

        rc = self.cfg.reward
        parts = self.call("reward", submit, timeout=rc.timeout_s, on_timeout=rc.on_timeout)
        keys = sorted({k for p in parts.values() if p is not None for k in p.components})
        timeouts = 0
        for i in [i for i, p in parts.items() if p is None]:
            n = bounds[i + 1] - bounds[i]
            # Total 0 (no gradient signal from them); accuracy unknown, so left out of the accuracy means.
            parts[i] = Scores([0.0] * n, [math.nan] * n, {k: [math.nan] * n for k in keys})
            timeouts += n
        return Scores.concat([parts[i] for i in sorted(parts)]), timeouts

    def on_learners(self, refs: list) -> list:
        """ray.get of one call per learner rank. A rank that dies ends the run: its optimizer state is
        gone, and an update that may have been applied must never be applied again."""
        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as e:
            raise RuntimeError("a learner rank died; its optimizer state is lost, so the run stops here "
                               "(resume from the newest checkpoint: trainer.resume=auto)") from e

    def _running(self, name: str) -> str:
        key = internal_kv._internal_kv_get(_running_key(name))
        return f" while running reward {key.decode()!r}" if key else ""

    def restart(self, name: str, weights: bool = True) -> None:
        """A new actor in place of `name`. A rollout worker also gets the policy its peers hold
        (weights=False: none, for a sync that is about to send them anyway)."""
        kind, idx = name.rsplit("-", 1)
        idx = int(idx)
        pool = {"rollout": self.rollout, "reward": self.reward}[kind]
        ray.kill(pool[idx], no_restart=True)
        if kind == "reward":
            internal_kv._internal_kv_del(_running_key(name))
        try:
            pool[idx] = self._make_rollout(idx) if kind == "rollout" else self._make_reward(idx)
            # Ready before the call is resent, so that the call's deadline does not include the start-up.
            ray.get(pool[idx].__ray_ready__.remote())
            if kind == "rollout" and self.sync_mode == "collective":
                self._group_stale = True  # it joins the group when the next sync forms it again
                if self._lora() is not None:
                    ray.get(pool[idx].add_adapters.remote(self._lora()))
            if kind == "rollout" and weights:
                self._restore_weights(idx)
        except ray.exceptions.RayActorError as e:
            raise RuntimeError(f"could not restart {name}: its replacement died while starting ({e})") from e

    # ---- weights -----------------------------------------------------------------------------
    def _restore_weights(self, i: int) -> None:
        """Give restarted rollout-i the weights its live peers hold, so that all of one generate call's
        answers come from one policy version. Object store mode: the last synced ObjectRef. Collective
        mode: a live peer's own weights (Ray's object store, on this rare path); the learner's only when
        no peer is alive, and those may be newer than what the dead worker held (an update may have run
        since). The group forms again with the new member at the next sync."""
        worker = self.rollout[i]
        if self.sync_mode == "object_store" and self.weights is not None:
            ray.get(worker.load_weights.remote(self.weights, self.weights_version))
            return
        if self.sync_mode != "collective":
            return  # no sync yet: the checkpoint's weights, as every peer's
        for j, peer in enumerate(self.rollout):
            if j == i:
                continue
            try:
                version = ray.get(peer.weights_version.remote())
            except ray.exceptions.RayActorError:
                continue  # dead too; call() restarts it in turn
            ray.get(worker.load_weights.remote(peer.state_dict.remote(), version))
            log.info("rollout-%d (new) holds rollout-%d's weights (version %d)", i, j, version)
            return
        refs = [learner.state_dict_for_rollout.remote(adapters=self._lora() is not None) for learner in self.learners]
        self.on_learners(refs)
        ray.get(worker.load_weights.remote(refs[0], self.learner_version))
        log.warning("rollout-%d (new) holds the learner's weights: no other rollout worker was alive to copy from, "
                    "and the learner's may be newer than the ones it generated with (an update may have run "
                    "since, taken as version %d)", i, self.learner_version)

    def _lora(self) -> dict | None:
        lora = self.cfg.model.lora
        return OmegaConf.to_container(lora) if isinstance(lora, DictConfig) else lora

    def sync_weights(self, version: int) -> dict:
        """The learners' weights after the update of step `version` onto every rollout worker, as
        trainer.weight_sync says (the mode is chosen, and logged once, at the first sync). Metrics:
        sync/collective (1 or 0), and in collective mode sync/bytes (what one receiver got)."""
        self.learner_version = version
        if self.sync_mode is None:
            self.sync_mode = self._choose_sync_mode()
        if self.sync_mode == "object_store":
            refs = [learner.state_dict_for_rollout.remote() for learner in self.learners]  # every ZeRO-3 rank gathers
            self.on_learners(refs)
            # Final only now: a rollout worker (re)started from here on must load these, not older ones.
            self.weights, self.weights_version = refs[0], version
            self.call("rollout", lambda _, w: w.load_weights.remote(refs[0], version))
            return {"sync/collective": 0.0}
        return self._sync_collective(version)

    def _choose_sync_mode(self) -> str:
        mode = self.cfg.trainer.weight_sync
        if mode == "object_store":
            log.info("weight sync: through Ray's object store (trainer.weight_sync=object_store)")
            return mode
        reason, dead = self._form_group()
        if dead and self.cfg.trainer.on_actor_failure == "retry":
            for i in dead:  # no sync yet: the replacement's checkpoint weights are its peers'
                self.restart(f"rollout-{i}")
                log.warning("restarted rollout-%d, forming the weight group again", i)
            reason, _ = self._form_group()
        if reason is None:
            lora = self._lora()
            if lora is not None:
                ray.get([w.add_adapters.remote(lora) for w in self.rollout])
            log.info("weight sync: collective, learner rank 0 broadcasts %s to %d rollout worker(s) over %s in "
                     "buckets of %g MB (trainer.weight_sync=%s)", "the LoRA adapters" if lora else "the weights",
                     len(self.rollout), "NCCL" if self.cfg.trainer.device == "cuda" else "gloo",
                     self.cfg.trainer.weight_sync_bucket_mb, mode)
            return "collective"
        if mode == "collective":
            raise RuntimeError(f"trainer.weight_sync=collective: the weight group of learner rank 0 and the rollout "
                               f"workers could not form: {reason} (trainer.weight_sync=auto falls back to Ray's "
                               "object store instead)")
        log.warning("weight sync: through Ray's object store, because the collective group could not form: %s "
                    "(trainer.weight_sync=auto)", reason)
        return "object_store"

    def _form_group(self) -> tuple[str | None, list[int]]:
        """Form the weight group (learner rank 0 + every rollout worker), dropping any earlier one.
        Gives None when it formed, else why not (a member's error, or one that did not answer in time),
        and the rollout workers found dead."""
        n, m = len(self.rollout), len(self.reward)
        timeout = self.cfg.trainer.weight_sync_timeout_s
        if self._store_addr is None:
            self._store_addr = _rank0_address(self.cfg.ray.address is None, self._bundle(n + m))[0]
        addr, learner = self._store_addr, self.learners[0]
        self._group_formations += 1
        prefix, size = f"weights-{self._group_formations}", n + 1
        port = self.on_learners([learner.open_weight_group.remote(addr)])[0]
        refs = {"learner-0": learner.join_weight_group.remote(size, timeout, prefix),
                **{f"rollout-{i}": w.join_weight_group.remote(addr, port, i + 1, size, timeout, prefix)
                   for i, w in enumerate(self.rollout)}}
        # Every member gives up by itself after `timeout`; the margin covers a call queued behind another.
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout + 30)
        errors, dead = [], []
        for name, ref in refs.items():
            if ref not in ready:
                errors.append(f"{name} did not answer within {timeout + 30:g}s")
                continue
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                if name == "learner-0":
                    raise RuntimeError("a learner rank died; its optimizer state is lost, so the run stops here "
                                       "(resume from the newest checkpoint: trainer.resume=auto)") from e
                errors.append(f"{name} died")
                dead.append(int(name.rsplit("-", 1)[1]))
            except ray.exceptions.RayTaskError as e:
                errors.append(f"{name}: {_cause(e)}")
        self._group_stale = bool(errors)
        if errors:
            self._leave_group()
            return "; ".join(errors), dead
        return None, []

    def _leave_group(self) -> None:
        """Every live member drops its group (a dead one's sockets are already closed)."""
        refs = [a.leave_weight_group.remote() for a in (self.learners[:1] + self.rollout)]
        for ref in refs:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                pass

    def _sync_collective(self, version: int) -> dict:
        """One broadcast to every rollout worker. A rollout worker that dies fails the broadcast for all
        (learner rank 0 then drops the group, so nobody waits on it); the dead worker is restarted, the
        group formed again with it, and the whole broadcast sent again, at most trainer.max_retries times."""
        tr, attempt = self.cfg.trainer, 0
        while True:
            attempt += 1
            errors, dead = [], []
            if self._group_stale:
                reason, dead = self._form_group()
                if reason is not None:
                    errors.append(f"the group could not form again: {reason}")
                else:
                    log.info("weight group formed again, with the restarted rollout worker(s)")
            if not errors:
                learner_refs = [learner.broadcast_weights.remote(self.cfg.model.dtype, tr.weight_sync_bucket_mb)
                                for learner in self.learners]
                receive_refs = [w.receive_weights.remote(version) for w in self.rollout]
                received = None
                for i, ref in enumerate(receive_refs):
                    try:
                        received = ray.get(ref)
                    except ray.exceptions.RayActorError:
                        dead.append(i)
                        errors.append(f"rollout-{i} died")
                    except ray.exceptions.RayTaskError as e:
                        errors.append(f"rollout-{i}: {_cause(e)}")
                try:
                    self.on_learners(learner_refs)
                except ray.exceptions.RayTaskError as e:
                    errors.append(f"learner-0: {_cause(e)}")
                if not errors:
                    return {"sync/collective": 1.0, "sync/bytes": float(received["bytes"])}
            for i in dead:
                log.error("actor rollout-%d died during the weight sync", i)
            if tr.on_actor_failure == "fail" or attempt > tr.max_retries:
                raise RuntimeError(f"the weight sync failed: {'; '.join(errors)}; stopping (trainer.on_actor_failure="
                                   f"{tr.on_actor_failure}, trainer.max_retries={tr.max_retries})")
            for i in dead:
                self.restart(f"rollout-{i}", weights=False)
            self._group_stale = True  # every member drops its old group when the new one forms
            restarted = "".join(f"restarted rollout-{i}; " for i in dead)
            log.warning("%ssending the weights again over a new group (attempt %d) after: %s", restarted, attempt + 1,
                        "; ".join(errors))

    def close(self) -> None:
        for a in [*self.rollout, *self.reward, *self.learners]:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)
        # Names are released asynchronously; a driver started next in the same Ray must find them free.
        _wait_gone([f"{kind}-{i}" for kind, pool in (("rollout", self.rollout), ("reward", self.reward),
                                                      ("learner", self.learners)) for i in range(len(pool))])


def _cause(e: ray.exceptions.RayTaskError) -> str:
    """The remote exception's own message, first line (not Ray's traceback around it)."""
    cause = getattr(e, "cause", None) or e
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]


def _wait_gone(names: list[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while names and time.monotonic() < deadline:
        names = [n for n in names if _actor_alive(n)]
        if names:
            time.sleep(0.1)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _actor_alive(name: str) -> bool:
    try:
        ray.get_actor(name)
        return True
    except ValueError:
        return False
