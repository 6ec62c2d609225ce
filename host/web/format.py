"""The dashboard's Jinja filters: money, quantities and times as host.display shows them."""
from __future__ import annotations

import re

from flask import Flask
from markupsafe import Markup, escape

from ..display import inr, ist, money_text, number, order_price, qty, tone


def side_of(value: object) -> str:
    """The CSS class of a net quantity: long, short or flat; its own colours, never the gain/loss ones."""
    t = tone(value)
    return {"gain": "qty-long", "loss": "qty-short"}.get(t, "qty-flat")


_AMOUNT = re.compile(r"[−+]?₹[0-9,]+(?:\.[0-9]+)?")


def money_html(text: object) -> Markup:
    """money_text for a page: each amount kept on one line, so a minus sign never wraps away from its ₹."""
    return Markup(_AMOUNT.sub(lambda m: f'<span class="money">{m[0]}</span>', str(escape(money_text(text)))))


def init_app(app: Flask) -> None:
    app.jinja_env.filters.update(inr=inr, number=number, qty=qty, tone=tone, ist=ist, money_text=money_html,
                                 order_price=order_price, side=side_of)
