"""The dashboard's Jinja filters: money, quantities and times as host.display shows them."""
from __future__ import annotations

from flask import Flask

from ..display import inr, ist, number, qty, tone


def init_app(app: Flask) -> None:
    app.jinja_env.filters.update(inr=inr, number=number, qty=qty, tone=tone, ist=ist)
