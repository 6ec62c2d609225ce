"""Ready TradingView alert messages, as the first-run banner and the README show them."""
from __future__ import annotations

import json

STRATEGY_ALERT = {
    "secret_key": "{secret}", "execution_type": "POSITION", "strategy_name": "my_strategy", "exchange": "NFO",
    "alert_id": "{{strategy.order.id}}@{{timenow}}",
    "legs": [{"tradingsymbol": "NIFTY29DEC26F", "position": "{{strategy.position_size}}", "order_type": "MKT",
              "product_type": "M"}],
}


def _indicator(execution_type: str, direction: str) -> dict:
    return {"secret_key": "{secret}", "execution_type": execution_type, "strategy_name": "my_indicator",
            "exchange": "NSE", "alert_id": f"{execution_type.lower()}@{{{{timenow}}}}",
            "legs": [{"tradingsymbol": "{{ticker}}", "direction": direction, "qty": "1", "order_type": "MKT",
                      "product_type": "I"}]}


WHY_POSITION = ("A position-target alert says what the strategy should hold, not what to trade: the host sends only "
                "the difference from that strategy's own position (filled and working orders), so a repeated or "
                "retried alert finds it already at target and sends nothing. A reversal exits first and enters only "
                "once the exit has filled, so the position never passes through zero twice or ends the wrong way.")


def messages(secret: str) -> list[tuple[str, str]]:
    """(title, message) for a strategy alert and an indicator alert's ENTRY and EXIT, with the secret filled in."""
    def text(body: dict) -> str:
        return json.dumps(body).replace("{secret}", secret)
    return [
        ("Strategy alert (Pine strategy; one alert for all its orders; replace the symbol with yours)",
         text(STRATEGY_ALERT)),
        ("Indicator alert, entry (one alert)", text(_indicator("ENTRY", "BUY"))),
        ("Indicator alert, exit (another alert)", text(_indicator("EXIT", "SELL"))),
    ]
