"""Geometry of the dashboard's two pictures, drawn as SVG by the server: no script, no chart library."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Optional, Sequence

WIDTH, HEIGHT = 600, 160


@dataclass(frozen=True)
class Gauge:
    """Day PnL on a scale from the loss limit (left) to the day's best (right), in percent of the width."""

    pnl_x: float
    zero_x: float
    warning_x: Optional[float]
    lo: Decimal
    hi: Decimal
    limit_x: float = 0.0


def gauge(pnl: Decimal, limit: Decimal, warning: Optional[Decimal], peak: Decimal) -> Gauge:
    lo = min(limit, pnl)
    hi = max(peak, pnl, Decimal(0), abs(limit) / 4)
    span = hi - lo or Decimal(1)

    def x(v: Decimal) -> float:
        return round(float((min(max(v, lo), hi) - lo) / span * 100), 2)
    return Gauge(pnl_x=x(pnl), zero_x=x(Decimal(0)), warning_x=None if warning is None else x(warning), lo=lo, hi=hi,
                 limit_x=x(limit))


@dataclass(frozen=True)
class Label:
    """A value named on the gauge: where it sits (percent of the width), how its text is anchored, its row."""

    name: str
    text: str
    x: float
    anchor: str
    row: int


LABEL_CHAR_PCT = 2.1  # one character of a label, in percent of a 390 px phone's gauge: sized for the narrowest screen
LABEL_ROWS = 3        # below the bar: a label that fits no row takes the last one


def gauge_labels(marks: Sequence[tuple[str, str, Optional[float]]]) -> list[Label]:
    """Place (name, text, x) labels in rows so that none overlaps another, in the order given (most important first)."""
    taken: list[list[tuple[float, float]]] = [[] for _ in range(LABEL_ROWS)]
    out = []
    for name, text, x in marks:
        if x is None:
            continue
        width = len(text) * LABEL_CHAR_PCT
        anchor = "start" if x - width / 2 < 0 else "end" if x + width / 2 > 100 else "middle"
        left = x if anchor == "start" else x - width if anchor == "end" else x - width / 2
        span = (left - 1, left + width + 1)
        row = next((i for i, spans in enumerate(taken) if all(span[1] <= a or span[0] >= b for a, b in spans)),
                   LABEL_ROWS - 1)
        taken[row].append(span)
        out.append(Label(name, text, x, anchor, row))
    return out


@dataclass(frozen=True)
class Line:
    """The day's PnL curve as an SVG path, with the zero line, and the lowest and highest PnL it shows."""

    path: str
    zero_y: float
    lo: Decimal
    hi: Decimal
    start: Optional[datetime]
    end: Optional[datetime]
    last_x: float
    last_y: float
    limit_y: Optional[float] = None


def line(points: Sequence[tuple[datetime, Decimal]], limit: Optional[Decimal] = None) -> Line:
    """Steps through time: PnL holds its value until the next point. The scale covers the curve, zero and the limit."""
    curve = [p for _, p in points] + [Decimal(0)]
    low, high = min(curve), max(curve)
    scale = curve + ([limit] if limit is not None else [])
    pad = (max(scale) - min(scale)) / 20 or Decimal(1)
    lo, hi = min(scale) - pad, max(scale) + pad
    limit_y = None if limit is None else _y(limit, lo, hi)
    if not points:
        y0 = _y(Decimal(0), lo, hi)
        return Line("", y0, low, high, None, None, 0.0, y0, limit_y)
    t0, t1 = points[0][0], points[-1][0]
    span = (t1 - t0).total_seconds() or 1.0
    coords = [(round((t - t0).total_seconds() / span * WIDTH, 1), _y(v, lo, hi)) for t, v in points]
    d = [f"M{coords[0][0]},{coords[0][1]}"]
    for (x, y), (_, prev_y) in zip(coords[1:], coords):
        d.append(f"H{x}V{y}" if y != prev_y else f"H{x}")
    if len(coords) == 1:
        d.append(f"H{WIDTH}")
    return Line(" ".join(d), _y(Decimal(0), lo, hi), low, high, t0, t1, coords[-1][0] if len(coords) > 1 else WIDTH,
                coords[-1][1], limit_y)


def _y(v: Decimal, lo: Decimal, hi: Decimal) -> float:
    return round(float((hi - v) / (hi - lo)) * HEIGHT, 1)
