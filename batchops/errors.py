"""The batchops exception tree.

Every error batchops raises on purpose derives from :class:`BatchopsError` and carries a
stable ``code`` (what clients branch on) and an ``http_status`` (used by the API's
exception handlers, the one place errors become HTTP). The core never imports FastAPI.

::

    BatchopsError
    ├── BadRequest                400  bad_request
    │   └── MalformedInput        400  malformed_input   (unparseable CSV, files)
    │       └── MalformedJson     400  malformed_json    (a request body that is not JSON)
    ├── InvalidApiKey             401  unauthorized
    ├── OriginNotAllowed          403  origin_not_allowed (no API keys: a foreign web page)
    ├── UnsupportedMediaType      415  unsupported_media_type (the body's Content-Type)
    ├── HostNotAllowed            421  host_not_allowed  (a Host the settings do not allow)
    ├── QuotaExceeded             429  quota_exceeded    (``retry_after`` seconds)
    ├── BatchExceedsQuota         413  batch_exceeds_quota (more operations than the quota
    │                                                       allows in any one minute)
    ├── ValidationFailed          422  validation_failed (carries every FieldError)
    │   ├── CallbackUrlNotAllowed 422  callback_url_not_allowed (scheme, userinfo, allowlist,
    │   │   │                                                    private address)
    │   │   └── CallbackHostUnresolvable 422  callback_url_not_allowed (no DNS answer)
    │   ├── InvalidText           422  invalid_text      (a lone surrogate: not Unicode text)
    │   └── EmptyBatch            422  empty_batch       (no operations, a CSV of no rows)
    ├── EmptyReplayFilter         422  empty_replay_filter (a replay that names no dead letters)
    ├── BatchTooLarge             413  batch_too_large
    │   └── BodyTooLarge          413  batch_too_large   (bytes; the connection is closed)
    ├── NotFound                  404  not_found
    │   ├── BatchNotFound         404  batch_not_found
    │   └── DeadLetterNotFound    404  dead_letter_not_found (carries the unknown ids)
    ├── IdempotencyConflict       409  idempotency_key_reused
    ├── BatchInProgress           409  batch_in_progress
    ├── BatchFinished             409  batch_finished
    ├── DeadLetterReplayed        409  dead_letter_replayed (replayed already; ids, batches)
    ├── ConfigurationError        500  configuration_error
    ├── CallbackDeliveryFailed    502  callback_delivery_failed (``retryable``: 429/5xx/network)
    ├── SignatureVerificationError 400 invalid_signature (receivers: a callback's signature)
    └── TransientError            503  transient_error  (retried: connection loss, timeouts)

Item-level outcomes are not exceptions of this tree: a failed item is an
:class:`~batchops.schemas.ItemResult` with ``state="failed"`` and an ``error`` code.
Handlers may raise :class:`ItemError` (or a subclass) to choose their item's status/code.

:func:`is_transient` says which failures are worth retrying: :class:`TransientError`, and the
database errors of a store that is unreachable, busy or refusing writes for now.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

__all__ = [
    "BadRequest",
    "BatchExceedsQuota",
    "BatchFinished",
    "BatchInProgress",
    "BatchNotFound",
    "BatchTooLarge",
    "BatchopsError",
    "BodyTooLarge",
    "CallbackDeliveryFailed",
    "CallbackHostUnresolvable",
    "CallbackUrlNotAllowed",
    "ConfigurationError",
    "DeadLetterNotFound",
    "DeadLetterReplayed",
    "EmptyBatch",
    "EmptyReplayFilter",
    "FieldError",
    "HostNotAllowed",
    "IdempotencyConflict",
    "InvalidApiKey",
    "InvalidText",
    "ItemError",
    "MalformedInput",
    "MalformedJson",
    "NotFound",
    "OriginNotAllowed",
    "QuotaExceeded",
    "SignatureVerificationError",
    "TransientError",
    "UnsupportedMediaType",
    "ValidationFailed",
    "is_transient",
]


@dataclass(frozen=True, slots=True)
class FieldError:
    """One validation problem: which operation (index, id), which field, what is wrong."""

    index: int | None
    id: str | None
    field: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "field": self.field, "message": self.message}


class BatchopsError(Exception):
    """Base of every error batchops raises on purpose."""

    code: str = "batchops_error"
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> dict[str, Any]:
        """Extra members of the ``error`` object in an HTTP error body."""
        return {}

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.details()}


class BadRequest(BatchopsError):
    code = "bad_request"
    http_status = 400


class MalformedInput(BadRequest):
    code = "malformed_input"


class ValidationFailed(BatchopsError):
    """The batch has invalid operations; every problem is listed, nothing ran."""

    code = "validation_failed"
    http_status = 422

    def __init__(self, errors: list[FieldError], message: str | None = None) -> None:
        self.errors = errors
        n_ops = len({(e.index, e.id) for e in errors})
        super().__init__(
            message or f"{len(errors)} validation error(s) in {n_ops} operation(s); nothing ran"
        )

    def details(self) -> dict[str, Any]:
        return {"errors": [e.as_dict() for e in self.errors]}


class BatchTooLarge(BatchopsError):
    code = "batch_too_large"
    http_status = 413

    def __init__(self, count: int, limit: int) -> None:
        self.count = count
        self.limit = limit
        super().__init__(f"batch has more than {limit} operations (limit {limit})")

    def details(self) -> dict[str, Any]:
        return {"limit": self.limit}


class NotFound(BatchopsError):
    code = "not_found"
    http_status = 404


class BatchNotFound(NotFound):
    code = "batch_not_found"

    def __init__(self, batch_id: str) -> None:
        self.batch_id = batch_id
        super().__init__(f"no batch with id {batch_id!r}")


class IdempotencyConflict(BatchopsError):
    code = "idempotency_key_reused"
    http_status = 409


class BatchInProgress(BatchopsError):
    code = "batch_in_progress"
    http_status = 409


class BatchFinished(BatchopsError):
    code = "batch_finished"
    http_status = 409


class ConfigurationError(BatchopsError):
    code = "configuration_error"
    http_status = 500


class TransientError(BatchopsError):
    """A failure worth retrying: lost connection, timeout, server restarting."""

    code = "transient_error"
    http_status = 503


# PostgreSQL SQLSTATEs that pass: a read-only database (a replica, a failover under way,
# ``default_transaction_read_only``), serialization failures and deadlocks, too many
# connections or out of resources, a server shutting down or starting. Connection errors
# (class 08) arrive as ``OperationalError`` already.
_TRANSIENT_SQLSTATES = ("25006", "40001", "40P01", "53", "55P03", "57P01", "57P02", "57P03")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may pass if the work is tried again a little later.

    :class:`TransientError`, connection errors and timeouts; from a database, a lost or
    refused connection (``OperationalError``, ``InterfaceError``: SQLite's "database is
    locked" and "attempt to write a readonly database" among them) and PostgreSQL's
    read-only, serialization, resource and shutdown errors. A constraint violation, bad data
    or a bug is not transient.
    """
    if isinstance(exc, TransientError | ConnectionError | TimeoutError):
        return True
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(exc, sa.exc.OperationalError
                                                 | sa.exc.InterfaceError):
        return True
    sqlstate = getattr(exc.orig, "pgcode", None) or ""
    return sqlstate.startswith(_TRANSIENT_SQLSTATES)


class ItemError(Exception):
    """Raised by a handler to fail its item with a chosen status and code.

    Not part of the :class:`BatchopsError` tree: it never leaves the chunk, it becomes the
    item's result (``state="failed"``, ``status``, ``error{code, message}``).
    """

    status: int = 400
    code: str = "item_error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class InvalidApiKey(BatchopsError):
    """No API key, or one that matches none of the configured keys (401)."""

    code = "unauthorized"
    http_status = 401


class QuotaExceeded(BatchopsError):
    """The caller is over its operations-per-minute quota (429, with ``Retry-After``)."""

    code = "quota_exceeded"
    http_status = 429

    def __init__(self, message: str, *, retry_after: int, limit: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.limit = limit

    def details(self) -> dict[str, Any]:
        return {"limit": self.limit, "retry_after": self.retry_after}


class BatchExceedsQuota(BatchopsError):
    """The batch has more operations than the quota allows in a whole minute (413): no retry
    can ever pass, unlike :class:`QuotaExceeded`, so there is no ``Retry-After``.

    ``at_least``: counting stopped once it was over the quota (a file import), so
    ``operations`` is a lower bound.
    """

    code = "batch_exceeds_quota"
    http_status = 413

    def __init__(self, operations: int, limit: int, *, at_least: bool = False) -> None:
        self.operations = operations
        self.limit = limit
        self.at_least = at_least
        count = f"more than {limit}" if at_least else str(operations)
        super().__init__(
            f"the batch has {count} operations and the quota allows {limit} operations per "
            f"minute, so it can never run; split it into batches of at most {limit}")

    def details(self) -> dict[str, Any]:
        return {"limit": self.limit, "operations": self.operations, "at_least": self.at_least}


class UnsupportedMediaType(BatchopsError):
    """The request body's ``Content-Type`` is not one the route reads (415)."""

    code = "unsupported_media_type"
    http_status = 415

    def __init__(self, content_type: str | None, accepted: tuple[str, ...]) -> None:
        self.content_type = content_type
        self.accepted = accepted
        given = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        super().__init__(f"this endpoint reads {' or '.join(accepted)}; the request has "
                         f"{given}")

    def details(self) -> dict[str, Any]:
        return {"accepted": list(self.accepted)}


class HostNotAllowed(BatchopsError):
    """The request's ``Host`` is not one this API answers for (421): without API keys only
    loopback names, else ``settings.allowed_hosts`` (DNS rebinding)."""

    code = "host_not_allowed"
    http_status = 421


class OriginNotAllowed(BatchopsError):
    """Without API keys, a request sent by a web page of another host (its ``Origin``) is
    refused (403): any page a developer opens could otherwise run batches on localhost."""

    code = "origin_not_allowed"
    http_status = 403


class BodyTooLarge(BatchTooLarge):
    """The request body is over ``settings.max_body_bytes`` (413 ``batch_too_large``).

    The rest of the body is never read: the response closes the connection
    (``close_connection``), instead of letting the server drain what the client still sends.
    """

    close_connection = True

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(size, limit)
        self.message = f"request body is larger than {limit} bytes (limit {limit} bytes)"
        self.args = (self.message,)

    def details(self) -> dict[str, Any]:
        return {"limit_bytes": self.limit}


class MalformedJson(MalformedInput):
    """The body is not JSON (400 ``malformed_json``)."""

    code = "malformed_json"


class CallbackUrlNotAllowed(ValidationFailed):
    """A batch's ``callback_url`` is refused (422 ``callback_url_not_allowed``): not http(s),
    carries credentials, its host is not on the allowlist, or it resolves to a loopback,
    private, link-local or reserved address the settings do not allow."""

    code = "callback_url_not_allowed"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__([FieldError(None, None, "callback_url", reason)],
                         f"callback_url not allowed: {reason}")


class CallbackHostUnresolvable(CallbackUrlNotAllowed):
    """The callback host has no address (at submit time a refusal; when sending, retried)."""


class CallbackDeliveryFailed(BatchopsError):
    """A completion callback was not delivered. ``retryable`` for connection errors, timeouts,
    429 and 5xx answers; not for other answers or a refused URL. Never fails the batch."""

    code = "callback_delivery_failed"
    http_status = 502

    def __init__(self, message: str, *, retryable: bool, status_code: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status_code = status_code


class SignatureVerificationError(BatchopsError):
    """A received callback's ``Batchops-Signature`` does not verify (for receivers)."""

    code = "invalid_signature"
    http_status = 400
class DeadLetterNotFound(NotFound):
    """Dead letters that do not exist for this caller (another key's are not shown either)."""

    code = "dead_letter_not_found"

    def __init__(self, ids: list[int]) -> None:
        self.ids = sorted(ids)
        shown = ", ".join(str(i) for i in self.ids[:20]) + (" …" if len(self.ids) > 20 else "")
        super().__init__(f"no dead letter with id {shown}")

    def details(self) -> dict[str, Any]:
        return {"ids": self.ids}


class DeadLetterReplayed(BatchopsError):
    """Dead letters asked for by id were replayed already (409); ``include_replayed`` replays
    them again on purpose."""

    code = "dead_letter_replayed"
    http_status = 409

    def __init__(self, replayed: dict[int, str]) -> None:
        self.replayed = dict(sorted(replayed.items()))
        shown = ", ".join(f"{i} (batch {b})" for i, b in list(self.replayed.items())[:20])
        super().__init__(f"dead letters replayed already: {shown}; set include_replayed to "
                         "replay them again")

    def details(self) -> dict[str, Any]:
        return {"ids": list(self.replayed),
                "replayed_batch_ids": {str(i): b for i, b in self.replayed.items()}}


class EmptyReplayFilter(BatchopsError):
    """A replay that names no dead letters: no ids, an empty filter, and not ``all`` (422).

    Refused rather than read as "replay everything"."""

    code = "empty_replay_filter"
    http_status = 422


class InvalidText(ValidationFailed):
    """A string of the request is not Unicode text (422 ``invalid_text``): JSON's ``\\ud800``
    escape spells a lone UTF-16 surrogate, which no UTF-8 text can hold."""

    code = "invalid_text"

    def __init__(self, field: str) -> None:
        super().__init__([FieldError(None, None, field, "contains a lone UTF-16 surrogate "
                                     "(such as \\ud800), which is not text")],
                         f"{field}: contains a lone UTF-16 surrogate, which is not text; "
                         "nothing ran")


class EmptyBatch(ValidationFailed):
    """A batch of no operations (422 ``empty_batch``): an empty ``operations`` list, or a CSV
    import of a header and no rows."""

    code = "empty_batch"

    def __init__(self, field: str, message: str) -> None:
        super().__init__([FieldError(None, None, field, message)], message)
