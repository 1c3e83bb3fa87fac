"""Dead letters: items that ran out of retries, kept with what it takes to run them again.

An item whose target gave up after retrying (the http target, on connection errors, 429 and
5xx) becomes a dead letter in the same transaction that records its chunk's results: the
full request (method, path, body, headers, and the idempotency key the upstream saw), every
attempt's error with its time, and the final status and code. A failure that is not worth
retrying (a plain 4xx) is an ordinary failed item, not a dead letter.

Dead letters are scoped per API key like batches. A *replay* runs selected dead letters as a
new batch (by ids, by a filter, or ``all``), with the idempotency keys the first attempts
sent, so an upstream that honoured the key never applies an operation twice. Selecting,
marking them replayed (with the new batch's id) and registering the batch is one
transaction: two concurrent replays never pick the same dead letter, and a replayed dead
letter is not selected again unless ``include_replayed`` asks for it.

When a chunk runs again (a retry of its batch), the items' earlier dead letters that were
not replayed are replaced by what this run recorded: an item is a dead letter at most once
per outcome, and an item that now succeeded is no longer one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic.alias_generators import to_camel
from sqlalchemy.engine import Connection

from batchops.errors import (
    DeadLetterNotFound,
    DeadLetterReplayed,
    EmptyReplayFilter,
    FieldError,
    ValidationFailed,
)
from batchops.registration import new_batch_id, register_batch
from batchops.runtime import Runtime
from batchops.schemas import AttemptError, ItemResult, ItemState, PlannedOperation
from batchops.store import Store
from batchops.tables import metadata, utcnow

__all__ = [
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterReplay",
    "DeadLetters",
    "ReplayedDeadLetters",
    "dead_letters",
    "is_dead_letter",
    "record_dead_letters",
    "replay_dead_letters",
]

MAX_REPLAY_IDS = 1000
MAX_ID = 2**31 - 1  # ids are 32-bit integers: a bigger one is refused, not sent to the database
TEXT_PATTERN = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("scope", sa.String(128), nullable=False),
    sa.Column("batch_id", sa.String(64), nullable=False),
    sa.Column("item_index", sa.Integer, nullable=False),
    sa.Column("item_id", sa.String(200)),
    sa.Column("target", sa.String(32), nullable=False),
    sa.Column("resource", sa.String(128)),  # the upstream (http) or table (sql)
    sa.Column("method", sa.String(8), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("body", sa.JSON),
    sa.Column("headers", sa.JSON),
    sa.Column("idempotency_key", sa.String(255), nullable=False),  # as sent upstream
    sa.Column("code", sa.String(128), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("attempt_errors", sa.JSON, nullable=False),
    sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_failed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("replayed_batch_id", sa.String(64)),
    sa.Column("replayed_at", sa.DateTime(timezone=True)),
)
sa.Index("ix_dead_letters_batch", dead_letters.c.scope, dead_letters.c.batch_id,
         dead_letters.c.item_index)
sa.Index("ix_dead_letters_target_code", dead_letters.c.scope, dead_letters.c.target,
         dead_letters.c.code)
sa.Index("ix_dead_letters_replayed_batch", dead_letters.c.replayed_batch_id)

_ATTEMPTS = TypeAdapter(list[AttemptError])


# -- models ------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class DeadLetter(BaseModel):
    """One item that ran out of retries: its request, every attempt, and whether it was
    replayed (``replayed_batch_id``)."""

    id: int
    batch_id: str
    item_index: int
    item_id: str | None
    target: str
    resource: str | None
    method: str
    path: str
    body: dict[str, Any] | None
    headers: dict[str, str] | None
    idempotency_key: str
    code: str
    status: int
    message: str
    attempts: int
    attempt_errors: list[AttemptError]
    first_failed_at: datetime
    last_failed_at: datetime
    created_at: datetime
    replayed_batch_id: str | None
    replayed_at: datetime | None


class DeadLetterFilter(_Model):
    """Which dead letters: every given field must match."""

    batch_id: str | None = Field(None, max_length=64, pattern=TEXT_PATTERN,
                                 description="the batch they failed in")
    target: str | None = Field(None, max_length=32, pattern=TEXT_PATTERN,
                               description="http, sql or python")
    resource: str | None = Field(None, max_length=128, pattern=TEXT_PATTERN,
                                 description="upstream or resource name")
    code: str | None = Field(None, max_length=128, pattern=TEXT_PATTERN,
                             description="the last attempt's error code")
    status: int | None = Field(None, ge=0, le=999, description="the last attempt's status")

    @property
    def is_empty(self) -> bool:
        return all(v is None for v in self.model_dump().values())


class DeadLetterReplay(_Model):
    """Body of ``POST /dead-letters/replay``: ``ids``, a ``filter``, or ``all`` — one of them."""

    ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] | None = Field(
        None, max_length=MAX_REPLAY_IDS, description="these dead letters (404 if one is unknown)")
    filter: DeadLetterFilter | None = Field(None, description="the dead letters matching it")
    all: bool = Field(False, description="every dead letter (not replayed yet) of this key")
    include_replayed: bool = Field(
        False, description="replay dead letters that were replayed before, again")
    limit: int | None = Field(None, ge=1, description="at most this many (oldest first)")
    concurrency: int | None = Field(None, ge=1, le=1000,
                                    description="items in flight at once in the new batch")


class ReplayedDeadLetters(BaseModel):
    """What a replay made: the new batch (``None`` when nothing was selected) and its size."""

    batch_id: str | None
    replayed: int


# -- recording (in the chunk's transaction) ---------------------------------------------------


def is_dead_letter(result: ItemResult) -> bool:
    """A failed item whose target retried it until it gave up."""
    return result.state is ItemState.FAILED and bool(result.attempt_errors)


def record_dead_letters(conn: Connection, scope: str, batch_id: str,
                        executed: Sequence[tuple[PlannedOperation, ItemResult]],
                        rerun: Sequence[int] = ()) -> int:
    """Store the chunk's items that ran out of retries (one bulk insert); how many.

    ``rerun``: indexes of items run again (a retried chunk); their earlier dead letters that
    were not replayed give way to this run's outcome.
    """
    t = dead_letters
    if rerun:
        conn.execute(t.delete().where(t.c.scope == scope, t.c.batch_id == batch_id,
                                      t.c.item_index.in_(list(rerun)),
                                      t.c.replayed_batch_id.is_(None)))
    now = utcnow()
    rows = []
    for op, result in executed:
        if not is_dead_letter(result):
            continue
        errors = result.attempt_errors or []
        rows.append({
            "scope": scope, "batch_id": batch_id, "item_index": op.index, "item_id": op.id,
            "target": op.target, "resource": op.resource, "method": op.method,
            "path": op.path, "body": op.body, "headers": op.headers,
            # What the target sent as Idempotency-Key (see batchops.targets.http).
            "idempotency_key": op.idempotency_key or f"{batch_id}:{op.index}",
            "code": result.error.code if result.error else errors[-1].code,
            "status": result.status,
            "message": result.error.message if result.error else errors[-1].message,
            "attempts": len(errors),
            "attempt_errors": _ATTEMPTS.dump_python(errors, mode="json"),
            "first_failed_at": errors[0].at, "last_failed_at": errors[-1].at,
            "created_at": now,
        })
    if rows:
        conn.execute(t.insert(), rows)
    return len(rows)


# -- reading -----------------------------------------------------------------------------------


def _conditions(scope: str, flt: DeadLetterFilter | None) -> list[sa.ColumnElement[bool]]:
    t = dead_letters
    where = [t.c.scope == scope]
    if flt is not None:
        for name, value in flt.model_dump().items():
            if value is not None:
                where.append(t.c[name] == value)
    return where


def _dead_letter(row: sa.RowMapping) -> DeadLetter:
    data = {k: v for k, v in row.items() if k != "scope"}
    for name in ("first_failed_at", "last_failed_at", "created_at", "replayed_at"):
        if data[name] is not None and data[name].tzinfo is None:
            data[name] = data[name].replace(tzinfo=UTC)  # SQLite's are naive; written as UTC
    return DeadLetter.model_validate(data)


class DeadLetters:
    """The dead letters of the store's database."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def find(self, scope: str, flt: DeadLetterFilter | None = None, *,
             replayed: bool | None = None, replayed_batch_id: str | None = None,
             after: int = 0, limit: int = 100) -> list[DeadLetter]:
        """Oldest first, with ``id`` greater than ``after``."""
        t = dead_letters
        where = [*_conditions(scope, flt), t.c.id > after]
        if replayed is not None:
            where.append(t.c.replayed_at.is_not(None) if replayed else t.c.replayed_at.is_(None))
        if replayed_batch_id is not None:
            where.append(t.c.replayed_batch_id == replayed_batch_id)
        with self.store.read() as conn:
            rows = conn.execute(sa.select(t).where(*where).order_by(t.c.id).limit(limit))
            return [_dead_letter(r) for r in rows.mappings()]

    def get(self, scope: str, dead_letter_id: int) -> DeadLetter:
        t = dead_letters
        with self.store.read() as conn:
            row = conn.execute(sa.select(t).where(t.c.scope == scope,
                                                  t.c.id == dead_letter_id)).mappings().first()
        if row is None:
            raise DeadLetterNotFound([dead_letter_id])
        return _dead_letter(row)

    def release(self, scope: str, batch_id: str) -> int:
        """Unmark the dead letters replayed into ``batch_id`` (its run could not start)."""
        t = dead_letters
        with self.store.engine.begin() as conn:
            return conn.execute(t.update().where(
                t.c.scope == scope, t.c.replayed_batch_id == batch_id,
            ).values(replayed_batch_id=None, replayed_at=None)).rowcount


# -- replaying ---------------------------------------------------------------------------------


def _check_selection(request: DeadLetterReplay) -> None:
    given = [name for name, chosen in (("ids", request.ids is not None),
                                       ("filter", request.filter is not None),
                                       ("all", request.all)) if chosen]
    if len(given) > 1:
        raise ValidationFailed([FieldError(None, None, name,
                                           "give one of ids, filter and all, not several")
                                for name in given])
    if (not given or (request.ids is not None and not request.ids)
            or (request.filter is not None and request.filter.is_empty)):
        raise EmptyReplayFilter(
            "say which dead letters to replay: ids, a filter with at least one field, or "
            "all: true; an empty selection is not read as 'everything'")


def _claim_ids(conn: Connection, scope: str, request: DeadLetterReplay, batch_id: str) -> None:
    t = dead_letters
    ids = list(dict.fromkeys(request.ids or []))
    if request.limit is not None:
        ids = ids[:request.limit]
    found: dict[int, str | None] = {
        r.id: r.replayed_batch_id for r in conn.execute(
            sa.select(t.c.id, t.c.replayed_batch_id).where(t.c.scope == scope, t.c.id.in_(ids)))}
    missing = [i for i in ids if i not in found]
    if missing:
        raise DeadLetterNotFound(missing)
    replayed = {i: b for i, b in found.items() if b is not None}
    if replayed and not request.include_replayed:
        raise DeadLetterReplayed(replayed)
    claim = t.update().where(t.c.scope == scope, t.c.id.in_(ids))
    if not request.include_replayed:
        claim = claim.where(t.c.replayed_batch_id.is_(None))
    claimed = conn.execute(claim.values(replayed_batch_id=batch_id, replayed_at=utcnow()))
    if claimed.rowcount != len(ids):  # a concurrent replay took some in the meantime
        now: dict[int, str | None] = {
            r.id: r.replayed_batch_id for r in conn.execute(
                sa.select(t.c.id, t.c.replayed_batch_id).where(
                    t.c.id.in_(ids), t.c.replayed_batch_id != batch_id))}
        raise DeadLetterReplayed({i: b for i, b in now.items() if b is not None})


def _claim_matching(conn: Connection, scope: str, request: DeadLetterReplay, batch_id: str,
                    limit: int) -> None:
    t = dead_letters
    where = _conditions(scope, request.filter)
    if not request.include_replayed:
        where.append(t.c.replayed_batch_id.is_(None))
    chosen = sa.select(t.c.id).where(*where).order_by(t.c.id).limit(limit)
    if conn.dialect.name == "postgresql":
        # Rows a concurrent replay holds are skipped, not waited for and then replayed twice.
        chosen = chosen.with_for_update(skip_locked=True)
    conn.execute(t.update().where(t.c.id.in_(chosen.scalar_subquery()))
                 .values(replayed_batch_id=batch_id, replayed_at=utcnow()))


def _operations(rows: Sequence[sa.RowMapping]) -> list[dict[str, Any]]:
    """The dead letters' requests as operations, in dead-letter order.

    Item ids stay the original ones; where two selected dead letters share one (they come
    from different batches), each is told apart by its dead letter's id: ``c1@42``.
    """
    seen = Counter(r["item_id"] for r in rows if r["item_id"] is not None)
    return [{
        "id": (r["item_id"] if r["item_id"] is None or seen[r["item_id"]] == 1
               else f"{r['item_id']}@{r['id']}"),
        "method": r["method"], "path": r["path"], "body": r["body"], "headers": r["headers"],
        "idempotency_key": r["idempotency_key"],
    } for r in rows]


def replay_dead_letters(runtime: Runtime, scope: str, request: DeadLetterReplay, *,
                        source: str = "replay") -> ReplayedDeadLetters:
    """Register the selected dead letters as a new batch and mark them replayed into it.

    The batch is registered, not started: the caller runs it (a deployment flow run from
    the API, a subflow in the ``replay-dead-letters`` flow).

    Raises:
        EmptyReplayFilter: the request selects nothing explicitly (422).
        ValidationFailed: more than one of ids, filter, all; or the dead letters' operations
            no longer validate (their route was removed, say) — nothing is marked.
        DeadLetterNotFound: an id is unknown to this scope (404).
        DeadLetterReplayed: an id was replayed before and ``include_replayed`` is not set.
    """
    _check_selection(request)
    settings = runtime.settings
    limit = min(request.limit or settings.api.max_import_rows, settings.api.max_import_rows)
    batch_id = new_batch_id()
    t = dead_letters
    with runtime.store.engine.begin() as conn:
        if request.ids is not None:
            _claim_ids(conn, scope, request, batch_id)
        else:
            _claim_matching(conn, scope, request, batch_id, limit)
        rows = conn.execute(sa.select(t).where(t.c.replayed_batch_id == batch_id)
                            .order_by(t.c.id)).mappings().all()
        if not rows:
            return ReplayedDeadLetters(batch_id=None, replayed=0)
        _, total = register_batch(runtime, _operations(rows), batch_id=batch_id,
                                  concurrency=request.concurrency, scope=scope, source=source,
                                  max_operations=settings.api.max_import_rows, conn=conn)
    return ReplayedDeadLetters(batch_id=batch_id, replayed=total)
