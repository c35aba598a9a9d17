"""A long-lived, killable worker process that runs reward jobs under a hard per-item timeout.

Why a process: a hung sympy call (math-verify on a degenerate answer) cannot be interrupted from
inside its own process once the signal-based timeout is off, and signals only work on the main
thread anyway (Ray actors call us from other threads). Killing a process always works.

Why a long-lived one: starting Python and importing sympy costs about a second, far more than a
typical verification (milliseconds). The worker is started once, fed whole batches over a pipe,
and replaced only after it times out or dies.

The worker is a fresh interpreter started with `subprocess` (fork+exec), so it is safe to create
from any thread and never re-imports the caller's `__main__` (multiprocessing's spawn does, which
breaks under pytest, Ray's worker entry point and notebooks).
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, NamedTuple


class JobResult(NamedTuple):
    """status: "ok" (value is the job's return value), "error" (the job raised; value is the
    exception's type name), "timeout" or "crash" (value is None)."""

    status: str
    value: Any = None


_BOOTSTRAP = (
    "import sys, json; sys.path[:0] = json.loads(sys.argv[1]); "
    "from rewards.sandbox import _child_main; _child_main(int(sys.argv[2]), int(sys.argv[3]))"
)


class _Worker:
    """One child process and its two pipe ends."""

    def __init__(self, initializer: Callable[[], Any] | None, memory_limit_mb: int | None, start_timeout_s: float):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # The child needs the caller's import path to unpickle job functions (plugins, tests).
        path = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, json.dumps(path), str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, env=env,
            )
        except BaseException:
            os.close(to_child_w)
            os.close(from_child_r)
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.send_conn = Connection(to_child_w, readable=False)
        self.recv_conn = Connection(from_child_r, writable=False)
        self._finalizer = weakref.finalize(self, _kill, self.proc, self.send_conn, self.recv_conn)
        try:
            self.send_conn.send((memory_limit_mb, initializer))
            if not self.recv_conn.poll(start_timeout_s):
                raise RuntimeError(f"reward worker process did not start within {start_timeout_s:.0f}s")
            kind, detail = self.recv_conn.recv()
            if kind != "ready":
                raise RuntimeError(f"reward worker initializer {initializer!r} failed: {detail}")
        except (EOFError, OSError) as e:
            self.kill()
            raise RuntimeError(
                f"reward worker process exited during start-up (exit code {self.proc.returncode}); "
                "its stderr above says why"
            ) from e
        except BaseException:
            self.kill()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self._finalizer()


def _kill(proc: subprocess.Popen, *conns: Connection) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for conn in conns:
        conn.close()


class SubprocessPool:
    """Runs `fn(*args)` for each args tuple of a batch in one worker process, in order.

    Every item gets its own deadline of `timeout_s`, counted from the moment the previous item's
    result arrived (or from the send, for the first). When an item overruns, the worker is killed,
    that item is reported as "timeout", a fresh worker is started (start-up time is not charged to
    any item) and the rest of the batch continues there. An item during which the worker died is
    reported as "crash" the same way. So a batch always returns, in at most about
    `len(items) * timeout_s` plus restarts, with one result per item.

    The worker's address space is capped at `memory_limit_mb` (RLIMIT_AS), so a runaway
    big-integer computation fails fast with MemoryError (an "error") rather than eating the
    machine's memory.

    `fn` and `initializer` must be module-level functions (they travel by reference); `args` and
    return values must pickle. Thread-safe: concurrent `run` calls are serialized.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        initializer: Callable[[], Any] | None = None,
        memory_limit_mb: int | None = 4096,
        start_timeout_s: float = 120.0,
    ):
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"SubprocessPool: timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if memory_limit_mb is not None and not (isinstance(memory_limit_mb, int) and memory_limit_mb > 0):
            raise ValueError(f"SubprocessPool: memory_limit_mb must be a positive int or None, got {memory_limit_mb!r}")
        self.timeout_s = float(timeout_s)
        self.initializer = initializer
        self.memory_limit_mb = memory_limit_mb
        self.start_timeout_s = float(start_timeout_s)
        self._worker: _Worker | None = None
        self._lock = threading.Lock()
        self._counters = {"calls": 0, "timeouts": 0, "crashes": 0, "errors": 0, "restarts": 0}

    @property
    def counters(self) -> dict[str, int]:
        """calls (items run), timeouts, crashes, errors (job raised), restarts (workers started
        after the first)."""
        return dict(self._counters)

    @property
    def worker_pid(self) -> int | None:
        worker = self._worker
        return worker.proc.pid if worker is not None and worker.alive() else None

    def run(self, fn: Callable[..., Any], items: Sequence[tuple], timeout_s: float | None = None) -> list[JobResult]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"SubprocessPool.run: timeout_s must be a positive number of seconds, got {timeout_s!r}")
        items = [tuple(args) for args in items]
        with self._lock:
            results: list[JobResult] = []
            while len(results) < len(items):
                results += self._run_until_failure(fn, items[len(results):], timeout_s)
            self._counters["calls"] += len(items)
            return results

    def _run_until_failure(self, fn, items: list[tuple], timeout_s: float) -> list[JobResult]:
        """Results for a prefix of `items`: all of them, or up to and including the first item
        that timed out or crashed (the worker is then gone)."""
        try:
            payload = pickle.dumps((fn, items))
        except Exception as e:
            raise TypeError(
                f"SubprocessPool.run needs a module-level function and picklable arguments; "
                f"could not send {fn!r}: {type(e).__name__}: {e}"
            ) from e
        worker = self._send(payload)
        results: list[JobResult] = []
        while len(results) < len(items):
            if not worker.recv_conn.poll(timeout_s):
                self._discard(worker, "timeouts")
                return results + [JobResult("timeout")]
            try:
                index, status, value = worker.recv_conn.recv()
            except (EOFError, OSError):
                self._discard(worker, "crashes")
                return results + [JobResult("crash")]
            if index == -1:
                raise RuntimeError(
                    f"reward worker could not load the job {fn!r} ({value}); job functions must be importable "
                    "by module name in a fresh interpreter (not defined in __main__ or loaded from a file path)"
                )
            if index != len(results):
                worker.kill()
                raise RuntimeError(f"reward worker answered item {index} while item {len(results)} was due")
            if status == "error":
                self._counters["errors"] += 1
            results.append(JobResult(status, value))
        return results

    def _send(self, payload: bytes) -> _Worker:
        # A worker that died while idle is replaced without charging the batch; a fresh worker
        # that cannot take a batch means something is broken beyond one bad item.
        for _ in range(2):
            if self._worker is None or not self._worker.alive():
                self._start()
            try:
                self._worker.send_conn.send_bytes(payload)
                return self._worker
            except OSError:
                self._worker.kill()
                self._worker = None
        raise RuntimeError("reward worker process closed its pipe right after starting twice")

    def _start(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._counters["restarts"] += 1
        self._worker = None
        self._worker = _Worker(self.initializer, self.memory_limit_mb, self.start_timeout_s)

    def _discard(self, worker: _Worker, counter: str) -> None:
        worker.kill()
        self._counters[counter] += 1

    def close(self) -> None:
        """Kill the worker. The pool stays usable: the next `run` starts a new one."""
        with self._lock:
            if self._worker is not None:
                self._worker.kill()
                self._worker = None

    def __enter__(self) -> "SubprocessPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _child_main(recv_fd: int, send_fd: int) -> None:
    recv_conn = Connection(recv_fd, writable=False)
    send_conn = Connection(send_fd, readable=False)
    # Ctrl-C belongs to the parent; it kills us when it shuts down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    memory_limit_mb, initializer = recv_conn.recv()
    if memory_limit_mb is not None:
        import resource

        limit = memory_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _watch_parent(os.getppid())
    try:
        if initializer is not None:
            initializer()
    except Exception as e:
        send_conn.send(("init_error", f"{type(e).__name__}: {e}"))
        return
    send_conn.send(("ready", os.getpid()))
    while True:
        try:
            fn, items = recv_conn.recv()
        except EOFError:
            return
        except Exception as e:
            # e.g. the job function lives in the caller's __main__, which this process lacks.
            send_conn.send((-1, "error", f"{type(e).__name__}: {e}"))
            continue
        for index, args in enumerate(items):
            try:
                reply = (index, "ok", fn(*args))
            except Exception as e:
                # Only the type: str() of a sympy-laden exception can itself hang.
                reply = (index, "error", type(e).__name__)
            try:
                send_conn.send(reply)
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                send_conn.send((index, "error", f"unpicklable result: {type(e).__name__}"))


def _watch_parent(parent_pid: int) -> None:
    # If the parent is SIGKILLed its finalizers never run; do not outlive it.
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
