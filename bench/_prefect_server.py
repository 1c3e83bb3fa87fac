"""A Prefect server of the benchmark's own: ``prefect server start`` as a subprocess (as ``make
up`` starts it), on a PostgreSQL database of its own on the machine's PostgreSQL
(127.0.0.1:5432), dropped and created anew, with a temporary home."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg2

from batchops.devtools import free_port

__all__ = ["PrefectServer", "free_port", "fresh_database", "proc_status_kb", "process_tree"]

PG_ADMIN = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}


def fresh_database(name: str) -> str:
    """Drop the database ``name`` of the machine's PostgreSQL and create it anew; its
    ``postgresql+asyncpg`` URL (the Prefect server's driver)."""
    conn = psycopg2.connect(**PG_ADMIN)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def proc_status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PrefectServer:
    """``prefect server start`` on a free port, on the PostgreSQL database ``database``
    (dropped and created anew by ``start()``); ``api_url`` once healthy; ``stop()`` ends it."""

    def __init__(self, home: Path, log_path: Path, *, database: str) -> None:
        self.home = home
        self.log_path = log_path
        self.database = database
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    def start(self, timeout: float = 180.0) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PREFECT_") and not k.startswith("BATCHOPS_")}
        env.update(PREFECT_HOME=str(self.home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_UI_ENABLED="false",
                   PREFECT_API_DATABASE_CONNECTION_URL=fresh_database(self.database))
        # BENCH_SERVER_PREFECT_X=v sets PREFECT_X=v for the server only (to try its settings).
        env.update({k.removeprefix("BENCH_SERVER_"): v for k, v in os.environ.items()
                    if k.startswith("BENCH_SERVER_PREFECT_")})
        prefect = Path(sys.executable).with_name("prefect")
        self.home.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        started = time.perf_counter()
        command = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port",
                   str(self.port)]
        self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({self.proc.returncode}); "
                                   f"see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        self.startup_seconds = time.perf_counter() - started
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"prefect server not healthy after {timeout:.0f}s; see {self.log_path}")

    def memory_mb(self) -> dict[str, float]:
        """Current RSS and RSS high-water mark of the server's process tree (MB)."""
        if self.proc is None:
            return {}
        pids = process_tree(self.proc.pid)
        return {"rss_mb": round(sum(proc_status_kb(p, "VmRSS") for p in pids) / 1024, 1),
                "hwm_mb": round(sum(proc_status_kb(p, "VmHWM") for p in pids) / 1024, 1),
                "processes": len(pids)}

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # The server runs in its own session (started above): signal that group only.
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
