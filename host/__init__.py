"""Strategy host for algorithmic trading on Shoonya (Noren OMS).

Plugin authors need only this import:

    from host import hookimpl, Intent, Side, OrderType, Product, ExecutionType
"""
from __future__ import annotations

import pluggy

from .hookspecs import API_VERSION, PROJECT
from .models import (AlertRequest, ExecutionType, Intent, Leg, Order, OrderSpec, OrderStatus, OrderType, Product,
                     Protection, Side, Tick)

__version__ = "0.2.0"
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["hookimpl", "API_VERSION", "AlertRequest", "ExecutionType", "Intent", "Leg", "Order", "OrderSpec",
           "OrderStatus", "OrderType", "Product", "Protection", "Side", "Tick", "__version__"]
