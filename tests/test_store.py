"""The store's schema comes from Alembic migrations and matches the code's metadata."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from batchops.migrate import alembic_config, head_revision, is_current
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


def test_the_head_read_from_the_migration_files_is_alembics(runtime: Runtime) -> None:
    script = ScriptDirectory.from_config(alembic_config(runtime.store.engine))
    assert head_revision() == script.get_current_head()


def test_a_store_is_current_only_at_the_head_with_its_tables(runtime: Runtime) -> None:
    """A current store is left alone; one behind the head, or missing a table it should have,
    is migrated again."""
    engine = runtime.store.engine
    declared = sa.Table("declared_here", sa.MetaData(), sa.Column("id", sa.Integer,
                                                                  primary_key=True))
    assert is_current(engine)
    assert not is_current(engine, [declared])
    runtime.store.migrate([declared])
    assert is_current(engine, [declared])
    with engine.begin() as conn:
        head = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0008'"))
    try:
        assert not is_current(engine, [declared])
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = :head"),
                         {"head": head})
        declared.drop(engine)
