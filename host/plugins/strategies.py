"""Strategy plugins: context, start/stop/snapshot, isolated calls whose returned intents are checked."""
from __future__ import annotations

import inspect
import json
import logging
import threading
from dataclasses import dataclass, replace
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Callable, Optional

from ..builtin import passthrough
from ..context import StrategyContext
from ..models import AlertRequest, AlertStatus, ExecutionType, Holding, Intent, Order, OrderType, Product, Side, Tick
from ..storage import dec
from ..validation import validate_intent
from .dispatch import CallResult
from .registry import Live, Registry

log = logging.getLogger(__name__)
OPEN_STATUSES = ("NEW", "SUBMITTED", "UNKNOWN", "OPEN", "PARTIAL")
# hooks the engine does not wait for: queued on the strategy's thread, their intents acted on when they come
POSTED = {"strategy_on_tick": "on_tick", "strategy_on_clock": "on_clock", "strategy_on_order": "on_order"}
FIELD_TYPES = {"action": ExecutionType, "side": Side, "order_type": OrderType, "product": Product}


@dataclass(frozen=True)
class Asked:
    """The intents a strategy returned, or why there are none to act on."""

    intents: tuple[Intent, ...] = ()
    error: Optional[str] = None
    version: Optional[str] = None
    status: AlertStatus = AlertStatus.FAILED  # how an alert ends when error is set
    as_sent: bool = False  # the alert's own legs (no strategy_on_alert rewrote them): alert_positions counts them


def check_intents(value: Any) -> tuple[list[Intent], list[str]]:
    """What a hook returned, as intents; or the problems that make it unusable."""
    if value is None:
        return [], []
    items = [value] if isinstance(value, Intent) else value
    if not isinstance(items, (list, tuple)):
        return [], [f"returned {type(value).__name__}; expected a list of Intent, one Intent or None"]
    problems: list[str] = []
    for n, item in enumerate(items):
        if not isinstance(item, Intent):
            problems.append(f"intent[{n}]: expected an Intent, found {type(item).__name__}")
            continue
        for name, typ in FIELD_TYPES.items():
            if not isinstance(getattr(item, name), typ):
                problems.append(f"intent[{n}].{name}: expected {typ.__name__}, found {getattr(item, name)!r}")
        for name in ("price", "trigger_price"):
            if getattr(item, name) is not None and not isinstance(getattr(item, name), Decimal):
                problems.append(f"intent[{n}].{name}: expected Decimal or None, found {getattr(item, name)!r}")
        if not problems:
            problems += [str(p) for p in validate_intent(item, f"intent[{n}]")]
    return (list(items) if not problems else []), problems


class Mail:
    """What waits for one strategy's thread: the latest tick per symbol, the latest clock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ticks: dict[tuple[str, str], Tick] = {}
        self.tick_queued = False  # a tick call is queued: it takes the latest tick when it starts
        self.clock: Any = None
        self.clock_queued = False
        self.coalesced = 0  # ticks replaced by a newer one for the same symbol before the strategy saw them


class StrategyRegistry(Registry):
    kind = "strategy"
    # The engine's way to turn intents into orders, on the engine thread: act(strategy, asked, source).
    act: Optional[Callable[[str, Asked, str], None]] = None

    def _start(self, live: Live, state: dict) -> CallResult:
        cand = live.candidate
        params = dict(cand.meta.get("params", {}))
        live.ctx = StrategyContext(cand.name, cand.version, live.generation, MappingProxyType(params), dict(state),
                                   logging.getLogger(f"strategy.{cand.name}"), tuple(cand.meta.get("symbols", [])))
        live.saved = json.dumps(state, sort_keys=True, default=str)  # type: ignore[attr-defined]
        live.mail = Mail()
        self.refresh(live.ctx)
        if "strategy_validate" in cand.hooks:
            r = live.caller.call("strategy_validate", cand.hooks["strategy_validate"], {"params": params})
            if not r.ok:
                return r
            if r.value:
                problems = r.value if isinstance(r.value, (list, tuple)) else [r.value]
                return CallResult(error="strategy_validate: " + "; ".join(map(str, problems)))
        if "strategy_start" in cand.hooks:
            live.started = True
            return live.caller.call("strategy_start", cand.hooks["strategy_start"], {"ctx": live.ctx})
        return CallResult()

    def _stop(self, live: Live, reason: str) -> None:
        fn = live.candidate.hooks.get("strategy_stop")
        if fn is not None:
            r = live.caller.call("strategy_stop", fn, {"ctx": live.ctx, "reason": reason})
            if not r.ok:
                self.emit("plugin_error", f"strategy {live.label}: {r.error}", "error", live.candidate.name, None)

    def _snapshot(self, live: Live) -> Optional[dict]:
        fn = live.candidate.hooks.get("strategy_snapshot")
        if fn is not None:
            r = live.caller.call("strategy_snapshot", fn, {"ctx": live.ctx})
            if r.ok and isinstance(r.value, dict):
                return r.value
            if r.ok and r.value is not None:
                return {"value": r.value}
        return live.ctx.state if live.ctx is not None else None

    def refresh(self, ctx: StrategyContext) -> None:
        """Give the context the strategy's own positions, unfinished orders and last ticks."""
        rows = self.storage.rows("select * from positions where strategy = ? and net_qty != 0", (ctx.name,))
        ctx.positions = tuple(Holding(r["exchange"], r["symbol"], Product(r["product"]), r["net_qty"],
                                      dec(r["avg_price"]), dec(r["realized_pnl"])) for r in rows)
        marks = ",".join("?" * len(OPEN_STATUSES))
        ctx.open_orders = tuple(Order.from_row(r) for r in self.storage.rows(
            f"select * from orders where strategy = ? and status in ({marks}) order by rowid", (ctx.name, *OPEN_STATUSES)))
        keys = set(ctx.symbols) | {f"{h.exchange}:{h.symbol}" for h in ctx.positions}
        ticks = {}
        for key in keys:
            ex, sym = key.split(":", 1)
            q = self.storage.one("select ltp from quotes where exchange = ? and symbol = ?", (ex, sym))
            if q:
                ticks[key] = Tick(ex, sym, Decimal(q["ltp"]))
        ctx.ticks = MappingProxyType(ticks)

    def ask(self, live: Live, hook: str, **kwargs: Any) -> Asked:
        """Call one hook of one running version; check what it returns; save its state if it changed.

        strategy_on_alert (and any hook not in POSTED) is waited for, at most the budget. The POSTED hooks
        are queued on the strategy's own thread and answered at once with no intents: their intents go to
        `act` on the engine thread when the call ends within its budget. Ticks coalesce per symbol.
        """
        fn = live.candidate.hooks.get(hook)
        if fn is None:
            return Asked(version=live.candidate.version)
        if hook in POSTED:
            self._post(live, hook, fn, kwargs)
            return Asked(version=live.candidate.version)
        result = live.caller.call(hook, fn, lambda: self._args(live, kwargs),
                                  after=lambda: self._save_state_if_changed(live, here=True))
        intents, result = self._usable(hook, result)
        self.record_call(live, hook, result)  # once per call: unusable intents are its failure (the breaker counts)
        entry = self.entries.get(live.candidate.name)
        if entry is None or entry.live is not live:
            return Asked(error=f"{live.label} was retired during {hook}; its intents are dropped",
                         version=live.candidate.version)
        if not result.ok:
            return Asked(error=f"{live.label}: {result.error}", version=live.candidate.version)
        return Asked(tuple(intents), version=live.candidate.version)

    @staticmethod
    def _usable(hook: str, result: CallResult) -> tuple[list, CallResult]:
        """The intents a call returned, and its result: a failure if what it returned cannot be used."""
        if not result.ok:
            return [], result
        intents, problems = check_intents(result.value)
        if problems:
            return [], replace(result, value=None, error=f"{hook} returned unusable intents: " + "; ".join(problems))
        return intents, result

    def _args(self, live: Live, kwargs: dict) -> dict:
        """On the strategy's thread, as its call starts: the context as it is now, and the arguments."""
        self.refresh(live.ctx)
        return {"ctx": live.ctx, **kwargs}

    # ---- posted hooks: the engine never waits for them ----
    def _post(self, live: Live, hook: str, fn: Any, kwargs: dict) -> None:
        mail: Mail = live.mail
        done = lambda result: self._done(live, hook, result)  # noqa: E731
        if hook == "strategy_on_tick":
            tick = kwargs["tick"]
            with mail.lock:
                key = (tick.exchange, tick.symbol)
                mail.coalesced += key in mail.ticks
                mail.ticks[key] = tick
                if mail.tick_queued:
                    return  # the queued call takes this tick (the latest for its symbol) when it starts
                mail.tick_queued = True
            self._post_tick(live, fn)
        elif hook == "strategy_on_clock":
            with mail.lock:
                mail.clock = kwargs["now"]
                if mail.clock_queued:
                    return
                mail.clock_queued = True

            def clock() -> Optional[dict]:
                with mail.lock:
                    now, mail.clock, mail.clock_queued = mail.clock, None, False
                return self._args(live, {"now": now})
            live.caller.post(hook, fn, clock, done)
        else:  # every order change counts: no coalescing, in order
            live.caller.post(hook, fn, lambda: self._args(live, kwargs), done)

    def _post_tick(self, live: Live, fn: Any) -> None:
        """One call for one symbol's latest tick; the next symbol's waits behind whatever else is queued."""
        mail: Mail = live.mail

        def take() -> Optional[dict]:
            with mail.lock:
                if not mail.ticks:
                    mail.tick_queued = False
                    return None
                tick = mail.ticks.pop(next(iter(mail.ticks)))
                more = bool(mail.ticks)
                mail.tick_queued = more
            if more:
                self._post_tick(live, fn)
            return self._args(live, {"tick": tick})

        live.caller.post("strategy_on_tick", fn, take, lambda result: self._done(live, "strategy_on_tick", result))

    def _done(self, live: Live, hook: str, result: CallResult) -> None:
        """On the strategy's thread: a posted call ended within its budget. Its intents go to the engine."""
        intents, result = self._usable(hook, result)
        self.record_call(live, hook, result)
        if not result.ok:
            return
        self._save_state_if_changed(live, here=True)
        if intents:
            asked = Asked(tuple(intents), version=live.candidate.version)
            self.submit(lambda: self._deliver(live, hook, asked))

    def _deliver(self, live: Live, hook: str, asked: Asked) -> None:
        """On the engine thread: act on a posted call's intents, unless its version was retired meanwhile."""
        entry = self.entries.get(live.candidate.name)
        if entry is None or entry.live is not live or entry.disabled:
            self.emit("plugin_late", f"strategy {live.label} was retired before the engine could act on its {hook}; "
                      f"{self._count(asked.intents)} dropped", "warning", live.candidate.name,
                      {"hook": hook, "version": live.candidate.version})
            return
        act = self.act or self._engine_act()
        if act is None:
            self.emit("plugin_error", f"strategy {live.label}: {hook} returned {self._count(asked.intents)}, but the "
                      "engine has not wired StrategyRegistry.act; they are dropped", "error", live.candidate.name,
                      {"hook": hook})
            return
        act(live.candidate.name, asked, POSTED[hook])

    def _engine_act(self) -> Optional[Callable[[str, Asked, str], None]]:
        """Until the engine sets `act`: the _act of the engine whose submit() we were given."""
        engine = getattr(self.submit, "__self__", None)
        return getattr(engine, "_act", None)

    @staticmethod
    def _count(intents: Any) -> str:
        n = len(intents) if isinstance(intents, (list, tuple)) else 0 if intents is None else 1
        return f"{n} intent{'' if n == 1 else 's'}"

    def dropped(self, result: CallResult) -> str:
        if not result.ok:
            return f"its error ({result.error}) was"
        return f"its result ({self._count(result.value)}) was"

    def coalesced(self, name: str) -> int:
        """How many ticks this strategy's running version never saw because a newer one came first."""
        live = self.live(name)
        return live.mail.coalesced if live is not None and live.mail is not None else 0

    def _save_state_if_changed(self, live: Live, here: bool = False) -> None:
        """here: on the strategy's own thread (strategy_snapshot is called directly, not queued behind itself)."""
        try:
            text = json.dumps(live.ctx.state, sort_keys=True, default=str)
        except (TypeError, ValueError, RuntimeError) as e:
            log.warning("strategy %s: state not readable: %s", live.label, e)
            return
        if text != getattr(live, "saved", None):
            live.saved = text  # type: ignore[attr-defined]
            self.persist_state(live, self._snapshot_here(live) if here else None)

    def _snapshot_here(self, live: Live) -> Optional[dict]:
        fn = live.candidate.hooks.get("strategy_snapshot")
        if fn is None:
            return live.ctx.state
        try:
            value = fn(ctx=live.ctx) if "ctx" in inspect.signature(fn).parameters else fn()
        except Exception as e:
            self.emit("plugin_error", f"strategy {live.label}: strategy_snapshot raised {type(e).__name__}: {e}",
                      "error", live.candidate.name, {"hook": "strategy_snapshot"})
            return live.ctx.state
        return value if isinstance(value, dict) else {"value": value} if value is not None else live.ctx.state

    def admit(self, alert: AlertRequest, require_known: bool) -> Asked:
        """Whether the alert's strategy may take it (error set if not), with the running version."""
        entry = self.entries.get(alert.strategy)
        if entry is not None and entry.disabled:
            exits_only = alert.execution_type is ExecutionType.EXIT or (
                alert.execution_type is ExecutionType.POSITION and all(t.target == 0 for t in alert.targets))
            return Asked() if exits_only else Asked(
                error=f"strategy {alert.strategy} is disabled: only EXIT alerts (and flat targets) are executed",
                status=AlertStatus.REFUSED)
        if entry is not None and entry.live is not None:
            return Asked(version=entry.live.candidate.version)
        if entry is not None and entry.path is not None:
            return Asked(error=f"strategy {alert.strategy} is not running: {entry.error}")
        if require_known:
            known = sorted(e.name for e in self.entries.values() if e.live is not None)
            return Asked(error=f"strategy_name: expected one of the loaded strategies ({', '.join(known) or 'none'}) "
                               f"because REQUIRE_KNOWN_STRATEGY=true, found {alert.strategy!r}",
                         status=AlertStatus.REJECTED)
        return Asked()

    def route_alert(self, alert: AlertRequest, require_known: bool) -> Asked:
        """The intents for an alert: from its plugin, else the built-in passthrough."""
        admitted = self.admit(alert, require_known)
        if admitted.error:
            return admitted
        entry = self.entries.get(alert.strategy)
        live = entry.live if entry is not None and not entry.disabled else None
        if live is not None and "strategy_on_alert" in live.candidate.hooks:
            return self.ask(live, "strategy_on_alert", alert=alert)
        return Asked(tuple(passthrough.strategy_on_alert(None, alert)), version=admitted.version, as_sent=True)

    def subscribers(self, tick: Tick) -> list[Live]:
        """Running strategies with strategy_on_tick that want this symbol or hold it."""
        key = f"{tick.exchange}:{tick.symbol}"
        return [l for l in self.running() if "strategy_on_tick" in l.candidate.hooks
                and (key in l.ctx.symbols or l.ctx.position(tick.exchange, tick.symbol))]

    def with_hook(self, hook: str) -> list[Live]:
        return [l for l in self.running() if hook in l.candidate.hooks]

    def params(self, name: str) -> dict:
        """The running version's params (risk reads its per-strategy limits there)."""
        live = self.live(name)
        return dict(live.ctx.params) if live is not None and live.ctx is not None else {}

    def working(self, name: str) -> bool:
        """The strategy's thread is in a call now (its alerts wait their turn without holding up others)."""
        live = self.live(name)
        return live is not None and live.caller.working()

    def live(self, name: str) -> Optional[Live]:
        entry = self.entries.get(name)
        return entry.live if entry else None
