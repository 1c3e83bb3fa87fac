"""Request and response models shared by the API, the CLI and the flows."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

__all__ = [
    "MAX_ITEM_INDEX",
    "AttemptError",
    "BatchCreate",
    "BatchState",
    "BatchStatus",
    "BatchSummary",
    "CallbackState",
    "CallbackStatus",
    "ChunkRef",
    "ItemErrorBody",
    "ItemResult",
    "ItemState",
    "Method",
    "Operation",
    "PlannedOperation",
    "payload_hash",
]

Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
# Item indexes are 32-bit in the store; a query naming a larger one is refused, not run.
MAX_ITEM_INDEX = 2**31 - 1


class _Model(BaseModel):
    """Accepts snake_case and camelCase (``idempotencyKey``); emits snake_case."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class BatchState(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """Completed, failed or cancelled: nothing more will run unless it is retried."""
        return self in (BatchState.COMPLETED, BatchState.FAILED, BatchState.CANCELLED)


class ItemState(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


class Operation(_Model):
    """One operation of a batch, as a client sends it."""

    id: Annotated[str | None, Field(max_length=200)] = None
    method: Method
    path: Annotated[str, Field(min_length=1, max_length=2048)]
    body: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    idempotency_key: Annotated[str | None, Field(min_length=1, max_length=255)] = None
    # Ids of operations (earlier in the batch) that must have succeeded before this one runs.
    depends_on: list[Annotated[str, Field(max_length=200)]] | None = None

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_text(cls, value: Any) -> Any:
        # Spreadsheets and JSON clients send numeric ids; they are names, keep them as text.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("depends_on", mode="before")
    @classmethod
    def _ids_as_text(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [cls._id_as_text(v) for v in value]
        return value

    @field_validator("method", mode="before")
    @classmethod
    def _upper_method(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class BatchCreate(_Model):
    """Body of ``POST /batches``."""

    operations: list[Operation]
    mode: Literal["auto", "sync", "async"] = "auto"
    concurrency: Annotated[int | None, Field(ge=1, le=1000)] = None
    callback_url: str | None = None
    # Once this many seconds have passed since submission, no new item starts: the rest are
    # ``skipped`` (``deadline_exceeded``) and the batch completes.
    deadline_seconds: Annotated[float | None, Field(gt=0, le=7 * 24 * 3600)] = None


def payload_hash(method: str, path: str, body: Any) -> str:
    """Fingerprint of what an operation does; the idempotency check compares these."""
    canonical = json.dumps([method, path, body], sort_keys=True, separators=(",", ":"),
                           default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class PlannedOperation(BaseModel):
    """A validated operation, routed to its target; what a chunk carries."""

    index: int
    id: str | None = None
    method: Method
    path: str
    body: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    idempotency_key: str | None = None
    payload_hash: str | None = None  # set when idempotency_key is
    target: str
    resource: str | None = None
    # Factories, not ``{}``/``[]``: pydantic deep-copies a mutable default for every instance,
    # which was a fifth of building an operation (100,000 of them per big batch).
    params: dict[str, str] = Field(default_factory=dict)
    # Indexes of the operations this one waits for (``depends_on`` and ``$ref`` targets);
    # ``body`` keeps its ``{"$ref": ...}`` values, resolved right before the item runs.
    depends_on: list[int] = Field(default_factory=list)


class ChunkRef(BaseModel):
    """A chunk of a batch: the item range ``[start, end)`` stored under ``chunk_index``."""

    batch_id: str
    chunk_index: int
    start: int
    end: int
    cache_token: str  # hash of the chunk's idempotency keys

    @property
    def label(self) -> str:
        return f"items {self.start}-{self.end - 1}"


class AttemptError(BaseModel):
    """One failed attempt of an item: when, and what the upstream (or the network) said."""

    attempt: int
    at: datetime
    status: int
    code: str
    message: str


class ItemErrorBody(BaseModel):
    code: str
    message: str


class ItemResult(BaseModel):
    """Outcome of one operation; ``status`` is the item's HTTP status."""

    id: str | None = None
    index: int
    status: int
    state: ItemState
    result: Any = None
    error: ItemErrorBody | None = None
    attempts: int = 1
    replayed: bool = False
    # Set when an item ran out of retries: every attempt's error. Not part of the item's
    # stored or shown result (the dead letter keeps it), so it is excluded from dumps.
    attempt_errors: list[AttemptError] | None = Field(default=None, exclude=True)

    @classmethod
    def ok(cls, op: PlannedOperation, status: int, result: Any = None) -> ItemResult:
        return cls(id=op.id, index=op.index, status=status, state=ItemState.SUCCEEDED,
                   result=result)

    @classmethod
    def fail(cls, op: PlannedOperation, status: int, code: str, message: str) -> ItemResult:
        return cls(id=op.id, index=op.index, status=status, state=ItemState.FAILED,
                   error=ItemErrorBody(code=code, message=message))

    @classmethod
    def skip(cls, op: PlannedOperation, status: int, code: str, message: str) -> ItemResult:
        """Not attempted (``attempts`` 0); a retry of the batch runs it."""
        return cls(id=op.id, index=op.index, status=status, state=ItemState.SKIPPED,
                   error=ItemErrorBody(code=code, message=message), attempts=0)


class BatchSummary(BaseModel):
    total: int
    succeeded: int
    failed: int
    skipped: int = 0  # not attempted: the batch's deadline passed first


class CallbackState(StrEnum):
    PENDING = "pending"  # not sent yet, or a retry is due
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # retries exhausted, or an answer that is not retried (4xx, 3xx)
    REFUSED = "refused"  # at send time the URL was no longer allowed (e.g. private address)


class CallbackStatus(BaseModel):
    """Delivery of a batch's completion callback, as an operator sees it."""

    url: str
    status: CallbackState
    attempts: int
    delivery_id: str | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    last_attempt_at: datetime | None = None
    delivered_at: datetime | None = None


class BatchStatus(BaseModel):
    batch_id: str
    status: BatchState
    total: int
    completed: int
    succeeded: int
    failed: int
    skipped: int = 0
    progress: float
    started_at: datetime | None = None
    finished_at: datetime | None = None
    flow_run_id: str | None = None
    ui_url: str | None = None
    callback: CallbackStatus | None = None
    deadline_at: datetime | None = None

    def summary(self) -> BatchSummary:
        """The batch's counts as a flow run returns them."""
        return BatchSummary(total=self.total, succeeded=self.succeeded, failed=self.failed,
                            skipped=self.skipped)
