"""Completion callbacks: the signed summary POSTed to a batch's ``callback_url``.

A delivery is a ``POST`` of a JSON body::

    {"event": "batch.completed", "batch_id": "…", "status": "completed",
     "summary": {"total": 5, "succeeded": 4, "failed": 1, "skipped": 0},
     "finished_at": "2026-11-23T10:00:00Z", "status_url": "https://…/batches/…/status"}

with headers

* ``Batchops-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{body}")>`` — the
  scheme of Stripe's webhooks: check it with :func:`verify_signature`;
* ``Batchops-Event: batch.<status>`` (``batch.completed``, ``batch.failed``,
  ``batch.cancelled``);
* ``Batchops-Delivery`` and ``Idempotency-Key``: one id per delivery, the same on every retry
  of it, so a receiver can drop duplicates (a retried batch that finishes again is a new one).

:func:`deliver_callback` makes one attempt and records it in ``batch_callbacks`` (what
``GET /batches/{id}/status`` shows as ``callback``); the ``send_callback`` task retries it.
A callback never changes its batch's outcome.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.engine import Connection

from batchops.callback_urls import CallbackTarget, check_callback_url
from batchops.errors import (
    CallbackDeliveryFailed,
    CallbackHostUnresolvable,
    CallbackUrlNotAllowed,
    SignatureVerificationError,
)
from batchops.schemas import BatchStatus, CallbackState, CallbackStatus
from batchops.settings import Settings
from batchops.store import Store
from batchops.tables import metadata, utcnow

__all__ = [
    "DELIVERY_HEADER",
    "EVENT_HEADER",
    "SIGNATURE_HEADER",
    "CallbackRecords",
    "batch_callbacks",
    "callback_payload",
    "deliver_callback",
    "sign",
    "verify_signature",
]

logger = logging.getLogger("batchops.callbacks")

SIGNATURE_HEADER = "Batchops-Signature"
EVENT_HEADER = "Batchops-Event"
DELIVERY_HEADER = "Batchops-Delivery"
_DELIVERY_NAMESPACE = uuid.UUID("5f0e6c7a-7d1b-4c55-9a57-3f4f3b8e2c11")
_MAX_ERROR = 500  # characters of an error message kept in the store

batch_callbacks = sa.Table(
    "batch_callbacks",
    metadata,
    sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("status_url", sa.Text),
    sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
    sa.Column("delivery_id", sa.String(64)),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_status_code", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("last_attempt_at", sa.DateTime(timezone=True)),
    sa.Column("delivered_at", sa.DateTime(timezone=True)),
)


# -- signing -----------------------------------------------------------------------------------


def _key(secret: str | bytes | SecretStr) -> bytes:
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    return secret.encode() if isinstance(secret, str) else secret


def _mac(key: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str | bytes | SecretStr, body: bytes, timestamp: int | None = None) -> str:
    """The ``Batchops-Signature`` value for ``body``: ``t=<unix seconds>,v1=<hex mac>``."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_mac(_key(secret), t, body)}"


def verify_signature(secret: str | bytes | SecretStr, header: str | None, body: bytes,
                     tolerance: float = 300, *, now: float | None = None) -> int:
    """Check a received callback; its timestamp when the signature is valid.

    ``body`` is the request body exactly as received (bytes, before any JSON parsing).
    Several ``v1`` entries are accepted (any one matching is enough), so a sender can sign
    with an old and a new secret while they are rotated.

    Raises:
        SignatureVerificationError: no or malformed header, no matching ``v1`` (wrong secret or
            altered body), or a timestamp more than ``tolerance`` seconds from now (a replay).
    """
    if not header:
        raise SignatureVerificationError(f"no {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    macs: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureVerificationError("malformed timestamp") from None
        elif name == "v1":
            macs.append(value)
    if timestamp is None or not macs:
        raise SignatureVerificationError(f"malformed {SIGNATURE_HEADER} header")
    expected = _mac(_key(secret), timestamp, body)
    if not any(hmac.compare_digest(expected, mac) for mac in macs):
        raise SignatureVerificationError("signature does not match the body")
    age = (time.time() if now is None else now) - timestamp
    if abs(age) > tolerance:
        raise SignatureVerificationError(
            f"timestamp is {age:.0f} s from now (tolerance {tolerance:g} s): a replay?")
    return timestamp


# -- the store's record of a batch's callback ---------------------------------------------------


class CallbackRecords:
    """Each batch's callback URL and the outcome of its delivery (``batch_callbacks``)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, conn: Connection, batch_id: str, url: str, status_url: str | None) -> None:
        """Record the callback of a batch being registered (in its transaction)."""
        conn.execute(batch_callbacks.insert().values(batch_id=batch_id, url=url,
                                                     status_url=status_url))

    def _row(self, batch_id: str) -> sa.RowMapping | None:
        with self.store.read() as conn:
            return conn.execute(batch_callbacks.select().where(
                batch_callbacks.c.batch_id == batch_id)).mappings().first()

    def get(self, batch_id: str) -> CallbackStatus | None:
        """The callback's delivery status; ``None`` for a batch without a callback."""
        row = self._row(batch_id)
        if row is None:
            return None
        return CallbackStatus(
            url=row["url"], status=CallbackState(row["status"]), attempts=row["attempts"],
            delivery_id=row["delivery_id"], last_status_code=row["last_status_code"],
            last_error=row["last_error"], last_attempt_at=_aware(row["last_attempt_at"]),
            delivered_at=_aware(row["delivered_at"]))

    def _update(self, batch_id: str, **values: Any) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(batch_callbacks.update().where(
                batch_callbacks.c.batch_id == batch_id).values(**values))


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; they were written as UTC.
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


# -- delivering ---------------------------------------------------------------------------------


def callback_payload(status: BatchStatus, status_url: str | None) -> dict[str, Any]:
    """The body of a batch's completion callback."""
    payload: dict[str, Any] = {
        "event": f"batch.{status.status.value}",
        "batch_id": status.batch_id,
        "status": status.status.value,
        "summary": {"total": status.total, "succeeded": status.succeeded,
                    "failed": status.failed, "skipped": status.skipped},
        "finished_at": status.finished_at.isoformat().replace("+00:00", "Z")
        if status.finished_at else None,
    }
    if status_url:
        payload["status_url"] = status_url
    return payload


def _delivery_id(batch_id: str, generation: int, status: str) -> str:
    # The same id on every retry of one delivery; a new one when a retried batch ends again.
    return uuid.uuid5(_DELIVERY_NAMESPACE, f"{batch_id}:{generation}:{status}").hex


def _pinned_request(target: CallbackTarget, address: str) -> tuple[httpx.URL, dict[str, str],
                                                                     dict[str, Any]]:
    """The URL with its host replaced by an approved address: nothing resolves the name again
    between the check and the connection. ``Host`` and TLS (SNI, certificate) keep the name."""
    url = target.url
    host_header = url.netloc.decode("ascii")
    extensions: dict[str, Any] = {}
    if url.scheme == "https":
        extensions["sni_hostname"] = target.host
    return url.copy_with(host=address), {"Host": host_header}, extensions


def _post(target: CallbackTarget, body: bytes, headers: dict[str, str],
          timeout: float) -> httpx.Response:
    """POST to the first approved address that accepts a connection."""
    error: httpx.ConnectError | None = None
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for address in target.addresses:
            url, host, extensions = _pinned_request(target, address)
            request = client.build_request("POST", url, content=body,
                                           headers={**headers, **host}, extensions=extensions)
            try:
                # The receiver's answer body is not read: only its status counts.
                response = client.send(request, stream=True)
                response.close()
                return response
            except httpx.ConnectError as exc:
                error = exc
    assert error is not None
    raise error


def deliver_callback(store: Store, settings: Settings, batch_id: str, *, attempt: int = 1,
                     final: bool = True) -> CallbackStatus | None:
    """One delivery attempt of the batch's completion callback, recorded in the store.

    Args:
        attempt: 1 for a delivery's first attempt (its record starts afresh), then 2, 3, …
        final: no retry follows: a retryable failure is recorded as ``failed``.

    Returns:
        The delivery status (``delivered``), or ``None`` when the batch has no callback.

    Raises:
        CallbackDeliveryFailed: not delivered; ``retryable`` for connection errors, timeouts,
            429 and 5xx (and a host that does not resolve), not for other answers or a URL
            that is no longer allowed (recorded ``refused``).
    """
    records = CallbackRecords(store)
    row = records._row(batch_id)
    if row is None:
        return None
    batch = store.get_batch(batch_id)
    status = store.status(batch_id)
    delivery_id = _delivery_id(batch_id, batch.generation, status.status.value)
    if row["delivery_id"] == delivery_id and row["status"] == CallbackState.DELIVERED.value:
        return records.get(batch_id)  # a re-run of the flow: this delivery was made
    if attempt == 1 or row["delivery_id"] != delivery_id:
        records._update(batch_id, delivery_id=delivery_id, status=CallbackState.PENDING.value,
                        attempts=0, last_status_code=None, last_error=None, delivered_at=None)

    def failure(message: str, *, retryable: bool, code: int | None = None,
                state: CallbackState = CallbackState.FAILED,
                sent: bool = True) -> CallbackDeliveryFailed:
        """Record a failed attempt (``sent``: a request went out); the error to raise."""
        retry = retryable and not final
        records._update(
            batch_id, status=(CallbackState.PENDING if retry else state).value,
            last_status_code=code, last_error=message[:_MAX_ERROR], last_attempt_at=utcnow(),
            **({"attempts": batch_callbacks.c.attempts + 1} if sent else {}))
        logger.warning("batch %s: callback %s (attempt %d): %s%s", batch_id, delivery_id,
                       attempt, message, "; will retry" if retry else "")
        return CallbackDeliveryFailed(message, retryable=retryable, status_code=code)

    try:
        target = check_callback_url(row["url"], settings)
    except CallbackHostUnresolvable as exc:  # DNS may answer again later: retried
        raise failure(exc.reason, retryable=True, sent=False) from None
    except CallbackUrlNotAllowed as exc:
        raise failure(f"refused: {exc.reason}", retryable=False, state=CallbackState.REFUSED,
                      sent=False) from None
    secret = settings.callbacks.secret
    if secret is None:
        raise failure("refused: no callback_secret is configured", retryable=False,
                      state=CallbackState.REFUSED, sent=False)

    event = f"batch.{status.status.value}"
    body = json.dumps(callback_payload(status, row["status_url"]),
                      separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "batchops-callbacks/1",
        SIGNATURE_HEADER: sign(secret, body),
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery_id,
        "Idempotency-Key": delivery_id,
    }
    try:
        response = _post(target, body, headers, settings.callbacks.timeout_seconds)
    except httpx.TransportError as exc:  # connection refused or lost, timeouts
        raise failure(f"{type(exc).__name__}: {exc}", retryable=True) from None
    code = response.status_code
    if code >= 300:
        retryable = code == 429 or code >= 500
        reason = "redirects are not followed" if code < 400 else response.reason_phrase
        raise failure(f"the receiver answered {code} ({reason})", retryable=retryable,
                      code=code)
    records._update(batch_id, status=CallbackState.DELIVERED.value, last_status_code=code,
                    last_error=None, last_attempt_at=utcnow(), delivered_at=utcnow(),
                    attempts=batch_callbacks.c.attempts + 1)
    logger.info("batch %s: callback %s delivered (attempt %d, %d)", batch_id, delivery_id,
                attempt, code)
    return records.get(batch_id)
