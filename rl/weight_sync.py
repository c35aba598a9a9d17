"""Weights from learner rank 0 to the rollout workers over a torch.distributed group of their own.

Plain torch (no Ray): rl/actors.py forms the group and drives it, rl/learner.py sends, and
rollout/worker.py receives. Rank 0 of the group is learner rank 0, ranks 1..N the rollout workers.
The group is built from its own TCPStore and backend object, never through init_process_group:
learner rank 0 already holds DeepSpeed's default group and the rollout workers hold none, and a
group re-formed after a rollout worker restarts must not disturb either.

The stream is self-describing: per bucket, rank 0 broadcasts a JSON header (names, shapes, dtypes)
and then one flat tensor holding those tensors back to back. Receivers check every name and shape
against their model before copying, so a sender and a receiver that disagree fail with the name.
"""
from __future__ import annotations

import datetime
import json
import math
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# Per-broadcast deadline, apart from the formation timeout: a receiver may still be finishing a
# generate call queued before its receive (the driver overlaps rollouts with the update), and that
# wait is not a fault. A member that dies closes its sockets, which fails the broadcast at once.
OP_TIMEOUT = datetime.timedelta(minutes=30)
_END = 0  # header length that ends a stream


def listen(addr: str) -> socket.socket:
    """A socket bound to this node's own address on a port the OS picks, for the group's store:
    bound before its port is handed out, so no other process can take the port in between."""
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    sock.bind((addr, 0))
    sock.listen()
    return sock


def local_address(store_addr: str, port: int) -> str:
    """This node's address on the route to the store (a UDP connect sends nothing): the interface
    gloo must listen on so that every other member can reach it."""
    with socket.socket(socket.AF_INET6 if ":" in store_addr else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((store_addr, port))
        return s.getsockname()[0]


def _backend(device: torch.device, store, rank: int, size: int, timeout: datetime.timedelta, addr: str):
    """The one place CPU and GPU differ: gloo over TCP, or NCCL (whose communicator is created lazily,
    by the first broadcast; WeightGroup's handshake makes that happen inside the formation timeout)."""
    if device.type == "cuda":
        if not dist.is_nccl_available():
            raise RuntimeError("NCCL is not available in this torch build")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=addr)]
    return dist.ProcessGroupGloo(store, rank, size, opts)


class WeightGroup:
    """One member of the group. Rank 0 passes `sock` (from listen()) and hosts the store on it;
    the others connect to addr:port. Construction returns once every member has joined, or raises
    after timeout_s. `prefix` names one formation, so a straggler of an earlier one never meets it."""

    def __init__(self, addr: str, port: int, rank: int, size: int, device: str | torch.device = "cpu",
                 timeout_s: float = 60.0, prefix: str = "weights", sock: socket.socket | None = None):
        if (rank == 0) != (sock is not None):
            raise ValueError(f"rank {rank}: the store's socket is rank 0's alone")
        self.rank, self.size, self.device = rank, size, torch.device(device)
        deadline = time.monotonic() + timeout_s

        def left() -> datetime.timedelta:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the weight group did not form within {timeout_s:g}s")
            return datetime.timedelta(seconds=remaining)

        if sock is not None:
            self._store = dist.TCPStore(addr, port, size, True, left(), wait_for_workers=False,
                                        master_listen_fd=sock.fileno())
            own = addr
        else:
            self._store = dist.TCPStore(addr, port, size, False, left())
            own = local_address(addr, port)
        store = dist.PrefixStore(prefix, self._store)
        self.comm_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.pg = _backend(self.device, store, rank, size, left(), own)
        # A first collective inside the deadline: a member that is missing fails formation here, not
        # the first sync (and NCCL's communicator, created lazily, is created now).
        handshake = torch.tensor([size], device=self.comm_device)
        self._broadcast(handshake, left())
        if int(handshake.item()) != size:
            raise RuntimeError(f"rank {rank}: the group's rank 0 has {int(handshake.item())} members, "
                               f"this member was told {size}")

    def _broadcast(self, tensor: torch.Tensor, timeout: datetime.timedelta = OP_TIMEOUT) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor, opts.timeout = 0, 0, timeout
        self.pg.broadcast([tensor], opts).wait()

    # ---- rank 0 -------------------------------------------------------------------------------
    def send(self, tensors: Iterable[tuple[str, torch.Tensor | None]], wire_dtype: torch.dtype,
             bucket_mb: float) -> Stats:
        """Broadcast (name, tensor) pairs in buckets of at most bucket_mb (a larger tensor goes alone);
        floating tensors travel as wire_dtype. Items whose tensor is None are skipped (other ranks of a
        ZeRO-3 gather run the same loop without values). Every value is copied into a bucket before the
        next item is drawn, so a tensor only valid inside a gather may be yielded."""
        limit = max(1, int(bucket_mb * 2**20))
        pending: list[tuple[str, torch.Tensor]] = []
        stats = Stats()
        for name, tensor in tensors:
            if tensor is None:
                continue
            t = tensor.detach().to(self.comm_device, wire_dtype if tensor.is_floating_point() else tensor.dtype,
                                   copy=True)
            size = t.numel() * t.element_size()
            if pending and (t.dtype != pending[0][1].dtype or size + sum(_nbytes(p) for _, p in pending) > limit):
                self._send_bucket(pending, stats)
                pending = []
            pending.append((name, t))
        if pending:
            self._send_bucket(pending, stats)
        self._broadcast(torch.tensor([_END], dtype=torch.int64, device=self.comm_device))
        return stats

    def _send_bucket(self, items: list[tuple[str, torch.Tensor]], stats: Stats) -> None:
        header = json.dumps({"dtype": str(items[0][1].dtype).removeprefix("torch."),
                             "tensors": [[name, list(t.shape)] for name, t in items]}).encode()
        self._broadcast(torch.tensor([len(header)], dtype=torch.int64, device=self.comm_device))
        self._broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.comm_device))
        flat = torch.cat([t.reshape(-1) for _, t in items])
        self._broadcast(flat)
        stats.add(items, flat)

    # ---- ranks 1..N ---------------------------------------------------------------------------
    def receive(self, params: dict[str, torch.Tensor]) -> Stats:
        """Receive one stream into `params` (name -> the receiver's tensor, copied into in place and
        cast to its dtype). Every name must be there with the sent shape."""
        stats = Stats()
        while True:
            length = torch.zeros(1, dtype=torch.int64, device=self.comm_device)
            self._broadcast(length)
            if int(length.item()) == _END:
                return stats
            raw = torch.empty(int(length.item()), dtype=torch.uint8, device=self.comm_device)
            self._broadcast(raw)
            header = json.loads(bytes(raw.cpu().tolist()).decode())
            dtype = getattr(torch, header["dtype"])
            items = [(name, tuple(shape)) for name, shape in header["tensors"]]
            for name, shape in items:
                if name not in params:
                    raise KeyError(f"the sender sent {name!r}, which this model does not have")
                if tuple(params[name].shape) != shape:
                    raise ValueError(f"{name}: sent with shape {list(shape)}, this model's is "
                                     f"{list(params[name].shape)}")
            sizes = [math.prod(shape) for _, shape in items]
            flat = torch.empty(sum(sizes), dtype=dtype, device=self.comm_device)
            self._broadcast(flat)
            with torch.no_grad():
                for (name, shape), part in zip(items, flat.split(sizes)):
                    params[name].copy_(part.view(shape))
            stats.add(items, flat)

    def close(self) -> None:
        """Drop the group: the sockets close, so a member still waiting in a broadcast fails now rather
        than at OP_TIMEOUT."""
        pg, self.pg = getattr(self, "pg", None), None
        if pg is not None and hasattr(pg, "abort"):
            pg.abort()  # NCCL: its communicators; gloo's pairs close when pg is freed below
        del pg
        self._store = None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class Stats:
    """What one stream carried: the names in order (its manifest), the bytes of the buckets, their count."""
    names: list[str] = field(default_factory=list)
    bytes: int = 0
    buckets: int = 0

    def add(self, items, flat: torch.Tensor) -> None:
        self.names.extend(name for name, _ in items)
        self.bytes += _nbytes(flat)
        self.buckets += 1

