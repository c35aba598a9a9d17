"""A long-lived, killable worker process that runs reward jobs under a hard per-item timeout.

Why a process: a hung sympy call (math-verify on a degenerate answer) cannot be interrupted from
inside its own process once the signal-based timeout is off, and signals only work on the main
thread anyway (Ray actors call us from other threads). Killing a process always works.

Why a long-lived one: starting Python and importing sympy costs about a second (several on a busy
machine), far more than a typical verification (milliseconds). The worker is started once, fed
whole batches over a pipe, and replaced only after it times out or dies.

Why a spare: replacing a killed worker used to cost that start-up on the next item, so a batch of
8 hanging answers took 8 x (timeout + start-up), 92 s once. A second worker is kept started in the
background; a kill hands the rest of the batch to it at once and a new spare starts behind it.

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
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any, NamedTuple


class JobResult(NamedTuple):
    """status: "ok" (value is the job's return value), "error" (the job raised; value is the
    exception's type name), "timeout", "crash" or "over_budget" (the batch's time budget ran out
    before the item finished; value is None)."""

    status: str
    value: Any = None


_BOOTSTRAP = (
    "import sys, json; sys.path[:0] = json.loads(sys.argv[1]); "
    "from rewards.sandbox import _child_main; _child_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))"
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
                [sys.executable, "-c", _BOOTSTRAP, json.dumps(path), str(to_child_r), str(from_child_w),
                 str(os.getpid())],
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
    that item is reported as "timeout", and the rest of the batch continues in the spare worker
    (`spare=True`, the default: started in the background beforehand, so a kill costs no start-up;
    a new spare starts behind it). An item during which the worker died is reported as "crash" the
    same way. With `spare=False` a fresh worker is started on the spot instead.

    `batch_timeout_s` bounds a whole `run`: once it is spent, the running item's worker is killed
    and that item and all after it are reported as "over_budget". It counts from the moment a
    worker is ready, so the very first start-up is not charged; waiting for a spare that is still
    starting is. Without it a batch returns in at most about `len(items) * timeout_s`.

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
        spare: bool = True,
    ):
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"SubprocessPool: timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if memory_limit_mb is not None and not (isinstance(memory_limit_mb, int) and memory_limit_mb > 0):
            raise ValueError(f"SubprocessPool: memory_limit_mb must be a positive int or None, got {memory_limit_mb!r}")
        if not isinstance(spare, bool):
            raise ValueError(f"SubprocessPool: spare must be true or false, got {spare!r}")
        self.timeout_s = float(timeout_s)
        self.initializer = initializer
        self.memory_limit_mb = memory_limit_mb
        self.start_timeout_s = float(start_timeout_s)
        self.spare = spare
        self._worker: _Worker | None = None
        self._spare: Future | None = None  # of a _Worker being started in the background
        self._started = False  # a worker has been started before: later ones are restarts
        self._lock = threading.Lock()
        self._counters = {"calls": 0, "timeouts": 0, "crashes": 0, "errors": 0, "over_budget": 0, "restarts": 0}

    @property
    def counters(self) -> dict[str, int]:
        """calls (items run), timeouts, crashes, errors (job raised), over_budget (items cut off by
        a batch's time budget), restarts (workers that replaced a killed or dead one)."""
        return dict(self._counters)

    @property
    def worker_pid(self) -> int | None:
        worker = self._worker
        return worker.proc.pid if worker is not None and worker.alive() else None

    def run(self, fn: Callable[..., Any], items: Sequence[tuple], timeout_s: float | None = None,
            batch_timeout_s: float | None = None) -> list[JobResult]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        for name, value in (("timeout_s", timeout_s), ("batch_timeout_s", batch_timeout_s)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"SubprocessPool.run: {name} must be a positive number of seconds, got {value!r}")
        items = [tuple(args) for args in items]
        with self._lock:
            if items and (self._worker is None or not self._worker.alive()):
                self._worker = self._replacement(None)
            deadline = None if batch_timeout_s is None else time.monotonic() + batch_timeout_s
            results: list[JobResult] = []
            while len(results) < len(items):
                if deadline is not None and time.monotonic() >= deadline:
                    cut = len(items) - len(results)
                    self._counters["over_budget"] += cut
                    results += [JobResult("over_budget")] * cut
                    break
                results += self._run_until_failure(fn, items[len(results):], timeout_s, deadline)
            self._counters["calls"] += len(items)
            return results

    def _run_until_failure(self, fn, items: list[tuple], timeout_s: float, deadline: float | None) -> list[JobResult]:
        """Results for a prefix of `items`: all of them, or up to and including the first item
        that timed out or crashed (the worker is then gone), or up to the item that was running
        when `deadline` passed (that one excluded: the caller reports it as over budget)."""
        try:
            payload = pickle.dumps((fn, items))
        except Exception as e:
            raise TypeError(
                f"SubprocessPool.run needs a module-level function and picklable arguments; "
                f"could not send {fn!r}: {type(e).__name__}: {e}"
            ) from e
        worker = self._send(payload, deadline)
        if worker is None:
            return []
        results: list[JobResult] = []
        while len(results) < len(items):
            wait, budget_bound = timeout_s, False
            if deadline is not None and deadline - time.monotonic() < timeout_s:
                wait, budget_bound = max(deadline - time.monotonic(), 0.0), True
            if not worker.recv_conn.poll(wait):
                worker.kill()
                if budget_bound:
                    return results
                self._counters["timeouts"] += 1
                return results + [JobResult("timeout")]
            try:
                index, status, value = worker.recv_conn.recv()
            except (EOFError, OSError):
                worker.kill()
                self._counters["crashes"] += 1
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

    def _send(self, payload: bytes, deadline: float | None) -> _Worker | None:
        """The worker the payload went to; None if `deadline` passed while waiting for one."""
        # A worker that died (killed by the last item, or while idle) is replaced without charging
        # an item; a fresh worker that cannot take a batch means something is broken beyond one bad item.
        for _ in range(2):
            if self._worker is None or not self._worker.alive():
                self._worker = self._replacement(deadline)
                if self._worker is None:
                    return None
            try:
                self._worker.send_conn.send_bytes(payload)
                return self._worker
            except OSError:
                self._worker.kill()
                self._worker = None
        raise RuntimeError("reward worker process closed its pipe right after starting twice")

    def _replacement(self, deadline: float | None) -> _Worker | None:
        """A ready worker: the spare if there is one (waiting, until `deadline`, for it to finish
        starting), else one started here. Starts the next spare. None if `deadline` passed first."""
        if self._worker is not None:
            self._worker.kill()
            self._worker = None
        worker = None
        spare, self._spare = self._spare, None
        if spare is not None:
            try:
                worker = spare.result(None if deadline is None else max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                self._spare = spare  # still starting: it stays the spare for the next run
                return None
            except Exception:
                worker = None  # it failed to start: starting one here raises the reason
            if worker is not None and not worker.alive():
                worker.kill()
                worker = None
        if worker is None:
            worker = _Worker(self.initializer, self.memory_limit_mb, self.start_timeout_s)
        if self._started:
            self._counters["restarts"] += 1
        self._started = True
        self._start_spare()
        return worker

    def _start_spare(self) -> None:
        if not self.spare or self._spare is not None:
            return
        future: Future = Future()

        def start() -> None:
            try:
                future.set_result(_Worker(self.initializer, self.memory_limit_mb, self.start_timeout_s))
            except BaseException as e:
                future.set_exception(e)

        threading.Thread(target=start, name="reward-spare-worker", daemon=True).start()
        self._spare = future

    def close(self) -> None:
        """Kill the workers (a spare still starting is killed once it is up). The pool stays
        usable: the next `run` starts new ones."""
        with self._lock:
            if self._worker is not None:
                self._worker.kill()
                self._worker = None
            if self._spare is not None:
                self._spare.add_done_callback(_kill_started)
                self._spare = None
            self._started = False

    def __enter__(self) -> "SubprocessPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kill_started(future: Future) -> None:
    if future.exception() is None:
        future.result().kill()


def _child_main(recv_fd: int, send_fd: int, parent_pid: int) -> None:
    recv_conn = Connection(recv_fd, writable=False)
    send_conn = Connection(send_fd, readable=False)
    # Ctrl-C belongs to the parent; it kills us when it shuts down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        memory_limit_mb, initializer = recv_conn.recv()
    except EOFError:
        return  # the parent went away while we started (a spare started just before it exited)
    if memory_limit_mb is not None:
        import resource

        limit = memory_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # The parent's pid comes from the parent: a spare is started from a background thread and its
    # parent may already be gone here, when os.getppid() would name init instead.
    _watch_parent(parent_pid)
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
