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
