"""Alembic environment: the engine comes from batchops (``cfg.attributes``) or the URL."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

# Modules whose tables live on the store's metadata: imported so autogenerate sees them.
import batchops.batch_requests
import batchops.callbacks
import batchops.dead_letters
import batchops.sync  # noqa: F401
from batchops.tables import metadata

config = context.config
target_metadata = metadata


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    shared = config.attributes.get("connection")
    if shared is not None:  # batchops.migrate's, inside its locked transaction
        context.configure(connection=shared, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = config.attributes.get("engine") or sa.create_engine(
        config.get_main_option("sqlalchemy.url") or ""
    )
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata,
                          render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
