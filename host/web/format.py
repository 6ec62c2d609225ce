"""The dashboard's Jinja filters: money, quantities and times as host.display shows them."""
from __future__ import annotations

from flask import Flask

from ..display import inr, ist, money_text, number, order_price, qty, tone


def side_of(value: object) -> str:
    """The CSS class of a net quantity: long, short or flat; its own colours, never the gain/loss ones."""
    t = tone(value)
    return {"gain": "qty-long", "loss": "qty-short"}.get(t, "qty-flat")


def init_app(app: Flask) -> None:
    app.jinja_env.filters.update(inr=inr, number=number, qty=qty, tone=tone, ist=ist, money_text=money_text,
                                 order_price=order_price, side=side_of)
