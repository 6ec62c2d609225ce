"""Passthrough, for TradingView: the smallest valid strategy.

A plugin with only `strategy_meta` executes an alert's legs exactly as given, like the built-in
passthrough that serves any strategy_name without a plugin. Copy this file to start your own:
the file name is the strategy's name, and `name` must match it.
"""
from host import hookimpl


@hookimpl
def strategy_meta():
    return {"name": "passthrough", "version": "1.0", "api_version": 1}
