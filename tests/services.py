"""Start the machine's PostgreSQL and Redis when they are stopped (tests use them for real)."""

from __future__ import annotations

import os
import socket
import subprocess
import time

PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait(host: str, port: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _listening(host, port):
            return True
        time.sleep(0.2)
    return False


def _pg_ctlcluster(action: str, *, check: bool) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
                   check=check, timeout=60)


def ensure_postgres() -> None:
    if _listening(PG_HOST, PG_PORT):
        return
    _pg_ctlcluster("start", check=False)
    if not _wait(PG_HOST, PG_PORT):
        raise RuntimeError("PostgreSQL did not start on 127.0.0.1:5432")


def ensure_redis() -> None:
    if _listening(REDIS_HOST, REDIS_PORT):
        return
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1",
                    "--port", "6379", "--save", "", "--appendonly", "no",
                    "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"], check=False)
    if not _wait(REDIS_HOST, REDIS_PORT):
        raise RuntimeError("Redis did not start on 127.0.0.1:6379")


def restart_postgres() -> None:
    """Restart the machine's PostgreSQL (a fault test), then drop this process's pooled
    connections to it, which the restart closed."""
    from batchops.engine import _engines

    _pg_ctlcluster("restart", check=True)
    ensure_postgres()
    for engine in _engines.values():
        engine.dispose()
