"""Our ids: short, time-ordered, unique; order ids travel to the broker as `remarks`."""
from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    """prefix + milliseconds in base 36 + 6 random hex digits, e.g. o1mh2k3x9a4f2c1."""
    ms = int(time.time() * 1000)
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while ms:
        ms, r = divmod(ms, 36)
        out = digits[r] + out
    return f"{prefix}{out}{secrets.token_hex(3)}"
