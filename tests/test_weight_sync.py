"""The collective weight sync (rl/weight_sync.py): buckets, wire dtype and bit-identical receipt in a
gloo group of threads on 127.0.0.1 (no Ray); then through Ray with the real learner and rollout
workers (rl/actors.py): two workers, a killed worker that rejoins, LoRA adapters only, and the
fallback to the object store."""
import threading

import pytest
import torch

from rl.weight_sync import WeightGroup, listen


def run_group(n_receivers: int, send, receive, timeout_s: float = 30.0):
    """A group of rank 0 (send(group)) and n_receivers (receive(group, rank)) threads; their results."""
    sock = listen("127.0.0.1")
    port, size = sock.getsockname()[1], n_receivers + 1
    out, errors = {}, {}

    def member(rank):
        group = None
        try:
            group = WeightGroup("127.0.0.1", port, rank, size, "cpu", timeout_s, "test",
                                sock=sock if rank == 0 else None)
            out[rank] = send(group) if rank == 0 else receive(group, rank)
        except Exception as e:  # noqa: BLE001 (reported below, by rank)
            errors[rank] = e
        finally:
            if group is not None:
                group.close()  # as a rollout worker does when its receive fails: the sender's sends fail

    threads = [threading.Thread(target=member, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 30)
    return out, errors


def test_buckets_carry_every_tensor_bit_identical_and_a_big_one_alone():
    torch.manual_seed(0)
    # 0.25 MiB buckets: the three small tensors share one, the 1 MiB one goes alone, the int one has its own dtype.
    sent = {"a": torch.randn(100, 100), "b": torch.randn(300), "c": torch.randn(10, 10, 10),
            "big": torch.randn(512, 512), "d": torch.randn(7), "steps": torch.arange(5)}
    sent["a"][0, 0] = float("nan")  # bit patterns, not just values, arrive unchanged
    sent["b"][0] = -0.0

    def receive(group, rank):
        params = {k: torch.zeros_like(v) for k, v in sent.items()}
        return group.receive(params), params

    out, errors = run_group(2, lambda g: g.send(sent.items(), torch.float32, 0.25), receive)
    assert not errors, errors
    stats = out[0]
    assert stats.names == list(sent) and stats.buckets == 4  # [a, b, c], [big], [d], [steps]
    assert stats.bytes == sum(v.numel() * v.element_size() for v in sent.values())
    for rank in (1, 2):
        got_stats, params = out[rank]
        assert got_stats.names == stats.names and got_stats.bytes == stats.bytes
        for k, v in sent.items():
            bits = torch.int32 if v.is_floating_point() else v.dtype  # NaN != NaN; its bits are equal
            assert params[k].dtype == v.dtype and torch.equal(params[k].view(bits), v.view(bits)), k


def test_a_bf16_wire_halves_the_bytes_and_lands_as_the_receivers_dtype():
    sent = {"w": torch.randn(64, 64), "v": torch.randn(64)}

    def receive(group, rank):
        params = {k: torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in sent.items()}
        return group.receive(params), params

    out, errors = run_group(1, lambda g: g.send(sent.items(), torch.bfloat16, 64), receive)
    assert not errors, errors
    assert out[0].bytes == sum(v.numel() * 2 for v in sent.values()) and out[0].buckets == 1
    for k, v in sent.items():
        assert torch.equal(out[1][1][k], v.to(torch.bfloat16)), k


def test_a_receiver_without_the_sent_name_or_shape_fails_naming_it():
    sent = {"w": torch.randn(4, 4)}
    wrong = {1: {"w": torch.zeros(4, 5)}, 2: {"x": torch.zeros(4, 4)}}
    out, errors = run_group(2, lambda g: g.send(sent.items(), torch.float32, 1), lambda g, rank: g.receive(wrong[rank]))
    assert "sent with shape [4, 4], this model's is [4, 5]" in str(errors[1]) and "'w'" in str(errors[2])
    assert 0 in errors or 0 in out  # the sender got an answer too (it did not hang)


def test_a_member_that_never_arrives_fails_formation_within_the_timeout():
    sock = listen("127.0.0.1")
    with pytest.raises(RuntimeError, match="(?i)timed? ?out|Timeout"):
        WeightGroup("127.0.0.1", sock.getsockname()[1], 0, 2, "cpu", 1.0, "test", sock=sock)


# ---- through Ray: the real learner and rollout workers -------------------------------------------

FAST = ["trainer.val_before_train=false", "trainer.val_every=0", "trainer.save_every=0", "algorithm.mu=1",
        "rollout.gen_length=16", "rollout.steps=8"]


def one_more_step(driver) -> None:
    driver.cfg.trainer.total_steps = driver.step + 1
    driver.fit()


def held(worker, attribute: str | None = None):
    """(the worker's weights, or its `attribute`; its version)."""
    import ray
    return ray.get(worker.__ray_call__.remote(
        lambda self: (self.model.state_dict() if attribute is None else getattr(self, attribute), self.version)))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def perturb(learner, which: str = "") -> None:
    """Noise on the learner's trainable weights (those whose name holds `which`): one step of the tiny
    model may leave them unchanged (equal rewards give no gradient), and a sync must show it moved them."""
    import ray

    def add_noise(self):
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                if p.requires_grad and which in name:
                    p.add_(torch.randn_like(p))

    ray.get(learner.__ray_call__.remote(add_noise))


def busy_at_next_sync(driver, seconds: float) -> None:
    """rollout-0 runs a `seconds` call when the next sync starts: it cannot join the group in time."""
    import time

    original = driver.sync_weights

    def sync():
        driver.sync_weights = original
        driver.actors.rollout[0].__ray_call__.remote(lambda self: time.sleep(seconds))
        return original()

    driver.sync_weights = sync


@pytest.mark.slow
def test_two_workers_get_the_learners_weights_a_killed_one_rejoins_and_auto_falls_back(local_ray, tmp_path, caplog):
    import logging

    import ray

    from rl.driver import Driver
    from tests.conftest import compose_cfg
    from tests.test_faults import kill

    driver = Driver(compose_cfg(*FAST, "rollout.num_workers=2", "trainer.weight_sync_timeout_s=3"), tmp_path / "run")
    actors = driver.actors
    learner = actors.learners[0]
    try:
        with caplog.at_level(logging.INFO, logger="dllm_rl"):
            one_more_step(driver)  # a real update, then the first sync forms the group
            assert "weight sync: collective" in caplog.text and actors.sync_mode == "collective"
            policy = ray.get(learner.state_dict_for_rollout.remote())
            for worker in actors.rollout:
                weights, version = held(worker)
                assert same(weights, policy) and version == 1
            perturb(learner)
            metrics = actors.sync_weights(driver.step)
            policy = ray.get(learner.state_dict_for_rollout.remote())
            for worker in actors.rollout:
                assert same(held(worker)[0], policy)
            assert metrics == {"sync/collective": 1.0,
                               "sync/bytes": float(sum(v.numel() * 4 for v in policy.values()))}

            # Killed between syncs: the replacement takes its live peer's weights before its call is resent.
            kill(actors.rollout[1])
            driver.generate(driver.cursor.rows[:2], 2, seed=1)
            assert "restarted rollout-1" in caplog.text
            peer, restarted = held(actors.rollout[0]), held(actors.rollout[1])
            assert same(restarted[0], peer[0]) and restarted[1] == peer[1] == 1
            # ...and rejoins the group at the next sync.
            one_more_step(driver)
            assert "weight group formed again" in caplog.text
            policy = ray.get(learner.state_dict_for_rollout.remote())
            for worker in actors.rollout:
                weights, version = held(worker)
                assert same(weights, policy) and version == 2

            # A member that cannot join within trainer.weight_sync_timeout_s (rollout-0 busy): auto falls
            # back to the object store, says why, and training goes on.
            actors.sync_mode = None
            busy_at_next_sync(driver, 5)
            one_more_step(driver)
        assert actors.sync_mode == "object_store"
        reason = caplog.text.split("because the collective group could not form: ", 1)[1].splitlines()[0]
        assert "learner-0:" in reason and "rollout-0:" in reason, reason
        policy = ray.get(learner.state_dict_for_rollout.remote())
        for worker in actors.rollout:
            weights, version = held(worker)
            assert same(weights, policy) and version == 3
        assert actors.sync_weights(driver.step) == {"sync/collective": 0.0}

        # weight_sync=collective in the same condition is an error that names the setting and the reason.
        actors.sync_mode, driver.cfg.trainer.weight_sync = None, "collective"
        busy_at_next_sync(driver, 5)
        with pytest.raises(RuntimeError, match="trainer.weight_sync=collective: the weight group .* could not form: "
                                               ".*learner-0"):
            driver.sync_weights()
    finally:
        driver.close()


@pytest.mark.slow
def test_lora_sends_the_adapters_only_and_the_rollout_runs_them_unmerged(local_ray, tmp_path, caplog):
    import logging

    import ray

    from rl.driver import Driver
    from tests.conftest import compose_cfg
    from tests.test_faults import kill

    driver = Driver(compose_cfg(*FAST, "model.lora={r: 4, alpha: 8}"), tmp_path / "run")
    actors, learner = driver.actors, driver.actors.learners[0]
    try:
        one_more_step(driver)
        perturb(learner, "lora_B")  # lora_B starts at 0: the merged weights would equal the base's
        metrics = actors.sync_weights(driver.step)
        adapters = ray.get(learner.state_dict_for_rollout.remote(adapters=True))
        full = ray.get(learner.state_dict_for_rollout.remote())
        assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
        assert metrics["sync/bytes"] == sum(v.numel() * 4 for v in adapters.values())
        assert metrics["sync/bytes"] < sum(v.numel() * 4 for v in full.values()) / 10
        worker = actors.rollout[0]
        (weights, version), names = held(worker), held(worker, "adapter_names")[0]
        assert sorted(names) == sorted(adapters) and version == 1
        assert all(torch.equal(weights[k], v) for k, v in adapters.items())

        def merged(self):
            """The rollout's effective weights: its adapters merged into a copy of its model."""
            import copy

            from peft.tuners.lora import LoraLayer

            model = copy.deepcopy(self.model)
            for mod in model.modules():
                if isinstance(mod, LoraLayer):
                    mod.merge()
            return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}

        assert same(ray.get(worker.__ray_call__.remote(merged)), full)

        # The only rollout worker killed: no peer to copy, so it takes the learner's adapters, with a warning.
        kill(worker)
        with caplog.at_level(logging.WARNING, logger="dllm_rl"):
            driver.generate(driver.cursor.rows[:1], 2, seed=1)
        assert "no other rollout worker was alive" in caplog.text
        weights, version = held(actors.rollout[0])
        assert all(torch.equal(weights[k], v) for k, v in adapters.items()) and version == 1
    finally:
        driver.close()
