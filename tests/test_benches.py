"""Every bench under bench/ runs in its short mode, so that none can rot; nothing here is about speed."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
# each bench script and a line its figures are printed on
FIGURES = {
    "webhook_latency.py": "webhook p50 (ms)",
    "flat_cost.py": "last block p50 / first block p50",
    "plugin_rss.py": "RSS, after ticking (MB)",
    "broker_roundtrip.py": "alert-to-ack p50 (ms)",
    "dashboard_panels.py": "p50",
    "plugin_reload.py": "save-to-live p50 (ms)",
    "telegram_overhead.py": "p50",
    "backup_online.py": "during the backup",
    "slow_clients.py": "20 slow bodies",
    "risk_history.py": "two years / a week",
}


def test_every_bench_script_is_listed_here():
    scripts = {p.name for p in (ROOT / "bench").glob("*.py")} - {"bare_app.py"}
    assert scripts == set(FIGURES), f"benches without a short-mode check: {sorted(scripts - set(FIGURES))}"


@pytest.mark.parametrize("script", sorted(FIGURES))
def test_bench_runs_in_its_short_mode_and_prints_its_figures(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--short"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    assert FIGURES[script] in done.stdout, f"{script} printed no figures:\n{done.stdout}"
    assert "nan" not in done.stdout.lower().split(), done.stdout
    if script == "webhook_latency.py":  # the order-life floor did the work it is a floor for: every order filled
        filled = re.search(r"order-life floor orders filled: (\d+) of (\d+)", done.stdout)
        assert filled and int(filled[1]) == int(filled[2]) > 0, done.stdout
        # and the records and checked floors: every alert accepted (through the host's checks), every order filled
        for name in ("records floor", "checked floor"):
            kept = re.search(rf"{name} (\d+);.*{name}'s: (\d+) of (\d+)", done.stdout)
            assert kept and kept[1] == "0" and int(kept[2]) == int(kept[3]) > 0, (name, done.stdout)
    print(f"{script} --short: {took:.1f} s\n{done.stdout}")
