"""Plugin folders that disappear and come back: the last loaded versions keep running, then the watcher re-arms."""
from __future__ import annotations

import shutil
import time

import pytest

from conftest import alert, wait_for
from plugin_files import stays, strategies, strategy_source, wait_strategy, write

DOUBLER = '''
@hookimpl
def strategy_on_alert(ctx, alert):
    leg = alert.legs[0]
    return [Intent(leg.exchange, leg.symbol, leg.side, leg.qty * FACTOR, leg.order_type, leg.product,
                   leg.price, action=alert.execution_type)]
'''
RECORDER = '''from host import hookimpl
@hookimpl
def notifier_meta():
    return {{"name": "recorder", "version": "1", "api_version": 1}}
@hookimpl
def notifier_send(event):
    with open({out!r}, "a") as f:
        f.write(event["kind"] + "\\n")
'''


def multiplier(name: str, version: str, factor: int) -> str:
    return strategy_source(name, version, f"FACTOR = {factor}\n" + DOUBLER)


def notifiers(host) -> dict[str, str]:
    return {n["name"]: n["status"] for n in host.api("/api/notifiers").get_json()["items"]}


def ordered_qty(host, alert_id: str, strike: int) -> int:
    """The qty ordered for an ENTRY of 10 to keeper (a symbol of its own each time: no duplicate entry)."""
    r = host.post(alert(strategy="keeper", qty=10, alert_id=alert_id, tradingsymbol=f"NIFTY28APR26C{strike}"))
    assert r.status_code == 200, r.get_json()
    return r.get_json()["orders"][0]["qty"]


def health(host) -> list[str]:
    return host.client.get("/healthz").get_json()["problems"]


def events(host, kind: str) -> list[dict]:
    return [e for e in host.api("/api/events", query_string={"limit": 500}).get_json()["items"] if e["kind"] == kind]


@pytest.fixture
def loaded(host, tmp_path):
    """A running host with a strategy (orders 2x the alert's qty) and a notifier that records events."""
    out = tmp_path / "notified.txt"
    write(host.runtime.strategies.folder, "keeper", multiplier("keeper", "1.0", 2))
    write(host.runtime.notifiers.folder, "recorder", RECORDER.format(out=str(out)))
    wait_strategy(host, "keeper", status="running", version="1.0")
    wait_for(lambda: notifiers(host).get("recorder") == "running")
    return out


def test_deleting_plugins_keeps_the_last_versions_running_and_a_restore_reloads_within_2_s(host, loaded, tmp_path):
    plugins = host.runtime.strategies.folder.parent
    saved = tmp_path / "plugins-saved"
    shutil.copytree(plugins, saved)
    shutil.rmtree(plugins)
    wait_for(lambda: events(host, "plugin_folder_missing"), timeout=3)
    missing = " ".join(e["message"] for e in events(host, "plugin_folder_missing"))
    assert "keeper" in missing and "recorder" in missing and "keep running" in missing
    problems = wait_for(lambda: [p for p in health(host) if "plugin folder" in p])
    assert str(plugins / "strategies") in problems[0]
    assert host.client.get("/healthz").status_code == 503
    # the strategy's logic still trades its alerts (2x), the passthrough does not take them (1x)
    stays(lambda: strategies(host)["keeper"]["status"] == "running" and notifiers(host)["recorder"] == "running",
          seconds=1.0)
    assert ordered_qty(host, "k1", 24000) == 20
    host.settle()
    wait_for(lambda: "order_filled" in loaded.read_text())  # the notifier still hears events
    # the folder comes back, with a new version of the strategy: live within 2 s
    (saved / "strategies" / "keeper.py").write_text(multiplier("keeper", "2.0", 3))
    shutil.copytree(saved, plugins)
    back = time.monotonic()
    wait_strategy(host, "keeper", status="running", version="2.0", timeout=2.0)
    assert time.monotonic() - back < 2.0
    assert ordered_qty(host, "k2", 24100) == 30
    wait_for(lambda: not [p for p in health(host) if "plugin folder" in p], timeout=2)
    assert events(host, "plugin_folder_back")
    assert notifiers(host)["recorder"] == "running"
    # and the re-armed watch sees later edits
    write(plugins / "strategies", "keeper", multiplier("keeper", "3.0", 4), atomic=True)
    wait_strategy(host, "keeper", version="3.0", timeout=2.0)


def test_a_kind_folder_removed_and_put_back_is_watched_again(host, loaded, tmp_path):
    folder = host.runtime.strategies.folder
    aside = tmp_path / "strategies-aside"
    folder.rename(aside)  # moved away: its watch follows the old directory, which must not count
    wait_for(lambda: [p for p in health(host) if str(folder) in p], timeout=3)
    (aside / "keeper.py").unlink()  # a delete in the moved-away folder is not a delete in plugins/strategies
    stays(lambda: strategies(host)["keeper"]["status"] == "running", seconds=0.8)
    assert ordered_qty(host, "m1", 24200) == 20
    assert notifiers(host)["recorder"] == "running"
    folder.mkdir()
    write(folder, "keeper", multiplier("keeper", "1.1", 5))
    wait_strategy(host, "keeper", version="1.1", timeout=2.0)
    assert ordered_qty(host, "m2", 24300) == 50
    wait_for(lambda: not [p for p in health(host) if "plugin folder" in p], timeout=2)
    write(folder, "fresh", multiplier("fresh", "1.0", 1))  # the new directory is watched
    wait_strategy(host, "fresh", status="running", timeout=2.0)


def test_a_restored_folder_without_a_file_stops_that_plugin_only(host, loaded, tmp_path):
    folder = host.runtime.strategies.folder
    write(folder, "other", multiplier("other", "1.0", 1))
    wait_strategy(host, "other", status="running")
    shutil.rmtree(folder)
    wait_for(lambda: events(host, "plugin_folder_missing"), timeout=3)
    folder.mkdir()
    time.sleep(0.3)  # an empty folder for a moment, as `mkdir` then `cp` gives: nothing is stopped yet
    write(folder, "keeper", multiplier("keeper", "1.0", 2))
    wait_for(lambda: "other" not in strategies(host), timeout=4)
    assert strategies(host)["keeper"]["status"] == "running"
    assert [e for e in events(host, "plugin_removed") if "other" in e["message"]]
    assert not [e for e in events(host, "plugin_removed") if "keeper" in e["message"]]


def test_a_folder_deleted_and_copied_back_at_once_is_watched_again(host, loaded, tmp_path):
    folder = host.runtime.strategies.folder
    saved = tmp_path / "strategies-saved"
    shutil.copytree(folder, saved)
    for _ in range(3):  # the new directory may even get the old one's inode number
        shutil.rmtree(folder)
        shutil.copytree(saved, folder)
    time.sleep(0.5)  # the events of the delete and the copy are settled: only a live watch sees the next save
    write(folder, "keeper", multiplier("keeper", "2.0", 3), atomic=True)
    wait_strategy(host, "keeper", status="running", version="2.0", timeout=2.0)
    assert not events(host, "plugin_removed")


def test_plugins_dir_as_a_symlink_switched_to_another_release_is_loaded_within_2_s(host_factory, tmp_path):
    """A release-plus-symlink deploy: `ln -sfn rel2 current` loads rel2; deleting rel1 then is no problem."""
    for rel, version, factor in (("rel1", "1.0", 2), ("rel2", "2.0", 3)):
        write(tmp_path / rel / "strategies", "keeper", multiplier("keeper", version, factor))
        (tmp_path / rel / "notifiers").mkdir()
    write(tmp_path / "rel1" / "strategies", "other", multiplier("other", "1.0", 1))  # not in rel2
    current = tmp_path / "current"
    current.symlink_to("rel1")
    host = host_factory(PLUGINS_DIR=current)
    wait_strategy(host, "keeper", status="running", version="1.0")
    wait_strategy(host, "other", status="running")
    switch = tmp_path / "current.new"
    switch.symlink_to("rel2")
    switch.replace(current)  # what `ln -sfn` and deploy tools do: an atomic rename over the old link
    switched = time.monotonic()
    wait_strategy(host, "keeper", status="running", version="2.0", timeout=2.0)
    assert time.monotonic() - switched < 2.0
    assert ordered_qty(host, "r1", 24400) == 30
    wait_for(lambda: "other" not in strategies(host), timeout=3)  # absent from rel2: stopped, as a deleted file
    assert [e for e in events(host, "plugin_folder_switched") if "rel2" in e["message"]]
    shutil.rmtree(tmp_path / "rel1")  # the old release is cleaned up: PLUGINS_DIR itself is fine
    stays(lambda: not [p for p in health(host) if "plugin folder" in p], seconds=1.0)
    assert host.client.get("/healthz").status_code == 200
    assert strategies(host)["keeper"]["status"] == "running"
    write(current / "strategies", "keeper", multiplier("keeper", "2.1", 4), atomic=True)  # edits in rel2 are seen
    wait_strategy(host, "keeper", version="2.1", timeout=2.0)
