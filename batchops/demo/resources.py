"""The demo tables and handlers: what ``BATCHOPS_DEMO=true`` adds to the configured ones."""

from __future__ import annotations

from batchops.settings import ColumnSpec, ColumnType, ResourceSpec

__all__ = ["DEMO_HANDLER_MODULE", "demo_resources"]

DEMO_HANDLER_MODULE = "batchops.demo.handlers"


def demo_resources() -> dict[str, ResourceSpec]:
    """The tables users, orders, products and outbox (created when missing)."""
    def col(type_: ColumnType, **kw: bool) -> ColumnSpec:
        return ColumnSpec(type=type_, **kw)

    return {
        "users": ResourceSpec(
            columns={
                "id": col("integer", nullable=False),
                "email": col("text", nullable=False, unique=True),
                "name": col("text"),
            },
            create=True,
        ),
        "orders": ResourceSpec(
            columns={"id": col("integer", nullable=False), "status": col("text"),
                     "total": col("numeric")},
            create=True,
        ),
        "products": ResourceSpec(
            columns={"id": col("integer", nullable=False), "name": col("text", nullable=False),
                     "price": col("numeric")},
            create=True,
        ),
        "outbox": ResourceSpec(
            columns={
                "id": col("integer", nullable=False),
                "recipient": col("text", nullable=False),
                "subject": col("text", nullable=False),
                "body": col("text", nullable=False),
                "message_key": col("text", unique=True),
                "started_at": col("timestamp"),
                "finished_at": col("timestamp"),
            },
            create=True,
        ),
    }

