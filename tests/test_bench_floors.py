"""The floors bench/webhook_latency.py measures the host against do what they say: the checked floor runs the host's
checks, the records floor writes the same rows with none (a floor that quietly ran another's work would make
the bench say the opposite of what is true: it did once, a class defined twice)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECRET = "floor-test-secret"


@pytest.fixture
def floors(tmp_path, monkeypatch):
    monkeypatch.setenv("BARE_DB", str(tmp_path / "bare.sqlite"))
    monkeypatch.setenv("BENCH_SECRET", SECRET)
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    sys.modules.pop("bare_app", None)
    import bare_app
    yield bare_app.app.test_client()
    for floor in (bare_app._checked_floor, bare_app._records_floor):
        if floor is not None:
            floor.stop()
            assert not any(t.is_alive() for t in floor.threads)
            floor.storage.close()
    sys.modules.pop("bare_app", None)


def body(strategy: str, qty: int = 75) -> bytes:
    return json.dumps({"secret_key": SECRET, "execution_type": "ENTRY", "strategy_name": strategy, "exchange": "NFO",
                       "legs": [{"tradingsymbol": "NIFTY28APR26C24500", "direction": "BUY", "qty": str(qty),
                                 "order_type": "LMT", "price": "42.5", "product_type": "M"}]}).encode()


def test_the_checked_floor_runs_the_hosts_checks(floors):
    assert floors.post("/webhook-checked-floor", data=body("c1")).status_code == 200
    assert floors.post("/webhook-checked-floor", data=body("c1")).get_json()["status"] == "duplicate"
    assert floors.post("/webhook-checked-floor", data=body("c2", qty=-5)).status_code == 422  # validation


def test_the_records_floor_writes_the_rows_and_checks_nothing(floors):
    for _ in range(2):  # the same body twice, an entry on a working entry: no duplicate check, no guard
        answer = floors.post("/webhook-records-floor", data=body("r1"))
        assert answer.status_code == 200 and answer.get_json()["status"] == "accepted", answer.get_json()
    import bare_app
    storage = bare_app._records_floor.storage
    orders = storage.rows("select id from orders where strategy = 'r1'")
    assert len(orders) == 2
    history = storage.rows("select status from order_history where order_id = ? order by rowid", (orders[0]["id"],))
    assert [h["status"] for h in history][:2] == ["NEW", "SUBMITTED"]
    assert storage.one("select believed from alert_positions where strategy = 'r1'")["believed"] == 75
