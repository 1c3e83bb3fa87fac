"""A database fault for tests: PostgreSQL refuses inserts of users 1200-1209 with a
connection-failure SQLSTATE while armed. To the engine this is a lost connection: the chunk
is retried, then cannot finish, so the flow run fails halfway through its batch."""

from __future__ import annotations

from sqlalchemy.engine import Connection

__all__ = ["arm_user_insert_fault", "disarm_fault", "remove_fault"]

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
