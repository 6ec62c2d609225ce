"""Isolated hook calls: one plugin at a time, in its own thread, with a time budget and a circuit breaker."""
from __future__ import annotations

import inspect
import logging
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Optional

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallResult:
    """What one hook call gave: a value, or an error attributed to plugin, generation and hook."""

    value: Any = None
    error: Optional[str] = None
    detail: Optional[str] = None
    duration_s: float = 0.0
    slow: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


class Caller:
    """Runs one plugin version's hooks on a thread of its own, so a stuck plugin stalls only itself."""

    def __init__(self, label: str, budget_s: float):
        self.label = label
        self.budget_s = budget_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"plugin-{label}")
        self._pending: Optional[Future] = None
        self._lock = threading.Lock()

    def call(self, hook: str, fn: Any, kwargs: dict, budget_s: Optional[float] = None) -> CallResult:
        """Call fn with the arguments it declares; never raises."""
        budget = self.budget_s if budget_s is None else budget_s
        with self._lock:
            if self._pending is not None and not self._pending.done():
                return CallResult(error=f"{hook} skipped: the previous call of {self.label} is still running "
                                        f"past its {budget:g} s budget", slow=True)
            wanted = inspect.signature(fn).parameters
            args = {k: v for k, v in kwargs.items() if k in wanted}
            start = time.perf_counter()
            future = self._pool.submit(fn, **args)
            self._pending = future
        try:
            value = future.result(timeout=budget)
        except FutureTimeout:
            took = time.perf_counter() - start
            return CallResult(error=f"{hook} took longer than its {budget:g} s budget (still running after "
                                    f"{took:.2f} s); its result will be dropped", duration_s=took, slow=True)
        except Exception as e:
            return CallResult(error=f"{hook} raised {type(e).__name__}: {e}", detail=traceback.format_exc(),
                              duration_s=time.perf_counter() - start)
        return CallResult(value=value, duration_s=time.perf_counter() - start)

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
