"""Telegram commands are never behind notifications: the real python-telegram-bot against the fake Bot API,
with a backlog of notifications, a 429 flood wait and an outage of sendMessage while getUpdates still delivers."""
from __future__ import annotations

import sys
import threading
import time
import traceback

import pytest

from conftest import alert, wait_for
from test_telegram import STRANGER, USER, load_plugin, said, tg, tghost  # noqa: F401  (fixtures)

GROUP = -100555  # a group chat: Telegram allows ~20 messages a minute there, 1 a second in any chat
REJECTED = "Order rejected"


def group_host(tghost, tg, **settings):  # noqa: F811
    h = tghost(TELEGRAM_CHAT_ID=str(GROUP), **settings)
    said(tg, "Host started")
    return h


def backlog(h, n: int) -> None:
    """n notifications at once, long enough that they take several paced messages to go out."""
    for i in range(n):
        h.runtime._emit("order_rejected", f"order b{i} rejected by the broker: " + "margin shortfall " * 20,
                        "warning", "s1", None)


def state(h) -> str:
    return h.runtime.gate.state()["state"]


def command_acts(h, tg, command: str, want: str, within: float = 1.0) -> float:  # noqa: F811
    """Send a command; the trading state must be `want` within `within` seconds of it reaching the Bot API."""
    pushed = time.monotonic()
    tg.push_message(command, USER, GROUP)
    try:
        wait_for(lambda: state(h) == want, timeout=within + 1, interval=0.01)
    except AssertionError as e:
        raise AssertionError(f"{command}: not {want} in time: {e}\n{what_the_bot_did(tg, pushed)}") from None
    took = time.monotonic() - pushed
    assert took <= within, f"{command}: {want} after {took:.2f} s\n{what_the_bot_did(tg, pushed)}"
    return took


def what_the_bot_did(tg, pushed: float) -> str:  # noqa: F811
    """For a failure: the requests the fake Bot API got around the command, and where each thread stands."""
    with tg.lock:
        got = [f"{t - pushed:+.3f} s {m} {code}" for t, m, code, _ in sorted(tg.received, key=lambda r: r[0])
               if t >= pushed - 3] + [f"now: {tg.pollers} long poll(s) in progress, {tg.conflicts} conflicts, "
                                      f"{tg.unauthorized} with another token"]
    names = {t.ident: t.name for t in threading.enumerate()}
    stacks = [f"--- {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame)[-4:])
              for ident, frame in sys._current_frames().items() if ident != threading.get_ident()]
    return "requests (time from the command):\n" + "\n".join(got) + "\nthreads:\n" + "\n".join(stacks)


def delivered_texts(tg, after: float = 0.0) -> list[str]:  # noqa: F811
    return [p["text"] for t, p in tg.delivered() if t >= after]


def first(texts: list[str], needle: str) -> int:
    return next(i for i, t in enumerate(texts) if needle in t)


def assert_honest_pace(tg) -> None:  # noqa: F811
    """Everything delivered to the group: at least ~1 s apart, and at most 20 in any 60 s."""
    times = sorted(t for m in ("sendMessage", "editMessageText") for t, _ in tg.delivered(m))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.9, gaps
    assert all(times[i + 20] - times[i] >= 60 for i in range(len(times) - 20))


def test_the_pace_keeps_room_for_replies_and_obeys_retry_after():
    m = load_plugin()
    now = time.monotonic()
    private, group = m.Pace(group=False), m.Pace(group=True)
    private.sent.append(now)
    group.sent.append(now)
    assert private.ready_at(reply=False) == private.ready_at(reply=True) == now + 1.0
    assert group.ready_at(reply=True) == now + 1.0             # a reply: Telegram's 1 a second
    assert group.ready_at(reply=False) == now + 60 / 16        # notifications leave a quarter of 20/min
    group.sent.clear()
    group.sent.extend(now - 50 + i for i in range(16))         # 16 in the last minute
    assert group.ready_at(reply=False) == pytest.approx(now + 10)   # when the oldest is a minute old
    assert group.ready_at(reply=True) == pytest.approx(now - 35 + 1)  # a reply still may
    group.sent.extend(now - 34 + i for i in range(4))          # 20 in the last minute: replies wait too
    assert group.ready_at(reply=True) == pytest.approx(now + 10)
    held = m.Pace(group=False)
    held.refused(30)
    assert held.ready_at(reply=True) >= now + 30 and held.ready_at(reply=False, stopping=True) >= now + 30
    down = m.Pace(group=False)
    for _ in range(5):
        down.unreachable()
    t = time.monotonic()
    assert down.ready_at(reply=False) >= t + 14                # notifications back off to 15 s
    assert down.ready_at(reply=True) <= t + m.REPLY_RETRY_S    # a reply is tried every 2 s


def test_halt_acts_during_a_429_wait_and_its_reply_jumps_the_backlog(tghost, tg):  # noqa: F811
    h = group_host(tghost, tg, TELEGRAM_CONFIRM_S="5")
    h.post(alert())
    h.settle()
    flood_s = 12
    tg.flood(flood_s)
    flood_start, flood_end = time.monotonic(), tg.flood_until
    backlog(h, 30)
    wait_for(lambda: any(code == 429 for _, code in tg.statuses()), timeout=5)  # the bot is told to wait
    tg.push_message("/exitall", USER, GROUP)  # its buttons would expire (5 s) before the wait ends
    tg.push_message("/status", USER, GROUP)  # its reply cannot go out either
    time.sleep(0.2)
    command_acts(h, tg, "/halt", "halted")
    assert time.monotonic() < flood_end - 3  # done while the wait still holds every message
    assert h.post(alert(strategy="s2")).status_code == 423
    wait_for(lambda: REJECTED in "".join(delivered_texts(tg, flood_end)), timeout=flood_s + 10)
    after = delivered_texts(tg, flood_start)
    assert (first(after, "send /exitall again") < first(after, "<b>Status</b>") < first(after, "now <b>halted")
            < first(after, REJECTED))
    assert not any("reply_markup" in p for _, p in tg.delivered())  # no stale buttons
    assert h.net() == -75
    halted_at = next(t for t, p in tg.delivered() if "now <b>halted" in p["text"])
    assert flood_end <= halted_at <= flood_end + 6  # after the wait it was told, and soon after (the 3rd reply, 1 s apart)
    during = [t for t, _ in tg.statuses() if flood_start <= t < flood_end]
    assert len(during) == 1  # retry_after obeyed: one refused attempt, no hammering
    assert_honest_pace(tg)


@pytest.mark.parametrize("how,seconds", [("502", 7), ("drop", 12)])
def test_commands_act_during_an_outage_of_sending_and_replies_follow(tghost, tg, how, seconds):  # noqa: F811
    h = group_host(tghost, tg)
    tg.outage(seconds, methods=("sendMessage", "editMessageText"), how=how)  # getUpdates still delivers
    start, end = time.monotonic(), tg.down_until
    backlog(h, 20)
    wait_for(lambda: any(code in (0, 502) for _, code in tg.statuses()), timeout=5)
    tg.push_message("/status", USER, GROUP)
    time.sleep(0.2)
    command_acts(h, tg, "/reduceonly", "reduce_only")
    command_acts(h, tg, "/halt", "halted")
    assert time.monotonic() < end
    wait_for(lambda: any("now <b>halted" in t for t in delivered_texts(tg)), timeout=seconds + 8)
    wait_for(lambda: len(delivered_texts(tg, start)) > 3, timeout=8)  # and then what the outage held
    after = delivered_texts(tg, start)
    assert first(after, "<b>Status</b>") < first(after, "now <b>reduce_only") < first(after, "now <b>halted")
    assert first(after, "now <b>halted") == 2  # the replies first, then what the outage held
    halted_at = next(t for t, p in tg.delivered() if "now <b>halted" in p["text"])
    assert halted_at - end <= 2 * 2.0 + 1.5  # a waiting reply is retried every 2 s: two paced replies before it
    assert_honest_pace(tg)


def test_exitall_buttons_arrive_within_2_s_behind_50_notifications(tghost, tg):  # noqa: F811
    h = group_host(tghost, tg)
    h.post(alert())
    h.settle()
    start = time.monotonic()
    backlog(h, 50)
    wait_for(lambda: REJECTED in "".join(delivered_texts(tg, start)), timeout=5)  # the backlog is going out
    pushed = time.monotonic()
    tg.push_message("/exitall", USER, GROUP)
    prompt_at, prompt = wait_for(lambda: next(((t, p) for t, p in tg.delivered() if "reply_markup" in p), None),
                                 timeout=5)
    assert prompt_at - pushed <= 2.0, f"buttons after {prompt_at - pushed:.2f} s\n{what_the_bot_did(tg, pushed)}"
    wait_for(lambda: REJECTED in "".join(delivered_texts(tg, prompt_at + 0.01)), timeout=10)  # it jumped a backlog
    assert h.net() == -75
    pressed = time.monotonic()
    tg.push_callback(prompt["reply_markup"]["inline_keyboard"][0][0]["callback_data"], USER, prompt["_message"])
    edited_at, _ = wait_for(lambda: next(((t, p) for t, p in tg.delivered("editMessageText")
                                          if "1 exit order sent" in p["text"]), None), timeout=5)
    assert edited_at - pressed <= 2.0
    assert any(p.get("text") == "Exiting all positions…" for p in tg.sent("answerCallbackQuery"))
    h.settle()
    assert h.net() == 0
    assert_honest_pace(tg)


def test_reduceonly_right_after_resume_acts_within_1_s(tghost, tg):  # noqa: F811
    h = group_host(tghost, tg)
    command_acts(h, tg, "/halt", "halted", within=3)
    backlog(h, 10)
    resumed = time.monotonic()
    command_acts(h, tg, "/resume", "active")
    command_acts(h, tg, "/reduceonly", "reduce_only")
    said(tg, "now <b>reduce_only", timeout=5)
    texts = delivered_texts(tg, resumed)
    assert first(texts, "now <b>active") < first(texts, "now <b>reduce_only")
    tg.push_message("/halt", STRANGER, GROUP)  # a stranger in the group: still ignored, however fast
    time.sleep(0.5)
    assert state(h) == "reduce_only"
    assert_honest_pace(tg)
