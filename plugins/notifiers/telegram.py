"""Telegram notifier: short messages for the events that matter, and safe remote control.

Runs python-telegram-bot on its own thread and event loop; the host only hands it events, and a
bounded queue means nothing on the trading path ever waits for Telegram. Messages respect
Telegram's per-chat rate, obey retry_after, retry transient failures with backoff, and a long
outage collapses into one "N messages not sent" notice. Commands are taken only from
TELEGRAM_ALLOWED_USERS in TELEGRAM_CHAT_ID, and go through the host's command path like the API.

Commands never wait for sending: a command is read, done, and its reply queued, and the next command
is read at once, whatever holds the outgoing messages (pacing, a 429's retry_after, an outage). One
sender sends replies before notifications, within the same per-chat limits.
"""
from __future__ import annotations

import asyncio
import html
import logging
import secrets
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any, Callable, Optional

from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.constants import FloodLimit
from telegram.error import BadRequest, Conflict, Forbidden, InvalidToken, NetworkError, RetryAfter
from telegram.request import HTTPXRequest
from telegram.warnings import PTBUserWarning

from host import hookimpl
from host.display import inr, ist, money_text, order_price, qty

VERSION = "1.0"
SEVERITY = {"info": 0, "warning": 1, "error": 2}
PLUGIN_ACTIONS = ("reload", "disable", "enable")  # /reload <strategy> and so on
QUEUE_MAX = 200               # messages waiting; more are counted as dropped
COLLAPSE_AFTER_S = 10.0       # an outage this long: what waited is summed up in one notice, not replayed
BACKOFF_S = (1, 2, 4, 8, 15)  # between attempts while Telegram is unreachable
REPLY_RETRY_S = 2.0           # ... but a waiting command reply is tried again at least this often
POLL_RETRY_S = (0.5, 1, 2, 5)  # between long polls that failed: commands are read soon after an outage
REFUSED_RETRY_S = (2, 5, 15, 30, 60)  # between polls while Telegram refuses the token (401) or fails oddly
POLL_S = 10                   # long-poll timeout
BATCH_CHARS = 3500            # waiting messages are joined into one, up to this size (Telegram: 4096)
REPLY_MAX = 50                # command replies waiting; more are logged and not sent
START_WAIT_S = 0.3            # notifier_start waits this long at most for the bot's loop (the host allows 1 s)
MAX_HOLD_S = 3600.0           # a stored 429 wait longer than this (a clock jump) is not believed
# Telegram's flood limits: ~1 message a second in a chat, ~20 a minute in a group. Notifications use at
# most 16 of a group's 20 (one per 3.75 s), so that command replies always have room.
CHAT_GAP_S = 1.0 / FloodLimit.MESSAGES_PER_SECOND_PER_CHAT
GROUP_PER_MIN = int(FloodLimit.MESSAGES_PER_MINUTE_PER_GROUP)
GROUP_NOTICES_PER_MIN = GROUP_PER_MIN - 4
GROUP_NOTICE_GAP_S = 60.0 / GROUP_NOTICES_PER_MIN
HELP = ("/status /pnl /positions /orders /risk /strategies\n/halt /reduceonly /resume /exitall\n"
        "/reload &lt;strategy&gt; /disable &lt;strategy&gt; /enable &lt;strategy&gt;")

# event kind (or prefix) -> category, title
KINDS: dict[str, tuple[str, str]] = {
    "host_started": ("system", "Host started"), "host_stopped": ("system", "Host stopped"),
    "login_failed": ("system", "Dashboard login failed"), "logout_all": ("system", "Dashboard: logged out everywhere"),
    "login_unlocked": ("system", "Dashboard logins unlocked"),
    "telegram_update_skipped": ("system", "TELEGRAM MESSAGE NOT READ"),
    "backup_failed": ("system", "DATABASE BACKUP FAILED"), "backup_": ("system", "Database backup"),
    "database": ("system", "Database"),
    "broker_session_valid": ("broker", "Broker session restored"),
    "broker_session_expired": ("broker", "Broker session lost"),
    "broker_session_expiring": ("broker", "Broker session expiring"),
    "broker_session_": ("broker", "Broker session"), "preopen_check": ("broker", "Pre-open check"),
    "feed_": ("broker", "Broker feed"),
    "alert_duplicate": ("alerts", "Alert not executed: duplicate"), "alert_blocked": ("alerts", "Alert blocked by the guard"),
    "alert_refused": ("alerts", "Alert refused"), "alert_rejected": ("alerts", "Alert rejected: invalid"),
    "alert_failed": ("alerts", "Alert failed"),
    "strategy_name_case": ("alerts", "Alert for a strategy name in another case"),
    "order_filled": ("orders", "Filled"), "order_partial": ("orders", "Partially filled"),
    "order_rejected": ("orders", "Order rejected"), "order_cancelled": ("orders", "Order cancelled"),
    "order_unknown": ("orders", "Order outcome unknown"), "order_lost": ("orders", "Order lost"),
    "manual_order": ("orders", "Order placed outside the host"), "cancel_failed": ("orders", "Cancel failed"),
    "exit_all": ("orders", "Exit all"), "exit_all_dropped": ("orders", "RISK'S FOLLOW-UP DROPPED: CHECK THE POSITIONS"),
    "exit_repriced": ("orders", "Exit moved towards the market"), "exit_rejected": ("orders", "EXIT REJECTED"),
    "exit_capped": ("orders", "Exit cut to the broker's position"),
    "adjust_capped": ("orders", "ADJUST cut to what the strategy's alerts add up to"),
    "exit_unsure": ("orders", "EXIT MAY HAVE LEFT A POSITION OPEN"),
    "exit_not_moved": ("orders", "EXIT NOT MOVED TO THE MARKET"),
    "target_exit_rejected": ("orders", "TARGET EXIT REJECTED"), "order_held": ("orders", "Order held for the login"),
    "reprice_failed": ("orders", "Exit could not be moved"), "modify_failed": ("orders", "Order change failed"),
    "order_expired": ("orders", "Order expired"), "order_found": ("orders", "Lost order found at the broker"),
    "order_doubled": ("orders", "ORDER AT THE BROKER TWICE"), "closed_outside": ("orders", "Closed outside the host"),
    "manual_trade": ("orders", "Manual trade"), "internal_cross": ("orders", "Strategies crossed internally"),
    "position_target": ("alerts", "Position target"), "stop_gapped": ("orders", "STOP GAPPED"),
    "risk_override": ("risk", "Breach overridden"), "risk_param": ("risk", "Bad risk parameter"),
    "stop_placed": ("orders", "Stop loss placed"), "stop_moved": ("orders", "Trailing stop moved"),
    "stop_hit": ("orders", "STOP LOSS HIT"), "target_hit": ("orders", "Target hit"),
    "stop_cancelled_outside": ("orders", "Stop loss cancelled outside the host"),
    "stop_rejected": ("orders", "Stop loss rejected"), "stop_expired": ("orders", "Stop loss expired"),
    "stop_missing": ("orders", "STOP LOSS GONE FROM THE BROKER'S BOOK"),
    "stop_overfilled": ("orders", "STOP FILLED AFTER ITS POSITION CLOSED"),
    "stop_not_moved": ("orders", "STOP NOT MOVED: CANCELLED, POSITION EXITED AT MARKET"),
    "stop_triggered": ("orders", "Stop-loss exit triggered"),
    "order_missing": ("orders", "Order gone from the broker's book"), "order_not_sent": ("orders", "ORDER NOT SENT"),
    "order_late_fill": ("orders", "FILL REPORTED AFTER THE ORDER ENDED"),
    "strategy_limits_rebased": ("risk", "Strategy MTM limits count from the new day"),
    "strategy_stoploss_hit": ("risk", "Strategy MTM stop hit"), "strategy_target_hit": ("risk", "Strategy MTM target hit"),
    "risk_warning": ("risk", "Risk warning"), "risk_breach": ("risk", "DAILY MAX LOSS BREACHED"),
    "risk_violation": ("risk", "Risk violation"), "risk_cooldown": ("risk", "Cooldown"),
    "risk_strategy_breach": ("risk", "Strategy max loss"), "risk_status": ("risk", "Risk status"),
    "risk_flatten_dropped": ("risk", "RISK'S EXIT NOT DONE: CHECK THE POSITIONS"),
    "risk_flatten_failed": ("risk", "RISK'S EXIT FAILED: TRIED AGAIN"),
    "risk_": ("risk", "Risk"), "trading_state": ("risk", "Trading state"),
    "plugin_loaded": ("plugins", "Plugin running"), "plugin_failed": ("plugins", "Plugin failed to load"),
    "plugin_disabled": ("plugins", "Plugin disabled"), "plugin_enabled": ("plugins", "Plugin enabled"),
    "plugin_removed": ("plugins", "Plugin removed"), "plugin_": ("plugins", "Plugin"),
    "strategy_": ("plugins", "Strategy"),
    "daily_summary": ("summary", "Day summary"),
}
ICON = {"info": "ℹ️", "warning": "⚠️", "error": "🛑"}


def classify(kind: str) -> Optional[tuple[str, str]]:
    """The category and title of an event kind; None for kinds Telegram never gets."""
    if kind in KINDS:
        return KINDS[kind]
    prefix = next((k for k in KINDS if k.endswith("_") and kind.startswith(k)), None)
    return KINDS[prefix] if prefix else None


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def render(event: dict, link: Callable[[str], str]) -> Optional[tuple[str, str]]:
    """(category, HTML text) for one event, or None when it is not for Telegram."""
    found = classify(event["kind"])
    if found is None:
        return None
    category, title = found
    icon = "✅" if event["kind"] == "order_filled" else ICON.get(event["severity"], "")
    lines = [f"{icon} <b>{esc(title)}</b>" + (f" · {esc(event['strategy'])}" if event.get("strategy") else "")]
    if event["kind"] == "daily_summary" and event.get("data"):
        lines += summary_lines(event["data"])
    else:
        lines.append(esc(event["message"]))
    needs_login = (event["kind"].startswith("broker_session") or event["kind"] == "preopen_check")
    if needs_login and event["kind"] != "broker_session_valid" and event["severity"] != "info":
        lines.append(f'<a href="{esc(link("/broker"))}">Connect broker</a>')
    return category, "\n".join(lines)


def summary_lines(d: dict) -> list[str]:
    orders, alerts = d.get("orders", {}), d.get("alerts", {})
    out = [f"{esc(d.get('day'))}: PnL <b>{esc(inr(d.get('pnl'), signed=True))}</b> · state {esc(d.get('state'))}",
           f"orders {sum(orders.values())}: " + ", ".join(f"{esc(k.lower())} {v}" for k, v in sorted(orders.items())),
           f"alerts {sum(alerts.values())}: " + ", ".join(f"{esc(k)} {v}" for k, v in sorted(alerts.items()))]
    out += [f"• {esc(k)} {esc(inr(v, signed=True))}" for k, v in sorted(d.get("by_strategy", {}).items())]
    return out


def _update_id(body: Any) -> int:
    """A stored webhook update's id (-1 if it has none: only marked done)."""
    uid = body.get("update_id") if isinstance(body, dict) else None
    return uid if isinstance(uid, int) and not isinstance(uid, bool) else -1


def _seconds(retry_after: Any) -> float:
    return retry_after.total_seconds() if isinstance(retry_after, timedelta) else float(retry_after)


@dataclass(frozen=True)
class Reply:
    """A command's answer: a new message (with buttons, as a keyboard dict), or an edit of one."""

    text: str
    markup: Optional[dict] = None
    edit: Optional[tuple[int, int]] = None  # (chat id, message id) of the message to change

    @classmethod
    def of(cls, saved: dict) -> "Reply":
        """From its saved form (asdict), as handed to the next version or the next start."""
        edit = saved.get("edit")
        return cls(str(saved["text"]), saved.get("markup"), (int(edit[0]), int(edit[1])) if edit else None)

    @property
    def nonce(self) -> Optional[str]:
        """The confirmation its buttons answer (an /exitall question), if it has buttons."""
        try:
            return self.markup["inline_keyboard"][0][0]["callback_data"].partition(":")[2] or None
        except (TypeError, KeyError, IndexError, AttributeError):
            return None


class Pace:
    """When the next message may go to one chat: Telegram's flood limits, its retry_after, and our backoff."""

    def __init__(self, group: bool):
        self.group = group
        self.sent: deque[float] = deque(maxlen=GROUP_PER_MIN)  # the latest sends (monotonic)
        self.hold_until = 0.0  # a 429's retry_after: nothing goes before this
        self.retry_at = 0.0    # backoff after Telegram was unreachable
        self.failed_at = 0.0
        self.failures = 0

    def ready_at(self, reply: bool, stopping: bool = False) -> float:
        """The earliest time the next reply (or notification) may be sent."""
        at = max(self.hold_until, min(self.retry_at, self.failed_at + REPLY_RETRY_S) if reply else self.retry_at)
        if stopping or not self.sent:
            return at
        at = max(at, self.sent[-1] + (GROUP_NOTICE_GAP_S if self.group and not reply else CHAT_GAP_S))
        if self.group:  # at most `room` messages in any 60 s
            room = GROUP_PER_MIN if reply else GROUP_NOTICES_PER_MIN
            if len(self.sent) >= room:
                at = max(at, self.sent[-room] + 60.0)
        return at

    def delivered(self) -> None:
        self.sent.append(time.monotonic())
        self.retry_at = self.failed_at = 0.0
        self.failures = 0

    def refused(self, retry_after: float) -> None:
        self.hold_until = time.monotonic() + retry_after

    def unreachable(self) -> None:
        self.failed_at = time.monotonic()
        self.retry_at = self.failed_at + BACKOFF_S[min(self.failures, len(BACKOFF_S) - 1)]
        self.failures += 1


class TelegramNotifier:
    """One version's bot: a sender task, a receiver task, and the commands."""

    def __init__(self, ctx: Any):
        self.ctx, self.log = ctx, ctx.logger
        s = ctx.settings
        self.token = s.get("TELEGRAM_BOT_TOKEN") or ""
        self.chat = str(s.get("TELEGRAM_CHAT_ID") or "")
        self.allowed = set(s.get("TELEGRAM_ALLOWED_USERS") or ())
        self.api_url = (s.get("TELEGRAM_API_URL") or "https://api.telegram.org").rstrip("/")
        self.categories = set(s.get("TELEGRAM_CATEGORIES") or ())
        self.min_severity = SEVERITY.get(s.get("TELEGRAM_MIN_SEVERITY") or "info", 0)
        self.confirm_s = float(s.get("TELEGRAM_CONFIRM_S") or 60)
        self.mode = s.get("TELEGRAM_MODE") or "polling"
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.thread: Optional[threading.Thread] = None
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"telegram-{ctx.version}")
        self.queue: deque[str] = deque()        # notifications, oldest first
        self.replies: deque[Reply] = deque()    # command replies: sent before any notification
        self.held: Optional[tuple[str, int]] = None  # notifications joined, waiting to be tried again
        self.wake: Optional[asyncio.Event] = None
        self.pace = Pace(self.chat.startswith("-"))
        self._held_before_restart()
        self._held_by_others()  # a 429's wait told to an earlier version of this run
        self.side_calls: set[asyncio.Task] = set()
        self.dropped = int(ctx.state.get("dropped", 0))
        self.outage_since: Optional[float] = None
        self.recovered_after: Optional[float] = None
        self.confirmations: dict[str, float] = {}  # /exitall nonce -> expiry (monotonic)
        self.tasks: list[asyncio.Task] = []
        self.cancelled = False  # stop asked (on the loop): tasks made after it are cancelled at once
        self.handling: Optional[asyncio.Future] = None
        self.holding = False
        self.stopping = False
        self.stop_reason = ""  # "reload": the next version takes what is waiting (baton), not the next start
        self.took_over = False  # what the previous version left (baton) is in this one's queues
        self.untaken: Optional[list] = None  # what the previous version left, if this one never took it
        self.outstanding = 0  # messages offered and not yet sent or dropped
        self.count_lock = threading.Lock()
        self.ready = threading.Event()

    @property
    def enabled(self) -> bool:
        return bool(self.token and self.chat)

    # ---- the host's side (other threads) ----
    def start(self) -> None:
        if not self.enabled:
            self.log.info("Telegram notifier idle: set TELEGRAM_BOT_TOKEN and TELEGRAM_CHAT_ID to use it")
            return
        # the loop exists before the start returns: what is offered before it runs waits in it, never dropped
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=f"telegram-{self.ctx.version}", daemon=True)
        self.thread.start()
        self.ready.wait(START_WAIT_S)  # within the host's start budget, on a loaded machine too

    def offer(self, event: dict) -> None:
        """Called for every event: format it and queue it; never waits."""
        if not self.enabled or self.loop is None or event["kind"] == "telegram_command":
            return
        if SEVERITY.get(event["severity"], 0) < self.min_severity:
            return
        rendered = render(event, self.ctx.host.link if self.ctx.host else (lambda p: p))
        if rendered is None or rendered[0] not in self.categories:
            return
        self._count(1)
        self.loop.call_soon_threadsafe(self._enqueue, rendered[1])

    def _count(self, n: int) -> None:
        with self.count_lock:
            self.outstanding += n

    def stop(self, reason: str) -> None:
        """Stop polling at once; at shutdown first let the last messages out (briefly); hand what is
        still waiting to the next version (baton) and to the next start (state)."""
        if self.loop is None or self.thread is None:
            return
        self.stopping = True  # no more pacing: the last messages go out at once
        self.stop_reason = reason
        self.loop.call_soon_threadsafe(self._wake)
        if reason == "shutdown":
            deadline = time.monotonic() + 0.7
            while time.monotonic() < deadline and self.outstanding > 0 and self.outage_since is None:
                time.sleep(0.02)
        self.loop.call_soon_threadsafe(self._cancel)
        self.thread.join(0.8)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- the loop ----
    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except Exception:  # never take the host down
            self.log.exception("Telegram notifier stopped by an error")
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self.wake = asyncio.Event()
        self._restore(self.ctx.state.pop("pending", []))  # what the previous run had not sent
        for name in ("httpx", "telegram"):  # their INFO and DEBUG lines carry the token in URLs: before the
            logging.getLogger(name).setLevel(logging.WARNING)  # Bot is made (it logs its URLs at DEBUG)
        # the raw getUpdates after one PTB could not read (_read_raw) is on purpose (an identical filter is replaced)
        warnings.filterwarnings("ignore", message=r"Please use 'Bot.getUpdates'", category=PTBUserWarning)
        base = dict(connect_timeout=5.0, write_timeout=10.0, pool_timeout=5.0)
        self.bot = Bot(self.token, base_url=self.api_url + "/bot", base_file_url=self.api_url + "/file/bot",
                       request=HTTPXRequest(connection_pool_size=4, read_timeout=10.0, **base),
                       get_updates_request=HTTPXRequest(connection_pool_size=1, read_timeout=POLL_S + 10.0, **base))
        self.tasks = [asyncio.ensure_future(self._sender())]
        self.tasks.append(asyncio.ensure_future(self._poll() if self.mode == "polling" else self._webhook_inbox()))
        for task in self.tasks:
            task.add_done_callback(self._ended)
        if self.cancelled:  # stopped while the loop was coming up: nothing polls on
            self._cancel()
        self.ready.set()
        try:
            await asyncio.gather(*self.tasks, return_exceptions=True)
            if self.handling is not None and not self.handling.done():  # a command in progress finishes
                self._hand_on(self._waiting())  # first what is waiting now: a shutdown stores the state before 5 s
                await asyncio.wait([self.handling], timeout=5)
        finally:
            self._hand_on(self._drain())
            self.ctx.baton.values["confirmations"] = dict(self.confirmations)  # and honours its buttons
            try:  # close our connections (a cancelled long poll among them) before the next version polls
                await asyncio.wait_for(self.bot.shutdown(), timeout=1.0)
            except Exception as e:  # noqa: BLE001  (best effort: the baton must be released)
                self.log.debug("Telegram connections not closed cleanly: %s", type(e).__name__)
            self._release_baton()

    def _cancel(self) -> None:
        self.cancelled = True
        for t in [*self.tasks, *self.side_calls]:
            t.cancel()

    def _wake(self) -> None:
        if self.wake is not None:
            self.wake.set()

    def _enqueue(self, text: str) -> None:
        if len(self.queue) >= QUEUE_MAX:
            self.dropped += 1
            self._count(-1)
        else:
            self.queue.append(text)
            self._wake()

    def _reply(self, text: str, markup: Optional[InlineKeyboardMarkup] = None,
               edit: Optional[tuple[int, int]] = None) -> None:
        """Queue a command's answer ahead of every notification; never waits."""
        if len(self.replies) >= REPLY_MAX:
            self.log.warning("a command reply was not sent: %d replies are already waiting for Telegram", REPLY_MAX)
            return
        self._count(1)
        self.replies.append(Reply(text, markup.to_dict() if markup is not None else None, edit))
        self._wake()

    def _restore(self, pending: list) -> None:
        """Queue what an earlier version or run had not sent (notifications as text, replies as dicts) ahead of
        what this one was offered meanwhile (before its loop ran, or before it took over): it is older."""
        replies, notes = [], []
        for item in pending:
            if not isinstance(item, dict):
                notes.append(str(item))
                continue
            try:
                replies.append(Reply.of(item))
            except (KeyError, TypeError, ValueError, IndexError):
                self.log.warning("a saved reply could not be read; not sent: %.80r", item)
        self._count(len(replies) + len(notes))
        self.replies.extendleft(reversed(replies))
        self.queue.extendleft(reversed(notes))
        while len(self.queue) > QUEUE_MAX:  # as _enqueue does: the newest are the ones dropped
            self.queue.pop()
            self.dropped += 1
            self._count(-1)
        if replies or notes:
            self._wake()

    def _waiting(self) -> list:
        """Everything waiting (replies first), in the form _restore takes back."""
        return [asdict(r) for r in self.replies] + ([self.held[0]] if self.held else []) + list(self.queue)

    def _hand_on(self, pending: list) -> None:
        """What this version leaves, after what the previous one left that it never took over (older): for the
        next version (baton) and the next start (state)."""
        if self.untaken is None:
            self.untaken = [] if self.took_over else list(self.ctx.baton.values.get("pending", []))
        pending = self.untaken + pending
        self._keep(pending)
        self.ctx.baton.values["pending"] = pending

    def _keep(self, pending: list) -> None:
        """What the next start sends (the host stores the state once the stop hook returns). At a reload the next
        version takes it from the baton and sends it: kept here too, a start after a crash would send it again."""
        self.ctx.state["pending"] = [] if self.stop_reason == "reload" else pending
        self.ctx.state["dropped"] = self.dropped

    def _drain(self) -> list:
        """Take everything waiting (replies first), in the form _restore takes back."""
        out = self._waiting()
        self._count(-len(self.replies) - (self.held[1] if self.held else 0) - len(self.queue))
        self.replies.clear()
        self.queue.clear()
        self.held = None
        return out

    def _drain_notifications(self) -> int:
        n = len(self.queue)
        self.queue.clear()
        self._count(-n)
        return n

    async def _blocking(self, fn: Callable, *args: Any) -> Any:
        """Run a host call (it reads SQLite or waits for the engine) off the event loop."""
        return await self.loop.run_in_executor(self.pool, fn, *args)

    # ---- sending ----
    async def _sender(self) -> None:
        """One sender for the chat: replies first, then notifications (a backlog joined), each when the
        chat's pace allows; a reply queued meanwhile goes before the notification that was waiting."""
        while True:
            self.wake.clear()
            reply = bool(self.replies)
            if not reply and not self.held and not self.queue:
                await self.wake.wait()
                continue
            self._held_by_others()
            delay = self.pace.ready_at(reply, self.stopping) - time.monotonic()
            if delay > 0:  # until then, or until something new comes (a reply goes before a notification)
                timer = self.loop.call_later(delay, self.wake.set)  # not wait_for: 3.11's may swallow a cancel
                try:
                    await self.wake.wait()
                finally:
                    timer.cancel()
                continue
            if reply:
                item = self._fresh(self.replies.popleft())
                try:
                    delivered = await self._deliver(item)
                except asyncio.CancelledError:  # stopped mid-send: handed on with the rest (it may arrive twice)
                    self.replies.appendleft(item)
                    raise
                if delivered is None:
                    self.replies.appendleft(item)  # sent again when Telegram lets us
                else:
                    self._count(-1)
                if delivered and item.nonce:  # the buttons' time counts from when they can be seen
                    self.confirmations[item.nonce] = time.monotonic() + self.confirm_s
            else:
                text, n = self.held or self._batch()
                try:
                    delivered = await self._deliver(Reply(text))
                except asyncio.CancelledError:  # as a reply: handed on, never lost
                    self.held = (text, n)
                    raise
                self.held = (text, n) if delivered is None else None  # tried again as it is; more waits behind
                if delivered is not None:
                    self._count(-n)
                if delivered and self.dropped:
                    self._notice(f"⚠️ <b>{self.dropped} message{'s' if self.dropped != 1 else ''} dropped</b>: "
                                 f"more were waiting than the queue holds. The dashboard's events have them all.")
                    self.dropped = 0
            if self.recovered_after is not None:
                self._after_outage(self.recovered_after)

    def _fresh(self, item: Reply) -> Reply:
        """An /exitall question that waited past its time (a 429, an outage, a restart) is not shown with
        live buttons: it says that nothing was done."""
        if item.nonce is None or self.confirmations.get(item.nonce, 0.0) > time.monotonic():
            return item
        self.confirmations.pop(item.nonce, None)
        return Reply("Your /exitall question could not be shown in time (Telegram was unreachable or asked us "
                     "to wait). Nothing was done: send /exitall again.")

    def _batch(self) -> tuple[str, int]:
        """The oldest waiting notifications joined into one message, and how many."""
        text, n = self.queue.popleft(), 1
        while self.queue and len(text) + len(self.queue[0]) + 2 <= BATCH_CHARS:
            text, n = text + "\n\n" + self.queue.popleft(), n + 1
        return text, n

    def _notice(self, text: str) -> None:
        """A notice about the notifications themselves: next in line after the replies."""
        self._count(1)
        self.queue.appendleft(text)

    async def _deliver(self, item: Reply) -> Optional[bool]:
        """Send (or edit) once: True when sent, False when refused for good (logged), None to try again
        later (the chat's pace then says when)."""
        markup = InlineKeyboardMarkup.de_json(item.markup, self.bot) if item.markup else None
        try:
            if item.edit:
                await self.bot.edit_message_text(item.text, chat_id=item.edit[0], message_id=item.edit[1],
                                                 parse_mode="HTML", reply_markup=markup)
            else:
                await self.bot.send_message(self.chat, item.text, parse_mode="HTML", reply_markup=markup,
                                            disable_web_page_preview=True)
        except RetryAfter as e:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wait = _seconds(e.retry_after)
            self.log.warning("Telegram asks us to wait %.0f s (rate limit)", wait)
            self.pace.refused(wait)
            self._share_hold()
            return None
        except (BadRequest, Forbidden, InvalidToken) as e:  # permanent: retrying cannot help
            self.log.error("Telegram refused a message: %s", e)
            return False
        except NetworkError as e:  # transient (timeouts, 5xx, connection refused)
            if self.outage_since is None:
                self.outage_since = time.monotonic()
                self.log.warning("Telegram unreachable (%s); retrying with backoff", e)
            self.pace.unreachable()
            return None
        except Exception as e:  # anything else (a migrated chat, an unexpected answer): logged, not retried
            self.log.error("Telegram did not take a message: %s: %s", type(e).__name__, e)
            return False
        self.pace.delivered()
        if self.outage_since is not None:
            self.recovered_after = time.monotonic() - self.outage_since
            self.outage_since = None
        return True

    def _after_outage(self, lasted: float) -> None:
        """Back after an outage: a long one sums up the waiting notifications in one notice instead of a
        flood; command replies are all still sent."""
        self.recovered_after = None
        self.log.info("Telegram reachable again after %.0f s", lasted)
        if lasted < COLLAPSE_AFTER_S:
            return
        skipped = self._drain_notifications() + self.dropped
        self.dropped = 0
        if skipped:
            link = self.ctx.host.link("/") if self.ctx.host else ""
            self._notice(f"⚠️ <b>{skipped} message{'s' if skipped != 1 else ''} dropped</b> while Telegram was "
                         f"unreachable for {lasted:.0f} s. They are all in the dashboard's events: "
                         f'<a href="{esc(link)}">open it</a>')

    def _share_hold(self) -> None:
        """A 429's wait binds every version of this notifier (the baton) and the next start (state, wall clock)."""
        left = self.pace.hold_until - time.monotonic()
        self.ctx.baton.values["hold_until"] = max(float(self.ctx.baton.values.get("hold_until", 0.0)),
                                                  self.pace.hold_until)
        self.ctx.state["hold_until_epoch"] = time.time() + left

    def _held_by_others(self) -> None:
        """Take on a 429's wait that another version of this run was told (monotonic time: no clock step moves
        it); once no wait is in force, none is kept for the next start."""
        try:
            self.pace.hold_until = max(self.pace.hold_until, float(self.ctx.baton.values.get("hold_until", 0.0)))
        except (TypeError, ValueError):
            pass
        if self.pace.hold_until <= time.monotonic():
            self.ctx.state.pop("hold_until_epoch", None)

    def _held_before_restart(self) -> None:
        """A 429's wait told before a restart (wall clock, read once at the start); one longer than MAX_HOLD_S is
        not believed (a clock stepped back)."""
        try:
            left = float(self.ctx.state.pop("hold_until_epoch", 0.0)) - time.time()
        except (TypeError, ValueError):
            return
        if 0 < left <= MAX_HOLD_S:
            self.pace.hold_until = max(self.pace.hold_until, time.monotonic() + left)
            self.ctx.state["hold_until_epoch"] = time.time() + left  # kept while it holds

    # ---- receiving ----
    async def _acquire_baton(self) -> None:
        """One version polls at a time: wait until the previous one has let go."""
        while not self.ctx.baton.lock.acquire(blocking=False):
            await asyncio.sleep(0.05)
        self.holding = True

    def _release_baton(self) -> None:
        if getattr(self, "holding", False):
            self.holding = False
            self.ctx.baton.lock.release()

    def _take_over(self) -> None:
        """With the baton: what the previous version had not sent goes out first, its buttons still work."""
        self._restore(self.ctx.baton.values.pop("pending", []))
        self.took_over = True
        self.confirmations.update(self.ctx.baton.values.pop("confirmations", {}))

    def _offset(self) -> int:
        return max(int(self.ctx.baton.values.get("offset", 0)), int(self.ctx.state.get("offset", 0)))

    def _handled(self, update_id: int) -> None:
        self.ctx.baton.values["offset"] = self.ctx.state["offset"] = update_id + 1

    async def _poll(self) -> None:
        await self._acquire_baton()
        self._take_over()
        await self._call(self.bot.delete_webhook)  # polling and a webhook exclude each other
        attempt = refused = 0
        while True:
            offset = self._offset() or None
            try:
                updates = await self.bot.get_updates(offset=offset, timeout=POLL_S,
                                                     allowed_updates=["message", "callback_query"])
                if refused:
                    self.log.warning("Telegram answers polls again: commands are read")
                attempt = refused = 0
            except Conflict:  # another poller with this token (another host?): say so, wait
                self.log.error("another program polls this bot token; commands may go there")
                await asyncio.sleep(5)
                continue
            except RetryAfter as e:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    await asyncio.sleep(_seconds(e.retry_after))
                continue
            except NetworkError:
                await asyncio.sleep(POLL_RETRY_S[min(attempt, len(POLL_RETRY_S) - 1)])
                attempt += 1
                continue
            except Exception as e:  # InvalidToken (401/404), another refusal, an update PTB cannot read, or a defect:
                if not isinstance(e, InvalidToken):  # polling must go on
                    read = await self._read_raw(offset)  # each update read on its own: the unreadable are skipped
                    await self._handle_now(read or [])
                    if read and any(u is None for _, u in read):  # that was why: the next poll goes past it
                        continue
                if not refused and isinstance(e, InvalidToken):
                    self.log.error("Telegram refuses the bot token (%s): no command is read until it takes it "
                                   "(check TELEGRAM_BOT_TOKEN); trying again, at most every %d s", e, REFUSED_RETRY_S[-1])
                elif not refused:  # not Telegram's word on the token: said with where it came from
                    self.log.exception("Telegram polling failed; no command is read until it works; trying again, "
                                       "at most every %d s", REFUSED_RETRY_S[-1])
                await asyncio.sleep(REFUSED_RETRY_S[min(refused, len(REFUSED_RETRY_S) - 1)])
                refused += 1
                continue
            await self._handle_now([(u.update_id, u) for u in updates])

    async def _read_raw(self, offset: Optional[int]) -> Optional[list[tuple[int, Any]]]:
        """After a poll PTB could not finish: the waiting updates fetched as Telegram's JSON and read one by one
        (None if that fails too). PTB reads an answer whole, so one update it cannot read (a field Telegram changed)
        failed every poll, and the offset never moved past it: no command was read again."""
        try:
            raw = await self.bot.do_api_request("getUpdates", api_kwargs={
                "offset": offset, "timeout": 0, "allowed_updates": ["message", "callback_query"]})
            return [(int(r["update_id"]), await self._read(r)) for r in raw]
        except Exception:  # not an update's fault: the caller backs off and says so
            return None

    async def _read(self, raw: dict) -> Any:
        """One update as PTB reads it, or None: said in the log (and, if it came from an allowed user, to the chat),
        then skipped."""
        try:
            return Update.de_json(raw, self.bot)
        except Exception as e:
            uid = raw.get("update_id") if isinstance(raw, dict) else None
            why = f"{type(e).__name__}: {str(e)[:200]}"
            self.log.error("Telegram update %s could not be read (%s); skipped", uid, why)
            if not self._from_the_trader(raw):  # anyone can message a bot: a stranger's raises no alarm in the chat
                return None
            try:  # to the chat too: the trader may be waiting for an answer to a command in it
                await self._blocking(self.ctx.host.record, "telegram_update_skipped",
                                     f"Telegram update {uid} could not be read by the bot ({why}) and was skipped: "
                                     f"a command in it was not acted on; send it again", "error", {"update_id": uid})
            except Exception:
                self.log.exception("recording the skipped Telegram update %s failed", uid)
            return None

    def _from_the_trader(self, raw: Any) -> bool:
        """An update PTB could not read, as sent by an allowed user (in the allowed chat, where that can be read)."""
        part = next((raw[k] for k in ("message", "edited_message", "callback_query")
                     if isinstance(raw, dict) and isinstance(raw.get(k), dict)), {})
        user = part.get("from")
        chat = (part.get("message") or {}).get("chat") if "chat_instance" in part else part.get("chat")
        chat_id = chat.get("id") if isinstance(chat, dict) else None
        return isinstance(user, dict) and user.get("id") in self.allowed and (chat_id is None or
                                                                              str(chat_id) == self.chat)

    def _ended(self, task: "asyncio.Future") -> None:
        """A loop of the bot's that ended by an error (never silently: no command, or no message, goes after it)."""
        if not task.cancelled() and task.exception() is not None:
            self.log.error("Telegram %s stopped by an error: %r; restart the host or reload the plugin",
                           "polling" if task is self.tasks[-1] else "sending", task.exception())

    async def _handle_now(self, updates: list[tuple[int, Any]], inbox_ids: Optional[list] = None) -> None:
        if updates:  # handled to the end even if this version is stopped meanwhile
            self.handling = asyncio.ensure_future(self._handle_all(updates, inbox_ids))
            await asyncio.shield(self.handling)

    async def _webhook_inbox(self) -> None:
        """Webhook mode: the host's /telegram/webhook stores verified updates; take them from there."""
        await self._acquire_baton()
        self._take_over()
        await self._call(self.bot.set_webhook, self.ctx.host.link("/telegram/webhook"),
                         secret_token=self.ctx.settings.get("TELEGRAM_WEBHOOK_SECRET"),
                         allowed_updates=["message", "callback_query"])
        failures = 0
        while True:
            try:
                rows = await self._blocking(self.ctx.host.inbox, "telegram")
                if rows:  # each read once: one already handled (its done-mark failed) is only marked done
                    await self._handle_now([(uid, await self._read(r["body"]) if uid >= self._offset() else None)
                                            for uid, r in ((_update_id(r["body"]), r) for r in rows)],
                                           [r["id"] for r in rows])
                if failures:
                    self.log.warning("Telegram updates are taken from the host again: commands are read")
                failures = 0
            except Exception:  # (a full disk, a locked database): said once, tried again; commands must come back
                if not failures:
                    self.log.exception("Telegram updates could not be taken from the host; no command is read "
                                       "until it works; trying again")
                await asyncio.sleep(POLL_RETRY_S[min(failures, len(POLL_RETRY_S) - 1)])
                failures += 1
                continue
            if not rows:
                await asyncio.sleep(0.3)

    async def _handle_all(self, updates: list[tuple[int, Any]], inbox_ids: Optional[list] = None) -> None:
        """(update id, the update as read, or None if it could not be: skipped in its place), in order."""
        for i, (update_id, update) in enumerate(updates):
            if update_id >= self._offset():  # else handled already (by this or an earlier version)
                try:
                    if update is not None:
                        await self._handle(update)
                except Exception:
                    self.log.exception("Telegram update %s could not be handled", update_id)
                self._handled(update_id)
            if inbox_ids:
                await self._blocking(self.ctx.host.inbox_done, inbox_ids[i])

    def _aside(self, fn: Callable, *args: Any) -> None:
        """A side call (answering a button press) that nothing waits for."""
        task = asyncio.ensure_future(self._call(fn, *args))
        self.side_calls.add(task)
        task.add_done_callback(self.side_calls.discard)

    async def _call(self, fn: Callable, *args: Any, **kw: Any) -> Any:
        try:
            return await fn(*args, **kw)
        except Exception as e:  # a failed side call is logged, never fatal
            self.log.warning("Telegram %s failed: %s", getattr(fn, "__name__", fn), e)
            return None

    # ---- commands ----
    def _allowed(self, user: Any, chat_id: Any) -> bool:
        return user is not None and user.id in self.allowed and str(chat_id) == self.chat

    @staticmethod
    def _who(user: Any) -> str:
        return f"telegram:@{user.username} ({user.id})" if user.username else f"telegram:{user.id}"

    async def _handle(self, update: Update) -> None:
        if update.callback_query is not None:
            await self._callback(update.callback_query)
            return
        msg = update.message
        if msg is None or not msg.text or not msg.text.startswith("/"):
            return
        if not self._allowed(msg.from_user, msg.chat_id):
            self.log.warning("ignored %r from user %s in chat %s: not in TELEGRAM_ALLOWED_USERS and TELEGRAM_CHAT_ID",
                             msg.text.split()[0][:32], msg.from_user.id if msg.from_user else "?", msg.chat_id)
            return
        word, *args = msg.text.split()
        command = word[1:].split("@")[0].lower()
        if command in PLUGIN_ACTIONS:
            await self._plugin(msg.from_user, args, command)
            return
        handler = getattr(self, f"cmd_{command}", None)
        if handler is None:
            self._reply(f"Unknown command {esc(word)}. Commands:\n{HELP}")
            return
        await handler(msg.from_user, args)

    async def _control(self, user: Any, what: str, kind: str, args: dict) -> dict:
        """A control command: recorded in the event log with the user, then done through the engine."""
        who = self._who(user)
        await self._blocking(self.ctx.host.record, "telegram_command", f"{what} by {who}", "info",
                             {"user_id": user.id, "command": what})
        return await self._blocking(self.ctx.host.command, kind, {**args, "by": who})

    def _reply_result(self, result: dict, done: str) -> None:
        self._reply(done if result.get("ok") else f"⚠️ Not done: {esc(result.get('error'))}")

    async def cmd_start(self, user: Any, args: list) -> None:
        self._reply(f"Commands:\n{HELP}")

    cmd_help = cmd_start

    async def cmd_status(self, user: Any, args: list) -> None:
        s = await self._blocking(self.ctx.host.status)
        orders = ", ".join(f"{k.lower()} {v}" for k, v in sorted(s["orders_today"].items())) or "none"
        self._reply(f"<b>Status</b> · {esc(s['mode'])} · engine {'running' if s['engine'] else 'STOPPED'}\n"
                    f"trading <b>{esc(s['trading_state'])}</b>" + (f" ({esc(s['reason'])})" if s["reason"] else "")
                    + f"\nbroker session {esc(s['broker_session'])}\nday PnL {esc(inr(s['day_pnl'], signed=True))}"
                    f"\nopen positions {s['open_positions']} · orders today: {esc(orders)}")

    async def cmd_pnl(self, user: Any, args: list) -> None:
        total, by = await self._blocking(self.ctx.host.pnl)
        lines = [f"<b>Day PnL {esc(inr(total, signed=True))}</b>"]
        lines += [f"• {esc(k)} {esc(inr(v, signed=True))}" for k, v in sorted(by.items())]
        self._reply("\n".join(lines))

    def _listing(self, title: str, rows: list, line: Callable[[dict], str], empty: str) -> None:
        """A bold title and a line per row, or what to say when there are none."""
        self._reply("\n".join([f"<b>{title}</b>"] + [f"• {line(r)}" for r in rows]) if rows else empty)

    async def cmd_positions(self, user: Any, args: list) -> None:
        rows = await self._blocking(self.ctx.host.positions)
        self._listing("Open positions", rows[:30], lambda p: (
            f"{esc(p['strategy'])} {esc(p['exchange'])}:{esc(p['symbol'])} {esc(qty(p['net_qty']))} "
            f"@ {esc(inr(p['avg_price']))} · LTP {esc(inr(p['ltp']))} · "
            f"{esc(inr(p['realized_pnl'] + p['unrealized_pnl'], signed=True))}"), "No open positions.")

    async def cmd_orders(self, user: Any, args: list) -> None:
        rows = await self._blocking(self.ctx.host.orders, 10)
        self._listing("Latest orders", rows, lambda o: (
            f"{esc(ist(o['created_at']))} {esc(o['strategy'])} {esc(o['side'])} {esc(qty(o['qty']))} "
            f"{esc(o['symbol'])} {esc(o['order_type'])} {esc(order_price(o))} <b>{esc(o['status'])}</b> "
            f"{esc(qty(o['filled_qty']))}/{esc(qty(o['qty']))}"
            + (f" avg {esc(inr(o['avg_price']))}" if o["filled_qty"] else "")
            + (f" — {esc(money_text(o['reason']))}" if o["reason"] else "")), "No orders yet.")

    async def cmd_risk(self, user: Any, args: list) -> None:
        r = await self._blocking(self.ctx.host.risk)
        self._reply(f"<b>Risk</b> · state <b>{esc(r['state'])}</b>\nday PnL {esc(inr(r['day_pnl'], signed=True))}"
                    f" · limit {esc(inr(r['max_loss']))} · peak {esc(inr(r.get('peak_pnl') or Decimal(0), signed=True))}"
                    f"\nbreached {'yes' if r.get('breached') else 'no'} · warning {'yes' if r.get('warning') else 'no'}"
                    f" · loss days in a row {esc(r.get('consecutive_loss_days'))}"
                    + (f"\ncooldown until {esc(r['cooldown_until'])}" if r.get("cooldown_until") else ""))

    async def cmd_strategies(self, user: Any, args: list) -> None:
        rows = await self._blocking(self.ctx.host.strategies)
        self._listing("Strategies", rows, lambda p: (
            f"{esc(p['name'])} v{esc(p['version'] or '—')} g{p['generation']} <b>{esc(p['status'])}</b>"
            + (f" — {esc(p['error'])}" if p["error"] else "")), "No strategies.")

    async def _set_state(self, user: Any, mode: str, word: str, override: bool = False) -> None:
        result = await self._control(user, f"/{word}", "halt", {"mode": mode, "reason": f"/{word} from Telegram",
                                                                  "override_breach": override})
        if word == "resume" and "override_breach" in str(result.get("error")):
            result = {**result, "error": f"{result['error']} — send /resume override to do that"}
        self._reply_result(result, f"Trading state is now <b>{esc(mode)}</b>.")

    async def cmd_halt(self, user: Any, args: list) -> None:
        await self._set_state(user, "halted", "halt")

    async def cmd_reduceonly(self, user: Any, args: list) -> None:
        await self._set_state(user, "reduce_only", "reduceonly")

    async def cmd_resume(self, user: Any, args: list) -> None:
        """/resume; after today's breach, /resume override (the limit starts again from the current PnL)."""
        await self._set_state(user, "active", "resume", override=args[:1] == ["override"])

    async def _plugin(self, user: Any, args: list, action: str) -> None:
        if len(args) != 1:
            self._reply(f"Usage: /{action} &lt;strategy&gt;")
            return
        result = await self._control(user, f"/{action} {args[0]}", "plugin",
                                     {"kind": "strategy", "name": args[0], "action": action})
        self._reply_result(result, f"Strategy <b>{esc(args[0])}</b>: {action}{'ed' if action == 'reload' else 'd'}.")

    async def cmd_exitall(self, user: Any, args: list) -> None:
        """Ask first, with buttons that expire."""
        positions = await self._blocking(self.ctx.host.positions)
        nonce = secrets.token_hex(8)
        self.confirmations[nonce] = time.monotonic() + self.confirm_s
        markup = InlineKeyboardMarkup([[InlineKeyboardButton("Yes, exit all", callback_data=f"exitall:{nonce}"),
                                        InlineKeyboardButton("Cancel", callback_data=f"cancel:{nonce}")]])
        self._reply(f"<b>Exit all {len(positions)} open position{'s' if len(positions) != 1 else ''}?</b>\n"
                    f"Working entry orders are cancelled too. This button expires in {self.confirm_s:.0f} s.",
                    markup=markup)

    async def _callback(self, query: Any) -> None:
        message = query.message
        if not self._allowed(query.from_user, message.chat.id if message else None):
            self.log.warning("ignored a button press from user %s: not allowed", query.from_user.id)
            return
        action, _, nonce = (query.data or "").partition(":")
        expiry = self.confirmations.pop(nonce, None)
        if expiry is None or time.monotonic() > expiry:
            self._aside(query.answer, "This confirmation has expired: send /exitall again.")
            self._edit(message, "Exit all: the confirmation expired. Nothing was done.")
            return
        if action == "cancel":
            self._aside(query.answer, "Cancelled")
            self._edit(message, "Exit all cancelled. Nothing was done.")
            return
        self._aside(query.answer, "Exiting all positions…")  # the button stops spinning; the exit does not wait
        result = await self._control(query.from_user, "/exitall (confirmed)", "exit_all", {})
        if result.get("ok"):
            n = len(result.get("orders", []))
            text = (f"Exit all by {esc(self._who(query.from_user))}: {n} exit order{'s' if n != 1 else ''} sent, "
                    f"{esc(result.get('cancelled', 0))} unsent orders cancelled. Fills will follow.")
        else:
            text = f"⚠️ Exit all not done: {esc(result.get('error'))}"
        self._edit(message, text)

    def _edit(self, message: Any, text: str) -> None:
        """The prompt is changed to say what happened (queued like a reply: it obeys the same limits)."""
        if message is not None:
            self._reply(text, edit=(message.chat.id, message.message_id))


_notifier: Optional[TelegramNotifier] = None


@hookimpl
def notifier_meta():
    return {"name": "telegram", "version": VERSION, "api_version": 1}


@hookimpl
def notifier_start(ctx):
    global _notifier
    _notifier = TelegramNotifier(ctx)
    _notifier.start()
    missing = [name for name, value in (("TELEGRAM_BOT_TOKEN", _notifier.token), ("TELEGRAM_CHAT_ID", _notifier.chat))
               if not value]
    return {"idle": f"{' and '.join(missing)} not set: nothing is sent"} if missing else None


@hookimpl
def notifier_send(event):
    if _notifier is not None:
        _notifier.offer(event)


@hookimpl
def notifier_stop(reason):
    if _notifier is not None:
        _notifier.stop(reason)
