"""The runtime: builds storage, broker, engine and order service from Settings; starts and stops them."""
from __future__ import annotations

import logging
import threading
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from functools import cached_property
from typing import Any, Callable, Optional

from . import __version__, backup, views
from .brokers.base import Broker
from .broker_session import load_token, set_session_state
from .brokers.paper import PaperBroker
from .config import Settings
from .engine import Engine
from .host_access import HostAccess
from .inbox import Inbox
from .locks import FileLock
from .orders import BrokerGateway, OrderSender
from .protect import HELD_READ_WAIT_S
from .market import MarketClock
from .wakeups import EngineWakeups, WorkerWakeups
from .risk import Limits, RiskGate
from .storage import Storage
from .notify import EventPump, NotifierRegistry
from .plugins.reloader import Reloader
from .plugins.strategies import StrategyRegistry
from .watcher import Watcher

log = logging.getLogger(__name__)


class EngineBusy(RuntimeError):
    """Another process already runs the engine on this DATA_DIR."""


def make_broker(settings: Settings, storage: Storage, timeout_s: float = 5.0,
                after_market: Callable[[str], bool] = lambda exchange: False) -> Broker:
    if settings.paper:
        return PaperBroker(settings.data_dir / "paper.sqlite", settings.MARKET_PROTECTION_PCT)
    from .brokers.shoonya import ShoonyaBroker
    from .instruments import InstrumentMaster
    master = InstrumentMaster(settings.data_dir / "instruments", settings.SHOONYA_SYMBOLS_URL)
    broker = ShoonyaBroker(settings.SHOONYA_API_URL, settings.SHOONYA_WS_URL, master.load_cached(),
                           settings.MARKET_PROTECTION_PCT, timeout_s=timeout_s, algo_id=settings.ALGO_ID,
                           ltp_max_age_s=float(settings.LTP_MAX_AGE_S),
                           after_market=after_market,
                           on_session=lambda state, why: set_session_state(storage, state, why))

    def refresh_instruments() -> None:  # downloads can be slow: never inside the worker's boot
        broker.instruments = master.refresh()
        for problem in master.problems:
            storage.write(lambda db, p=problem: Storage.add_event(db, "instruments", p, "warning"))
    threading.Thread(target=refresh_instruments, name="instruments", daemon=True).start()
    saved = ({"access_token": settings.SHOONYA_ACCESS_TOKEN, "uid": settings.USER_ID}
             if settings.SHOONYA_AUTH == "token" else load_token(settings.data_dir))
    if saved:
        broker.use_token(saved["access_token"], saved["uid"], saved.get("actid"))
        try:
            broker.check_session()
        except Exception as e:  # the broker may be down at start: say so, do not die
            broker.note_session("expired", f"could not check the session at start: {e}")
    else:
        broker.note_session("expired", "no saved session")
    return broker


class Runtime:
    """Everything one host process needs; the engine part runs only where the engine lock is held."""

    def __init__(self, settings: Settings, storage: Optional[Storage] = None, broker: Optional[Broker] = None,
                 broker_timeout_s: float = 5.0, unknown_grace_s: Optional[float] = None, plugin_budget_s: float = 1.0,
                 breaker_limit: int = 5, watch_plugins: bool = True, market_hours: Optional[bool] = None):
        self.settings = settings
        self.market_hours = market_hours  # None: live mode keeps entries to the exchange's session (tests: False)
        self._storage = storage
        self._broker = broker
        self.broker_timeout_s = broker_timeout_s
        self.clock_offset = timedelta(0)
        self.unknown_grace_s = settings.ORDER_LOST_AFTER_S if unknown_grace_s is None else unknown_grace_s
        self.plugin_budget_s = plugin_budget_s
        self.breaker_limit = breaker_limit
        self.watch_plugins = watch_plugins
        self.strategies: Optional[StrategyRegistry] = None
        self.notifiers: Optional[NotifierRegistry] = None
        self.reloader: Optional[Reloader] = None
        self.pump: Optional[EventPump] = None
        self.feed = None
        self.lock = FileLock(settings.data_dir / "engine.lock")
        self.engine: Optional[Engine] = None
        self.broker: Optional[Broker] = None
        self.gateway: Optional[BrokerGateway] = None
        self.sender: Optional[OrderSender] = None
        self._stop_waiting = threading.Event()
        self._worker_wakeups: Optional[WorkerWakeups] = None
        self._engine_wakeups: Optional[EngineWakeups] = None

    @cached_property
    def storage(self) -> Storage:
        """Opened on first use, so building the app touches no file."""
        return self._storage or Storage(self.settings.db_path, backup.folder_of(self.settings.data_dir),
                                        self.settings.DISK_MIN_FREE_MB)

    @cached_property
    def inbox(self) -> Inbox:
        inbox = Inbox(self.storage, self.settings.DEDUPE_WINDOW_S, self.settings.ALERT_ID_TTL_S)
        self._worker_wakeups = WorkerWakeups(self.settings.data_dir, inbox.decided)
        inbox.tell = self._worker_wakeups.tell  # used only while the engine runs in another process
        return inbox

    @cached_property
    def gate(self) -> RiskGate:
        limits = Limits.from_settings(self.settings)
        if self.market_hours is not None:
            limits = replace(limits, market_hours=self.market_hours)
        gate = RiskGate(self.storage, limits, MarketClock(self.settings.MARKET_HOLIDAYS))
        gate.now = self.now
        return gate

    def _after_market(self, exchange: str) -> bool:
        """An order to this exchange goes as an after-market order: ALLOW_AMO, live, and the exchange closed."""
        limits = self.gate.limits
        return limits.allow_amo and limits.market_hours and not self.gate.clock.is_open(exchange, self.now())

    def now(self) -> datetime:
        """The host's clock (tests move it with `clock_offset`)."""
        return datetime.now(timezone.utc) + self.clock_offset

    @property
    def engine_running(self) -> bool:
        return self.engine is not None and self.engine.running

    def start_engine(self) -> None:
        """Take the engine lock and start the engine; raise EngineBusy if another process has it."""
        if not self.lock.acquire():
            raise EngineBusy(f"another strategy-host (pid {self.lock.holder()}) already runs the engine on "
                             f"{self.settings.data_dir.resolve()}; stop it or use another DATA_DIR")
        try:
            self.broker = self._broker or make_broker(self.settings, self.storage, self.broker_timeout_s,
                                                      self._after_market)
            self.gateway = BrokerGateway(self.broker, self.broker_timeout_s)
            self.sender = OrderSender(self.storage, self.gateway)
            plugins = Path(self.settings.PLUGINS_DIR)
            limits = (self.plugin_budget_s, self.breaker_limit, self._emit)
            self.strategies = StrategyRegistry(self.storage, plugins / "strategies", *limits)
            access = HostAccess(self.storage, self.inbox, self.gate, self.settings, lambda: self.engine_running)
            self.notifiers = NotifierRegistry(self.storage, plugins / "notifiers", *limits, settings=self.settings,
                                              access=access)
            engine = Engine(self.storage, self.inbox, self.gate, self.sender,
                            Watcher(self.storage, self.unknown_grace_s), self.strategies,
                            lambda: self.gateway.call("order_book", self.broker.order_book),
                            self.broker.apply_tick,
                            self.settings.ALERT_MAX_AGE_S, self.settings.REQUIRE_KNOWN_STRATEGY,
                            broker_positions=lambda: self.gateway.call("positions", self.broker.positions),
                            risk_poll_s=self.settings.RISK_POLL_S, now=self.now,
                            tick_jump_pct=self.settings.TICK_JUMP_PCT, flatten_scope=self.settings.RISK_FLATTEN_SCOPE)
            engine.plugin_registries["notifier"] = self.notifiers
            engine.risk.reprice_s, engine.risk.protection_pct = (self.settings.EXIT_REPRICE_S,
                                                                 self.settings.MARKET_PROTECTION_PCT)
            engine.protect.protection_pct, engine.protect.trail_interval_s = (self.settings.MARKET_PROTECTION_PCT,
                                                                              self.settings.TRAIL_MIN_INTERVAL_S)
            # a held exit waits for a read of the books (three calls) even from a broker slow up to its timeout
            engine.protect.read_wait_s = max(HELD_READ_WAIT_S, 3 * self.broker_timeout_s + 1)
            self.sender.on_result = engine.order_changed
            engine.broker, engine.data_dir = self.broker, self.settings.data_dir
            engine.summary_time = self.settings.DAILY_SUMMARY_TIME
            engine.daily.backup = backup.DailyBackup(
                self.settings.db_path, backup.folder_of(self.settings.data_dir), self.settings.DISK_MIN_FREE_MB,
                lambda kind, message, severity, data: self._emit(kind, message, severity, None, data))
            if not self.settings.paper:  # feed updates can be lost around reconnects: read the book often
                engine.reconcile_every_s = 2.0
                engine.preopen = self.settings.SHOONYA_PREOPEN_CHECK
                engine.gateway_call = self.gateway.call
            if not self.settings.paper:
                engine.instruments = lambda: self.broker.instruments
            for registry in (self.strategies, self.notifiers):
                registry.submit = engine.submit
            self.reloader = Reloader([self.strategies, self.notifiers], engine.submit)
            self.broker.start(engine.on_broker_update)
            if not self.settings.paper:
                self.feed = self._make_feed(engine)
                self.feed.start()
                engine.on_session_restored = lambda: self.feed.reconnect("a new broker session")
            self.sender.start()
            engine.start(self.reloader.scan())
            self.engine = engine
            self._engine_wakeups = EngineWakeups(self.settings.data_dir, engine.stored_elsewhere)
            self.inbox.answered = self._engine_wakeups.decided
            if self.watch_plugins:
                self.reloader.start()
            self.pump = EventPump(self.storage, self.notifiers)
            self.pump.start()
            self._emit("host_started", f"strategy-host {__version__} started: {self.settings.BROKER} mode",
                       "info", None, {"mode": self.settings.BROKER, "version": __version__})
        except Exception:
            self.lock.release()
            raise
        log.info("engine started (broker %s, data %s)", self.broker.name, self.settings.data_dir)

    def _make_feed(self, engine: Engine) -> Any:
        from .brokers.shoonya_feed import ShoonyaFeed
        clock = self.gate.clock

        def wanted() -> set[tuple[str, str]]:
            symbols = {tuple(s.split(":", 1)) for live in self.strategies.running()
                       for s in live.candidate.meta.get("symbols", [])}
            return symbols | views.traded_symbols(self.storage)  # held, or with a working order

        self._learn_freezes(wanted)
        return ShoonyaFeed(self.broker, wanted, engine.on_ticks, engine.on_broker_update,
                           stall_s=self.settings.FEED_STALL_S,
                           market_open=lambda: any(clock.is_open(ex, self.now())  # the exchanges we watch
                                                   for ex in ({ex for ex, _ in wanted()} or {"NSE"})),
                           emit=lambda kind, message, severity: self._emit(kind, message, severity, None, None),
                           on_open=engine.request_reconcile)

    def _learn_freezes(self, wanted: Any, every_s: float = 10.0) -> None:
        """Live mode, in the background: the freeze quantity of every symbol held, worked or watched (from
        GetSecurityInfo), so that an exit above it is sliced before it is ever needed."""
        def run() -> None:
            while not self._stop_waiting.wait(every_s):
                for exchange, symbol in sorted(wanted()):
                    try:
                        self.broker.learn_freeze(exchange, symbol)
                    except Exception as e:  # the session may be out: try again on the next round
                        log.debug("freeze quantity of %s:%s not learned: %s", exchange, symbol, e)
        threading.Thread(target=run, name="freeze-quantities", daemon=True).start()

    def _emit(self, kind: str, message: str, severity: str, strategy: Optional[str], data: Optional[dict]) -> None:
        self.storage.write(lambda db: Storage.add_event(db, kind, message, severity, strategy, data))

    def start_engine_when_free(self, poll_s: float = 1.0) -> threading.Thread:
        """For extra gunicorn workers: take over the engine when its holder goes away."""
        def run() -> None:
            while not self._stop_waiting.is_set() and not self.engine_running:
                try:
                    self.start_engine()
                except EngineBusy:
                    self._stop_waiting.wait(poll_s)
        t = threading.Thread(target=run, name="engine-standby", daemon=True)
        t.start()
        return t

    def stop(self, timeout: float = 10.0) -> None:
        """Stop intake from the inbox, finish in-flight work, release the engine lock."""
        self._stop_waiting.set()
        if self.engine is not None:
            self.reloader.stop()
            self.engine.stop(timeout)
            if self.engine.daily.backup is not None:  # a backup being written is finished, not cut off
                self.engine.daily.backup.join(timeout)
            self.sender.stop(timeout)
            self.engine.flush()
            self.strategies.shutdown()
            self._emit("host_stopped", f"strategy-host {__version__} stopped: "
                       + ("open positions stay at the broker" if views.positions(self.storage, include_flat=False)
                          else "no open positions"), "warning", None, None)
            self.pump.stop()
            self.pump.pump()  # the last events (shutdown, final fills) still reach the notifiers
            self.notifiers.shutdown()
            if self.feed is not None:
                self.feed.stop()
            self.broker.stop()
            self.gateway.shutdown()
            self.engine = None
            log.info("engine stopped")
        if "inbox" in self.__dict__:  # never made: nothing to undo (and no database to open for it)
            self.inbox.answered = None
        for wakeups in (self._engine_wakeups, self._worker_wakeups):
            if wakeups is not None:
                wakeups.close()
        self._engine_wakeups = None
        self.lock.release()
