"""The built-in passthrough strategy: every leg of an alert becomes an intent, exactly as given.

It serves alerts whose strategy_name has no plugin, and plugins that have no strategy_on_alert.
"""
from host import __version__, hookimpl
from host.models import Intent


@hookimpl
def strategy_meta():
    return {"name": "passthrough", "version": __version__, "api_version": 1}


@hookimpl
def strategy_on_alert(ctx, alert):
    return [Intent(**vars(leg), action=alert.execution_type) for leg in alert.legs]
