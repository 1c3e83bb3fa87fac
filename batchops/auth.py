"""API keys: who is calling, as a scope; and where a server without keys may listen.

Keys come from ``settings.api_keys`` (``SecretStr``), either as the key itself or as its hash
written ``sha256:<hex>`` (so a config file need not hold the key). Only SHA-256 hashes are
kept, and a presented key's hash is compared with every stored hash in constant time
(:func:`hmac.compare_digest`). A key's *scope* — the name its batches and idempotency keys
live under — is a short id derived from its hash (``key-1a2b3c4d5e6f``), never the key.

With no keys configured authentication is off, every caller shares the scope ``"default"``
and the server may only listen on the loopback interface (:func:`check_bind`; the API also
refuses requests that arrive on another interface). Then a web page the developer opens is
the threat: :class:`HostAllowlist` answers only requests whose ``Host`` is a loopback name (a
page on a rebound DNS name sends its own), and none sent by a page of another host (its
``Origin``; a form may post a CSV upload without any preflight).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

from batchops.errors import ConfigurationError, HostNotAllowed, InvalidApiKey, OriginNotAllowed
from batchops.hosts import canonical_host, host_allowed, host_of_header, host_of_origin
from batchops.settings import Settings

__all__ = [
    "DEFAULT_SCOPE",
    "LOOPBACK_HOSTS",
    "ApiKeyring",
    "HostAllowlist",
    "InvalidApiKey",
    "check_bind",
    "hash_key",
    "is_loopback",
]

DEFAULT_SCOPE = "default"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_HASH_PREFIX = "sha256:"
_SCOPE_ID_CHARS = 12


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of an API key (what is stored and compared)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKeyring:
    """The configured keys, as hashes only."""

    hashes: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeyring:
        hashes = []
        for secret in settings.api.keys:
            value = secret.get_secret_value().strip()
            if value.startswith(_HASH_PREFIX):
                digest = value[len(_HASH_PREFIX):].lower()
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    raise ConfigurationError("an api_keys entry 'sha256:…' needs 64 hex digits")
                hashes.append(digest)
            elif value:
                hashes.append(hash_key(value))
        return cls(tuple(hashes))

    @property
    def enabled(self) -> bool:
        return bool(self.hashes)

    def scope_for(self, presented: str | None) -> str:
        """The caller's scope; :class:`InvalidApiKey` when a key is needed and does not match."""
        if not self.enabled:
            return DEFAULT_SCOPE
        if not presented:
            raise InvalidApiKey("an API key is required: 'Authorization: Bearer <key>' or "
                                "'X-API-Key: <key>'")
        digest = hash_key(presented)
        match: str | None = None
        for stored in self.hashes:  # no early exit: every comparison takes the same time
            if hmac.compare_digest(digest, stored):
                match = stored
        if match is None:
            raise InvalidApiKey("the API key is not valid")
        return f"key-{match[:_SCOPE_ID_CHARS]}"


@dataclass(frozen=True)
class HostAllowlist:
    """Which ``Host`` values the API answers, and whether a request's ``Origin`` must be one
    of them too.

    ``settings.allowed_hosts`` when set; otherwise the loopback names without API keys and
    any host with them (a key is not sent by a page the developer happens to open). The
    ``Origin`` is checked without API keys only.
    """

    hosts: tuple[str, ...] | None  # None: any host
    check_origin: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> HostAllowlist:
        keyless = not ApiKeyring.from_settings(settings).enabled
        if settings.api.allowed_hosts is not None:
            configured = [canonical_host(h) for h in settings.api.allowed_hosts]
        elif keyless:
            configured = sorted(canonical_host(h) for h in LOOPBACK_HOSTS)
        else:
            configured = ["*"]
        hosts = None if "*" in configured else tuple(configured)
        return cls(hosts, check_origin=keyless and hosts is not None)

    def check(self, host: str | None, origin: str | None) -> None:
        """Raises :class:`HostNotAllowed` or :class:`OriginNotAllowed` for a refused request."""
        if self.hosts is None:
            return
        allowed = list(self.hosts)
        name = host_of_header(host) if host is not None else None
        if name is None or not host_allowed(name, allowed):
            shown = "no Host header" if host is None else f"Host {host[:100]!r}"
            raise HostNotAllowed(f"this API answers only for the hosts {', '.join(allowed)} "
                                 f"(BATCHOPS_ALLOWED_HOSTS); the request has {shown}")
        if self.check_origin and origin is not None:
            source = host_of_origin(origin)
            if source is None or not host_allowed(source, allowed):
                raise OriginNotAllowed(
                    f"no API keys are configured, so requests from web pages of other hosts "
                    f"are refused; the request comes from Origin {origin[:100]!r}")


def check_bind(host: str, settings: Settings) -> None:
    """Refuse to listen beyond the loopback interface when no API keys are configured.

    Raises:
        ConfigurationError: no keys, and ``host`` is not a loopback address.
    """
    if ApiKeyring.from_settings(settings).enabled:
        return
    if not is_loopback(host):
        raise ConfigurationError(
            f"no API keys are configured (BATCHOPS_API_KEYS), so the API may only listen on "
            f"127.0.0.1, not {host!r}; configure keys to serve other hosts")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
