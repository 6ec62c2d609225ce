"""Every hook a plugin can implement: one documented function each, with no body.

Strategies live in `plugins/strategies/<name>.py`, notifiers in `plugins/notifiers/<name>.py`.
Implement a hook by defining a function of the same name decorated with `@hookimpl`, taking any
subset of the arguments shown here (never with default values: pluggy would not pass them).
The full guide with examples is `docs/plugins.md`.
"""
from __future__ import annotations

import pluggy

PROJECT = "strategy_host"
hookspec = pluggy.HookspecMarker(PROJECT)
API_VERSION = 1

# ---------------------------------------------------------------- strategies


@hookspec(firstresult=True)
def strategy_meta():
    """Required. Describe the strategy: return a dict with `name` (the file name without .py),
    `version` (a string), `api_version` (1), and optionally `symbols` (a list of "EXCHANGE:SYMBOL"
    whose ticks it wants) and `params` (a dict of default parameters)."""


@hookspec(firstresult=True)
def strategy_validate(params):
    """Check the parameters (defaults merged with the config's); return a list of problems as
    strings (empty or None when they are fine). A problem stops the version from starting."""


@hookspec(firstresult=True)
def strategy_start(ctx):
    """Called once when this version starts, before any event; `ctx.state` already holds the state
    saved by the previous version or run. Returns nothing."""


@hookspec(firstresult=True)
def strategy_on_alert(ctx, alert):
    """A TradingView ENTRY, EXIT or ADJUST alert named this strategy. `alert` is an AlertRequest
    (strategy, execution_type, legs, client_alert_id, notes); each leg's `protection` holds the
    stop, target, trailing and strategy MTM limits the alert carried (or None): keep them with
    `Intent(**vars(leg), action=...)`, or set your own with `ctx.protect(intent, ...)`. Return a list
    of Intent (or one, or None). Without this hook the alert's legs are executed as given, like the built-in passthrough.
    POSITION alerts never reach it: the host plans them from the strategy's own position."""


@hookspec(firstresult=True)
def strategy_on_tick(ctx, tick):
    """A new last price for one of the strategy's symbols (`tick.exchange`, `tick.symbol`,
    `tick.ltp` as Decimal). Return a list of Intent (or one, or None)."""


@hookspec(firstresult=True)
def strategy_on_clock(ctx, now):
    """Called about once a second with `now`, an aware datetime in Asia/Kolkata. Return a list of
    Intent (or one, or None)."""


@hookspec(firstresult=True)
def strategy_on_order(ctx, order):
    """One of the strategy's own orders changed (`order` is an Order: id, symbol, side, qty,
    status, filled_qty, avg_price, reason, ...). Return a list of Intent (or one, or None)."""


@hookspec(firstresult=True)
def strategy_snapshot(ctx):
    """Return the state to keep (JSON-able); it is saved, and handed to the next version on a
    reload or restart. Without this hook `ctx.state` itself is kept."""


@hookspec(firstresult=True)
def strategy_stop(ctx, reason):
    """This version stops: `reason` is "reload", "deleted", "disabled" or "shutdown"; or, for a version
    whose `strategy_start` raised or overran its budget, a sentence saying so (it never went live, and
    what it started must end). Returns nothing."""


# ---------------------------------------------------------------- notifiers


@hookspec(firstresult=True)
def notifier_meta():
    """Required. Describe the notifier: a dict with `name` (the file name without .py), `version`
    and `api_version` (1)."""


@hookspec(firstresult=True)
def notifier_start(ctx):
    """Called once when this version starts; `ctx` has `settings` (secrets removed except the ones
    the notifier is given), `logger` and `state`. Returns nothing, or `{"idle": "why"}` when the
    notifier cannot send (a missing token): its status is then `idle`, with that reason, not `running`."""


@hookspec(firstresult=True)
def notifier_send(event):
    """Deliver one event: a dict with `id`, `at`, `kind`, `severity`, `strategy`, `message` and
    `data`. Called off the trading path; a slow or failing notifier never delays an order."""


@hookspec(firstresult=True)
def notifier_stop(reason):
    """This version stops: `reason` is "reload", "deleted", "disabled" or "shutdown"; or, for a version
    whose `notifier_start` raised or overran its budget, a sentence saying so (it never went live, and
    what it started, a polling thread say, must end)."""


def names(kind: str) -> list[str]:
    """The hook names of one kind ("strategy" or "notifier")."""
    return [n for n, v in globals().items() if n.startswith(kind + "_") and callable(v) and hasattr(v, PROJECT + "_spec")]
