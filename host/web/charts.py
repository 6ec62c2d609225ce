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


def gauge(pnl: Decimal, limit: Decimal, warning: Optional[Decimal], peak: Decimal) -> Gauge:
    lo = min(limit, pnl)
    hi = max(peak, pnl, Decimal(0), abs(limit) / 4)
    span = hi - lo or Decimal(1)

    def x(v: Decimal) -> float:
        return round(float((min(max(v, lo), hi) - lo) / span * 100), 2)
    return Gauge(pnl_x=x(pnl), zero_x=x(Decimal(0)), warning_x=None if warning is None else x(warning), lo=lo, hi=hi)


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


def line(points: Sequence[tuple[datetime, Decimal]]) -> Line:
    """Steps through time: PnL holds its value until the next point. The scale covers the curve and zero."""
    values = [p for _, p in points] + [Decimal(0)]
    low, high = min(values), max(values)
    pad = (high - low) / 20 or Decimal(1)
    lo, hi = low - pad, high + pad
    if not points:
        y0 = _y(Decimal(0), lo, hi)
        return Line("", y0, low, high, None, None, 0.0, y0)
    t0, t1 = points[0][0], points[-1][0]
    span = (t1 - t0).total_seconds() or 1.0
    coords = [(round((t - t0).total_seconds() / span * WIDTH, 1), _y(v, lo, hi)) for t, v in points]
    d = [f"M{coords[0][0]},{coords[0][1]}"]
    for (x, y), (_, prev_y) in zip(coords[1:], coords):
        d.append(f"H{x}V{y}" if y != prev_y else f"H{x}")
    if len(coords) == 1:
        d.append(f"H{WIDTH}")
    return Line(" ".join(d), _y(Decimal(0), lo, hi), low, high, t0, t1, coords[-1][0] if len(coords) > 1 else WIDTH,
                coords[-1][1])


def _y(v: Decimal, lo: Decimal, hi: Decimal) -> float:
    return round(float((hi - v) / (hi - lo)) * HEIGHT, 1)
