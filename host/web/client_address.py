"""The client's real address: forwarded headers are believed only when they come from a trusted proxy."""
from __future__ import annotations

import functools
import ipaddress
from typing import Iterable, Optional, Sequence, Union

from flask import current_app, request

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
MAX_ADDRESS = 64  # characters: longer is no address (and is not kept in the cache)
MAX_HOPS = 32  # trusted hops walked back at most; a longer chain stops at the last one checked


def parse_address(text: str) -> Optional[Address]:
    """An IP address (IPv4-mapped IPv6 as IPv4, [v6] brackets allowed), or None for anything else."""
    t = text.strip()
    return _parsed(t) if len(t) <= MAX_ADDRESS else None


@functools.lru_cache(maxsize=1024)  # the same few peers (TradingView's, a proxy's) call again and again
def _parsed(t: str) -> Optional[Address]:
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
    try:
        addr = ipaddress.ip_address(t)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


def in_networks(addr: Optional[Address], networks: Iterable[Network]) -> bool:
    """True when the address is inside one of the networks (never for None)."""
    return addr is not None and any(addr in net for net in networks)


def resolve(peer: str, forwarded_for: Sequence[str], real_ip: Optional[str], proxies: Sequence[Network]) -> str:
    """The right-most address that is not a trusted proxy, walking back from the direct peer.

    Headers count only while every hop to their right is a trusted proxy: a client writes the left end of
    X-Forwarded-For, only the proxies append to its right end. X-Real-IP is used when X-Forwarded-For is absent.
    An entry that is not an IP address ends the walk at the last address checked.
    """
    current = parse_address(peer)
    if current is None:
        return peer
    hops = [h for value in forwarded_for for h in value.split(",")]
    if not hops and real_ip is not None:
        hops = [real_ip]
    for hop in reversed(hops[-MAX_HOPS:]):
        if not in_networks(current, proxies):
            break
        addr = parse_address(hop)
        if addr is None:
            break
        current = addr
    return str(current)


def client_ip() -> str:
    """This request's client address (TRUST_PROXY_HEADERS and TRUSTED_PROXIES decide which headers count)."""
    s = current_app.extensions["host"].settings
    proxies = s.TRUSTED_PROXIES if s.TRUST_PROXY_HEADERS else ()
    return resolve(request.remote_addr or "", request.headers.getlist("X-Forwarded-For"),
                   request.headers.get("X-Real-IP"), proxies)


def unbelieved_forwarding() -> str:
    """Why this request's X-Forwarded-For/X-Real-IP were not used although TRUST_PROXY_HEADERS=true, or ""."""
    s = current_app.extensions["host"].settings
    if not s.TRUST_PROXY_HEADERS or not (request.headers.get("X-Forwarded-For") or request.headers.get("X-Real-IP")):
        return ""
    peer = request.remote_addr or ""
    if in_networks(parse_address(peer), s.TRUSTED_PROXIES):
        return ""
    return f" (its X-Forwarded-For/X-Real-IP are not believed: the peer {peer} is not in TRUSTED_PROXIES)"
