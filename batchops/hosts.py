"""Host names as requests and settings write them: the host of a ``Host`` or ``Origin`` value,
and whether it is on an allowlist (``api.example.com``, ``*.example.com``, ``*``).

Hosts are compared in one form: lowercase, no port, no trailing dot, IPv6 addresses without
brackets and in their compressed notation (``[0:0::1]:8000`` is ``::1``).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

__all__ = ["canonical_host", "host_allowed", "host_of_header", "host_of_origin"]


def canonical_host(name: str) -> str:
    """``name`` in the form hosts are compared in."""
    host = name.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def host_allowed(host: str, allowed: list[str]) -> bool:
    """``host`` matches an entry: the same name, ``*.example.com`` (any subdomain, not the
    domain itself), or ``*`` (any host)."""
    for entry in allowed:
        if entry == "*" or entry == host:
            return True
        if entry.startswith("*.") and host.endswith(entry[1:]) and len(host) > len(entry) - 1:
            return True
    return False


def host_of_header(value: str) -> str | None:
    """The host of a ``Host`` header (``name``, ``name:port``, ``[v6]:port``); ``None`` when
    it is not one."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end], value[end + 1:]
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    else:
        host, _, port = value.partition(":")
        if port and not port.isdigit():  # also an IPv6 address without brackets
            return None
    if not host or any(c.isspace() or c in "/?#@\\" for c in host):
        return None
    return canonical_host(host)


def host_of_origin(value: str) -> str | None:
    """The host of an ``Origin`` header (``scheme://host[:port]``); ``None`` for ``null`` or
    anything else."""
    try:
        parts = urlsplit(value.strip())
        host = parts.hostname
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not host:
        return None
    return canonical_host(host)
