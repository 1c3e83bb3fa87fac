"""Which callback URLs batchops may call: http(s), no credentials, an allowlisted host, and
(unless ``callback_allow_private``) only public addresses.

The check runs when a batch is submitted and again before every delivery, resolving the host
each time: a name that pointed to a public address at submit time may point to 127.0.0.1 or
169.254.169.254 later (DNS rebinding). The delivery then connects to the very addresses this
check approved (:attr:`CallbackTarget.addresses`), so nothing resolves in between.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import httpx

from batchops.errors import CallbackHostUnresolvable, CallbackUrlNotAllowed
from batchops.hosts import host_allowed
from batchops.settings import Settings

__all__ = ["MAX_CALLBACK_URL_LENGTH", "CallbackTarget", "check_callback_url", "host_allowed"]

MAX_CALLBACK_URL_LENGTH = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class CallbackTarget:
    """An approved callback URL and the addresses its host resolved to (in resolver order)."""

    url: httpx.URL
    host: str
    addresses: tuple[str, ...]


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the IPv4 address in the last 32 bits
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: local use, any prefix length
_TRANSLATED = 0xFFFF0000  # ::ffff:0:a.b.c.d, RFC 2765


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address stands for, and the form: a packet to it may reach
    that IPv4 address (through a relay, a NAT64 gateway or the host's own dual stack)."""
    if ip.ipv4_mapped is not None:
        return "an IPv4-mapped address", ip.ipv4_mapped
    if ip.sixtofour is not None:
        return "a 6to4 address", ip.sixtofour
    if ip.teredo is not None:
        return "a Teredo address", ip.teredo[1]  # the client, de-obfuscated
    value = int(ip)
    if ip in _NAT64:
        return "a NAT64 address", ipaddress.IPv4Address(value & 0xFFFFFFFF)
    high = value >> 32
    if high == _TRANSLATED:
        return "an IPv4-translated address", ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if high == 0 and value > 1:  # not :: or ::1
        return "an IPv4-compatible address", ipaddress.IPv4Address(value)
    return None


def _address_problem(ip: IPAddress, allow_private: bool) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            form, ipv4 = embedded
            problem = _address_problem(ipv4, allow_private)
            if problem:
                return f"{form} of {problem} ({ipv4})"
        if ip in _LOCAL_NAT64 and not allow_private:
            # Where the IPv4 address sits depends on the operator's prefix: refused whole.
            return "a local-use NAT64 address"
    if ip.is_unspecified or ip.is_multicast:
        return "an unspecified or multicast address"
    if allow_private or (ip.is_global and not ip.is_reserved):
        return None
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_private:
        return "a private address"
    return "a reserved (non-public) address"


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise CallbackHostUnresolvable(f"host {host!r} does not resolve ({exc})") from None
    seen: dict[str, IPAddress] = {}
    for *_, sockaddr in infos:
        # Drop an IPv6 zone ("fe80::1%eth0"): the address itself is what is judged.
        text = str(sockaddr[0]).split("%", 1)[0]
        seen.setdefault(text, ipaddress.ip_address(text))
    if not seen:
        raise CallbackHostUnresolvable(f"host {host!r} has no address")
    return list(seen.values())


def check_callback_url(url: str, settings: Settings) -> CallbackTarget:
    """The approved target of ``url``, resolving its host now.

    Raises:
        CallbackUrlNotAllowed: with the reason (422 ``callback_url_not_allowed`` at submit).
        CallbackHostUnresolvable: the host has no address (a subclass of the above).
    """
    if len(url) > MAX_CALLBACK_URL_LENGTH:
        raise CallbackUrlNotAllowed(f"longer than {MAX_CALLBACK_URL_LENGTH} characters")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise CallbackUrlNotAllowed(f"not a valid URL ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        raise CallbackUrlNotAllowed("the scheme must be http or https")
    if parsed.userinfo:
        raise CallbackUrlNotAllowed("credentials (user:password@) are not allowed in the URL")
    host = parsed.raw_host.decode("ascii").lower().rstrip(".")
    if not host:
        raise CallbackUrlNotAllowed("the URL has no host")
    allowed = settings.callbacks.allowed_hosts
    if not allowed:
        raise CallbackUrlNotAllowed(
            "this server accepts no callbacks (BATCHOPS_CALLBACK_ALLOWED_HOSTS is empty)")
    if not host_allowed(host, allowed):
        raise CallbackUrlNotAllowed(f"host {host!r} is not on the callback allowlist")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = _resolve(host, port)
    for ip in addresses:
        problem = _address_problem(ip, settings.callbacks.allow_private)
        if problem:
            raise CallbackUrlNotAllowed(f"host {host!r} resolves to {problem} ({ip})")
    return CallbackTarget(parsed.copy_with(fragment=None), host, tuple(str(ip) for ip in addresses))
