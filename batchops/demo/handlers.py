"""Demo python handler: ``POST /emails`` renders a message into the ``outbox`` table.

The seed's "send 50,000 marketing emails" case. Sending is simulated by a short wait (the
``send_latency`` in the body, default 2 ms); the row records when the send started and ended,
so anyone can check how many sends were in flight at once.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from string import Template
from typing import Annotated, Any

import sqlalchemy as sa
from pydantic import BaseModel, Field

from batchops.errors import ItemError
from batchops.handlers import handler
from batchops.runtime import get_runtime
from batchops.schemas import PlannedOperation

TEMPLATES = {
    "welcome": ("Welcome, $name!", "Hi $name,\n\nthanks for joining batchops.\n"),
    "promo": ("$name, 20% off this week", "Hi $name,\n\nyour code is $code.\n"),
}


class EmailBody(BaseModel):
    to: Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$", max_length=320)]
    name: str = "there"
    template: str = "welcome"
    vars: dict[str, str] = {}
    send_latency: Annotated[float, Field(ge=0, le=5)] = 0.002


def _insert_outbox(row: dict[str, Any]) -> dict[str, Any]:
    runtime = get_runtime()
    outbox = runtime.resources["outbox"].table
    with runtime.store.engine.begin() as conn:
        # The send ends when its row is written: stamped once the transaction has begun.
        row["finished_at"] = datetime.now(UTC)
        got = conn.execute(outbox.insert().returning(*outbox.c), row).mappings().one()
    return {"id": got["id"], "recipient": got["recipient"], "subject": got["subject"]}


@handler("POST", "/emails", body=EmailBody)
async def send_email(body: EmailBody, operation: PlannedOperation) -> dict[str, Any]:
    started = datetime.now(UTC)
    if body.template not in TEMPLATES:
        raise ItemError(f"unknown template {body.template!r}", status=422,
                        code="unknown_template")
    subject_t, body_t = TEMPLATES[body.template]
    values = {"name": body.name, **body.vars}
    try:
        subject = Template(subject_t).substitute(values)
        text = Template(body_t).substitute(values)
    except KeyError as exc:
        raise ItemError(f"template {body.template!r} needs {exc.args[0]!r}", status=422,
                        code="missing_template_var") from None
    await asyncio.sleep(body.send_latency)
    row = {"recipient": body.to, "subject": subject, "body": text,
           "message_key": operation.idempotency_key, "started_at": started}
    try:
        return await asyncio.to_thread(_insert_outbox, row)
    except sa.exc.IntegrityError:
        raise ItemError("this message was already sent", status=409,
                        code="unique_violation") from None
