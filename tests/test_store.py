"""The store's schema comes from Alembic migrations and matches the code's metadata."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from batchops.migrate import alembic_config
from batchops.runtime import Runtime
from batchops.tables import metadata


def test_migrations_build_exactly_the_schema_the_code_uses(runtime: Runtime) -> None:
    runtime.store.migrate()  # a second upgrade is a no-op
    with runtime.store.engine.connect() as conn:
        context = MigrationContext.configure(conn)
        head = ScriptDirectory.from_config(alembic_config(runtime.store.engine)).get_current_head()
        assert context.get_current_revision() == head
        store_tables = set(metadata.tables)
        # Tables other tests made in the same database (sync sources), and their indexes,
        # are not the store's.
        diffs = [d for d in compare_metadata(context, metadata)
                 if not (d[0] in ("remove_table", "remove_index")
                         and getattr(d[1], "table", d[1]).name not in store_tables)]
    assert diffs == []
