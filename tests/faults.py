"""Database faults for tests.

* PostgreSQL refuses inserts of users 1200-1209 with a connection-failure SQLSTATE while
  armed. To the engine this is a lost connection: the chunk is retried, then cannot finish,
  so the flow run fails halfway through its batch.
* A store refusing writes (:func:`refuse_writes`): every insert, update and delete of the
  given tables fails as in a read-only database (SQLSTATE 25006, what a replica, a failover
  or ``default_transaction_read_only`` answers) until :func:`allow_writes` — a store outage
  of chosen length, on the test's own database, without restarting anything.
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

__all__ = ["allow_writes", "arm_user_insert_fault", "disarm_fault", "refuse_writes",
           "refused_writes", "remove_fault", "remove_write_refusal"]

_FAULT_SQL = """
CREATE TABLE IF NOT EXISTS faults (armed boolean);
CREATE OR REPLACE FUNCTION inject_fault() RETURNS trigger AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM faults WHERE armed) AND NEW.id BETWEEN 1200 AND 1209 THEN
    RAISE EXCEPTION 'injected connection failure' USING ERRCODE = '08006';
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS users_fault ON users;
CREATE TRIGGER users_fault BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION inject_fault();
INSERT INTO faults VALUES (true);
"""


def arm_user_insert_fault(conn: Connection) -> None:
    conn.exec_driver_sql(_FAULT_SQL)


def disarm_fault(conn: Connection) -> None:
    conn.exec_driver_sql("DELETE FROM faults")


def remove_fault(conn: Connection) -> None:
    conn.exec_driver_sql("DROP TRIGGER IF EXISTS users_fault ON users; DROP TABLE IF EXISTS faults")


_REFUSE_SQL = """
CREATE TABLE IF NOT EXISTS write_refusal (armed boolean);
CREATE SEQUENCE IF NOT EXISTS write_refusals;
CREATE OR REPLACE FUNCTION refuse_write() RETURNS trigger AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM write_refusal WHERE armed) THEN
    PERFORM nextval('write_refusals');  -- counted: a sequence is not rolled back
    RAISE EXCEPTION 'cannot execute %% in a read-only transaction', TG_OP
      USING ERRCODE = '25006';
  END IF;
  RETURN NULL;
END $$ LANGUAGE plpgsql;
"""


def refuse_writes(conn: Connection, tables: list[str]) -> None:
    """From now on every write to ``tables`` fails as in a read-only database (statement
    triggers: a write that matches no row fails too, as it does there)."""
    conn.exec_driver_sql(_REFUSE_SQL)
    for table in tables:
        conn.exec_driver_sql(
            f"DROP TRIGGER IF EXISTS refuse_writes ON {table}; "
            f"CREATE TRIGGER refuse_writes BEFORE INSERT OR UPDATE OR DELETE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION refuse_write()")
    conn.exec_driver_sql("INSERT INTO write_refusal VALUES (true)")


def refused_writes(conn: Connection) -> int:
    """How many writes were refused so far."""
    return int(conn.exec_driver_sql(
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM write_refusals").scalar_one())


def allow_writes(conn: Connection) -> None:
    conn.exec_driver_sql("DELETE FROM write_refusal")


def remove_write_refusal(conn: Connection, tables: list[str]) -> None:
    for table in tables:
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS refuse_writes ON {table}")
    conn.exec_driver_sql("DROP TABLE IF EXISTS write_refusal; "
                         "DROP SEQUENCE IF EXISTS write_refusals")
