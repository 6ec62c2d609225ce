"""Strategy host for algorithmic trading on Shoonya (Noren OMS)."""
from __future__ import annotations

__version__ = "0.1.0"
