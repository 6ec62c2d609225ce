"""Isolated hook calls: each plugin version runs its hooks one at a time on a thread of its own, with a
time budget and a circuit breaker. The caller waits at most the budget (or not at all, for posted calls);
a call that overruns is abandoned, and its result, when it comes, is dropped and reported."""
from __future__ import annotations

import heapq
import inspect
import itertools
import logging
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallResult:
    """What one hook call gave: a value, or an error attributed to plugin, generation and hook."""

    value: Any = None
    error: Optional[str] = None
    detail: Optional[str] = None
    duration_s: float = 0.0
    slow: bool = False
    busy: bool = False  # never called: the plugin was still busy with an earlier call

    @property
    def ok(self) -> bool:
        return self.error is None


class _Watchdog:
    """One thread for every caller: runs a function when a deadline passes (a posted call's budget)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None

    def at(self, when: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), fn))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="plugin-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                fn = heapq.heappop(self._heap)[2]
            try:
                fn()
            except Exception:
                log.exception("plugin watchdog callback failed")


WATCHDOG = _Watchdog()


class _Job:
    """One hook call handed to a plugin's thread."""

    def __init__(self, hook: str, budget: float):
        self.hook, self.budget = hook, budget
        self.started: Optional[float] = None
        self.finished = False
        self.cancelled = False
        self.abandoned = False  # nobody waits for its result any more: it is dropped and reported


def _words(took: float, budget: float) -> str:
    return f"{took:.2f} s, past its {budget:g} s budget"


class Caller:
    """Runs one plugin version's hooks on a thread of its own, so a slow or stuck plugin stalls only itself.

    call(): the caller waits at most the budget, in all (waiting for an earlier call included).
    post(): the caller does not wait; the result goes to `done` if it came within the budget.
    A call past its budget is abandoned: on_slow(hook, result) says so when the budget runs out (posted
    calls; call() returns that result itself), on_late(hook, result) when it ends, its result dropped.
    """

    def __init__(self, label: str, budget_s: float):
        self.label = label
        self.budget_s = budget_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"plugin-{label}")
        self._lock = threading.Lock()
        self._running: Optional[_Job] = None
        self.on_slow: Callable[[str, CallResult], None] = lambda hook, result: None
        self.on_late: Callable[[str, CallResult], None] = lambda hook, result: None

    # ---- on the plugin's thread ----
    def _run(self, job: _Job, fn: Any, args: Any, after: Optional[Callable[[], None]] = None) -> Optional[CallResult]:
        with self._lock:
            if job.cancelled:
                return None
            job.started = time.perf_counter()
            self._running = job
        try:
            if callable(args):  # posted calls take their arguments when they start (the latest tick)
                args = args()
                if args is None:  # nothing to do after all
                    with self._lock:
                        job.finished = True
                        self._running = None
                    return None
                job.started = time.perf_counter()
            wanted = inspect.signature(fn).parameters
            value = fn(**{k: v for k, v in args.items() if k in wanted})
            result = CallResult(value=value, duration_s=time.perf_counter() - job.started)
        except Exception as e:
            result = CallResult(error=f"{job.hook} raised {type(e).__name__}: {e}", detail=traceback.format_exc(),
                                duration_s=time.perf_counter() - job.started)
        with self._lock:
            job.finished = True
            self._running = None
            keep = not job.abandoned
        if after is not None and keep and result.ok:
            try:
                after()  # still on this thread, before its next call (saving the state it left)
            except Exception:
                log.exception("%s: after %s", self.label, job.hook)
        return result

    def _late(self, job: _Job, result: CallResult) -> None:
        try:
            self.on_late(job.hook, result)
        except Exception:
            log.exception("%s: reporting the late result of %s failed", self.label, job.hook)

    # ---- the caller's side ----
    def working(self) -> bool:
        """A call is running (within its budget or past it)."""
        with self._lock:
            return self._running is not None and self._running.started is not None

    def busy(self) -> Optional[str]:
        """Why no call can be made now: a call is running past its budget; None otherwise."""
        with self._lock:
            job = self._running
            if job is None or job.started is None:
                return None
            took = time.perf_counter() - job.started
            if took <= job.budget:
                return None
            return f"{self.label} is busy: its {job.hook} has been running for {_words(took, job.budget)}"

    def call(self, hook: str, fn: Any, kwargs: dict | Callable[[], Optional[dict]], budget_s: Optional[float] = None,
             after: Optional[Callable[[], None]] = None) -> CallResult:
        """Call fn with the arguments it declares, waiting at most the budget; never raises (but
        RuntimeError once closed). kwargs may be a function run on the plugin's thread when the call
        starts; after() runs there once the call ended well within its budget."""
        budget = self.budget_s if budget_s is None else budget_s
        busy = self.busy()
        if busy:
            return CallResult(error=f"{hook} not called: {busy}", slow=True, busy=True)
        job = _Job(hook, budget)
        start = time.perf_counter()
        future = self._pool.submit(self._run, job, fn, kwargs, after)
        try:
            result = future.result(timeout=budget)
        except FutureTimeout:
            with self._lock:
                running = self._running
                if job.started is None:  # still waiting for an earlier call: it never runs
                    job.cancelled = True
                else:
                    job.abandoned = True
            took = time.perf_counter() - start
            if job.cancelled:
                what = f"its {running.hook} " if running is not None else "an earlier call "
                return CallResult(error=f"{hook} not called: {self.label} is busy: {what}kept it busy past the "
                                        f"{budget:g} s budget", duration_s=took, slow=True, busy=True)
            future.add_done_callback(lambda f: f.cancelled() or f.result() is None or self._late(job, f.result()))
            return CallResult(error=f"{hook} took longer than its {budget:g} s budget (still running after "
                                    f"{took:.2f} s); abandoned: its result will be dropped", duration_s=took,
                              slow=True)
        if result is None:
            return CallResult(error=f"{hook} not called", busy=True)
        return result

    def post(self, hook: str, fn: Any, args: Callable[[], Optional[dict]], done: Callable[[CallResult], None],
             budget_s: Optional[float] = None) -> bool:
        """Queue a call without waiting. args() runs on the plugin's thread when the call starts (None: skip);
        done(result) runs there too when the call ended within its budget. False once closed."""
        budget = self.budget_s if budget_s is None else budget_s
        job = _Job(hook, budget)

        def run() -> Optional[CallResult]:
            result = None
            try:
                result = self._run(job, fn, self._arm(job, args))
            finally:
                if result is not None:
                    self._ended(job, result, done)
            return result

        try:
            self._pool.submit(run)
        except RuntimeError:  # closed: the version was retired
            return False
        return True

    def _arm(self, job: _Job, args: Callable[[], Optional[dict]]) -> Callable[[], Optional[dict]]:
        def start() -> Optional[dict]:
            got = args()
            if got is not None:
                WATCHDOG.at(time.monotonic() + job.budget, lambda: self._overran(job))
            return got
        return start

    def _overran(self, job: _Job) -> None:
        with self._lock:
            if job.finished or job.abandoned:
                return
            job.abandoned = True
            took = time.perf_counter() - (job.started or time.perf_counter())
        try:
            self.on_slow(job.hook, CallResult(
                error=f"{job.hook} took longer than its {job.budget:g} s budget (still running after {took:.2f} s); "
                      f"abandoned: its result will be dropped", duration_s=took, slow=True))
        except Exception:
            log.exception("%s: reporting the overrun of %s failed", self.label, job.hook)

    def _ended(self, job: _Job, result: CallResult, done: Callable[[CallResult], None]) -> None:
        with self._lock:
            late = job.abandoned or result.duration_s > job.budget
            reported = job.abandoned
            job.abandoned = True  # the watchdog, if it fires now, has nothing to say
        try:
            if not late:
                done(result)
                return
            if not reported:  # ended past its budget before the watchdog noticed
                self.on_slow(job.hook, CallResult(error=f"{job.hook} took {_words(result.duration_s, job.budget)}; "
                                                        f"abandoned: its result is dropped",
                                                  duration_s=result.duration_s, slow=True))
        except Exception:
            log.exception("%s: handling the result of %s failed", self.label, job.hook)
            return
        self._late(job, result)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Breaker:
    """Counts consecutive failures; trips after `limit` of them."""

    def __init__(self, limit: int):
        self.limit = limit
        self.failures = 0

    def record(self, ok: bool) -> bool:
        """Count one call; True when this failure trips the breaker."""
        self.failures = 0 if ok else self.failures + 1
        return not ok and self.failures == self.limit
