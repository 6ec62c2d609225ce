"""Strategy routing: an alert's strategy_name picks a plugin; unknown names use passthrough."""
from __future__ import annotations

from typing import Optional

from .models import AlertRequest, Intent


def passthrough(alert: AlertRequest) -> list[Intent]:
    """The built-in strategy: every leg becomes an intent, exactly as given."""
    return [Intent(**vars(leg), action=alert.execution_type) for leg in alert.legs]


class StrategyRouter:
    """Finds the strategy for an alert; until plugins are loaded only passthrough exists."""

    def __init__(self, require_known: bool):
        self.require_known = require_known

    def known(self) -> set[str]:
        return set()

    def intents_for(self, alert: AlertRequest) -> tuple[Optional[list[Intent]], Optional[str]]:
        """The intents for an alert, or why the alert is rejected."""
        if alert.strategy not in self.known() and self.require_known:
            return None, (f"strategy_name: expected one of the loaded strategies "
                          f"({', '.join(sorted(self.known())) or 'none loaded'}) because REQUIRE_KNOWN_STRATEGY=true, "
                          f"found {alert.strategy!r}")
        return passthrough(alert), None
