"""A fake Telegram Bot API server on loopback, for the real python-telegram-bot (its `base_url`): tests and benches.

It keeps what the bot sent, serves updates to getUpdates with Telegram's offset rules (an update
is confirmed by a later offset, and is served again until then), and can fail: an outage (502, or the
connection dropped unanswered) of every method or only of some (sendMessage down while getUpdates still
delivers), 429s with retry_after (queued one by one, or a flood wait lasting some seconds), and 409 for
two pollers at once. `received` has every request with its time and the status it got.
"""
from __future__ import annotations

import json
import math
import secrets
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs

BOT = {"id": 123456, "is_bot": True, "first_name": "Host", "username": "host_test_bot"}


class FakeTelegram:
    def __init__(self, token: Optional[str] = None):
        # a token of its own: a bot left polling by another test (this process or another) whose port this
        # server now has gets 401, and cannot take this server's updates
        self.token = token or f"{secrets.randbelow(10**9)}:TEST-{secrets.token_hex(8)}-never-real"
        self.unauthorized = 0             # requests with another token (a bot that is not this test's)
        self.lock = threading.Condition()
        self.updates: list[dict] = []     # not yet confirmed
        self.served: list[int] = []       # every update id given to a poller (repeats show redelivery)
        self.next_update = 1000
        self.next_message = 1
        self.calls: list[tuple[float, str, dict]] = []  # answered (2xx, 4xx): time, method, parameters
        self.received: list[tuple[float, str, int, dict]] = []  # every request as it came: time, method,
        #                                                          the status it got (0: dropped), parameters
        self.down_until = 0.0             # before this monotonic time the outage's methods fail
        self.down_methods: Optional[tuple[str, ...]] = None  # None: every method
        self.down_how = "502"             # or "drop": the connection is closed without an answer
        self.flood_until = 0.0            # before this, sendMessage and editMessageText get 429
        self.retry_after: list[int] = []  # the next sendMessage calls get 429 with these retry_after values
        self.slow_s = 0.0                 # every sendMessage answers this late
        self.bad_next = 0                 # the next sendMessage calls get 400 Bad Request
        self.pollers = 0
        self.conflicts = 0
        self.current = threading.local()
        self.polling: set = set()  # the connections of the long polls in progress  # the connection of the request this thread handles
        self.webhook: Optional[dict] = None
        self._server: Optional[ThreadingHTTPServer] = None

    # ---- life ----
    def start(self) -> "FakeTelegram":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length)
                if len(data) < length:  # the client gave up mid-request: nothing arrived, as with Telegram
                    self.close_connection = True
                    return
                raw = data.decode()
                fake.current.sock = self.connection  # a long poll ends when its client hangs up, as Telegram's does
                code, body = fake.handle(self.path, self.headers.get("Content-Type", ""), raw)
                if code == 0:  # an outage that drops the connection: the client sees it closed unanswered
                    self.close_connection = True
                    return
                data = json.dumps(body).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a cancelled long poll)
                    pass

            do_GET = do_POST  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ---- what tests do ----
    def push_message(self, text: str, user_id: int, chat_id: int, username: str = "trader") -> int:
        return self._push({"message": {"message_id": self._message_id(), "date": int(time.time()), "text": text,
                                       "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "group"},
                                       "from": {"id": user_id, "is_bot": False, "first_name": username.title(),
                                                "username": username}}})

    def push_callback(self, data: str, user_id: int, message: dict, username: str = "trader") -> int:
        return self._push({"callback_query": {"id": f"cb{self.next_update}", "data": data, "chat_instance": "1",
                                              "from": {"id": user_id, "is_bot": False, "first_name": "T",
                                                       "username": username},
                                              "message": message}})

    def sent(self, method: str = "sendMessage") -> list[dict]:
        with self.lock:
            return [p for _, m, p in self.calls if m == method]

    def texts(self) -> list[str]:
        return [p["text"] for p in self.sent()]

    def times(self, method: str = "sendMessage") -> list[float]:
        with self.lock:
            return [t for t, m, _ in self.calls if m == method]

    def outage(self, seconds: float, methods: Optional[tuple[str, ...]] = None, how: str = "502") -> None:
        """For `seconds`, `methods` (default: all) fail: 502 Bad Gateway, or ("drop") no answer at all."""
        self.down_methods, self.down_how = methods, how
        self.down_until = time.monotonic() + seconds

    def flood(self, seconds: float) -> None:
        """A flood wait: for `seconds` every message sent or edited gets 429 with the seconds left as retry_after."""
        self.flood_until = time.monotonic() + seconds

    def statuses(self, method: str = "sendMessage") -> list[tuple[float, int]]:
        """(time, status) of every request for this method, refused ones included."""
        with self.lock:
            return [(t, code) for t, m, code, _ in self.received if m == method]

    def delivered(self, method: str = "sendMessage") -> list[tuple[float, dict]]:
        """(time, parameters) of the requests for this method that were answered 200, in order."""
        with self.lock:
            return [(t, p) for t, m, code, p in self.received if m == method and code == 200]

    # ---- the Bot API ----
    def handle(self, path: str, content_type: str, raw: str) -> tuple[int, dict]:
        prefix = f"/bot{self.token}/"
        if not path.startswith(prefix):
            with self.lock:
                self.unauthorized += 1
            return 401, {"ok": False, "error_code": 401, "description": "Unauthorized"}
        method = path[len(prefix):].split("?")[0]
        params = self._params(content_type, raw)
        came = time.monotonic()
        code, body = self._answer(method, params)
        with self.lock:
            self.received.append((came, method, code, params))
        return code, body

    def _answer(self, method: str, params: dict) -> tuple[int, dict]:
        now = time.monotonic()
        if now < self.down_until and (self.down_methods is None or method in self.down_methods):
            return (0, {}) if self.down_how == "drop" else (502, {"ok": False, "error_code": 502,
                                                                  "description": "Bad Gateway"})
        with self.lock:
            self.calls.append((now, method, params))
        if method in ("sendMessage", "editMessageText") and now < self.flood_until:
            return self._too_many(math.ceil(self.flood_until - now))
        if method == "sendMessage" and self.slow_s:
            time.sleep(self.slow_s)
        if method == "sendMessage" and self.bad_next:
            self.bad_next -= 1
            return 400, {"ok": False, "error_code": 400, "description": "Bad Request: can't parse entities"}
        if method == "sendMessage" and self.retry_after:
            return self._too_many(self.retry_after.pop(0))
        handler = getattr(self, "m_" + method, None)
        if handler is None:
            return 404, {"ok": False, "error_code": 404, "description": "Not Found: method not found"}
        return 200, {"ok": True, "result": handler(params)}

    @staticmethod
    def _too_many(wait: int) -> tuple[int, dict]:
        return 429, {"ok": False, "error_code": 429, "description": f"Too Many Requests: retry after {wait}",
                     "parameters": {"retry_after": wait}}

    @staticmethod
    def _params(content_type: str, raw: str) -> dict:
        if "json" in content_type:
            return json.loads(raw or "{}")
        out = {}
        for k, v in parse_qs(raw).items():
            try:
                out[k] = json.loads(v[0])
            except ValueError:
                out[k] = v[0]
        return out

    def _message_id(self) -> int:
        with self.lock:
            self.next_message += 1
            return self.next_message

    def _push(self, content: dict) -> int:
        with self.lock:
            self.next_update += 1
            update = {"update_id": self.next_update, **content}
            self.updates.append(update)
            self.lock.notify_all()
            return update["update_id"]

    def _message(self, params: dict) -> dict:
        return {"message_id": self._message_id(), "date": int(time.time()), "text": params.get("text", ""),
                "chat": {"id": int(params["chat_id"]), "type": "private"}, "from": BOT}

    def m_getMe(self, params: dict) -> dict:  # noqa: N802
        return BOT

    def m_sendMessage(self, params: dict) -> dict:  # noqa: N802
        msg = self._message(params)
        if params.get("reply_markup"):
            msg["reply_markup"] = params["reply_markup"]
        params["_message"] = msg
        return msg

    def m_editMessageText(self, params: dict) -> dict:  # noqa: N802
        return {**self._message(params), "message_id": int(params.get("message_id", 0))}

    def m_answerCallbackQuery(self, params: dict) -> bool:  # noqa: N802
        return True

    def m_setMyCommands(self, params: dict) -> bool:  # noqa: N802
        return True

    def m_deleteWebhook(self, params: dict) -> bool:  # noqa: N802
        self.webhook = None
        return True

    def m_setWebhook(self, params: dict) -> bool:  # noqa: N802
        self.webhook = params
        return True

    def _hung_up(self, sock: Any = None) -> bool:
        """The client of this request (or of `sock`) closed its connection (a cancelled long poll)."""
        sock = getattr(self.current, "sock", None) if sock is None else sock
        if sock is None:
            return False
        try:  # poll(), not select(): select() raises for a socket numbered over 1,023 (a long test run has those)
            watch = select.poll()
            watch.register(sock, select.POLLIN | select.POLLHUP)
            return bool(watch.poll(0)) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def m_getUpdates(self, params: dict) -> list:  # noqa: N802
        offset = int(params.get("offset") or 0)
        timeout = float(params.get("timeout") or 0)
        deadline = time.monotonic() + timeout
        with self.lock:
            self.pollers += 1
            mine = getattr(self.current, "sock", None)
            if any(not self._hung_up(other) for other in self.polling):  # another live long poll: a conflict
                self.conflicts += 1
            self.polling.add(mine)
            try:
                if offset:
                    self.updates = [u for u in self.updates if u["update_id"] >= offset]  # confirmed
                while not self.updates and time.monotonic() < deadline and not self._hung_up():
                    self.lock.wait(min(0.2, max(0.0, deadline - time.monotonic())))
                    if offset:
                        self.updates = [u for u in self.updates if u["update_id"] >= offset]
                if self._hung_up():
                    return []  # nobody to answer: nothing is served
                given = list(self.updates)
                self.served += [u["update_id"] for u in given]
                return given
            finally:
                self.pollers -= 1
                self.polling.discard(mine)
