"""The scaled-out system on one machine: ``batchops up --scaled`` (``make up-scaled``).

The same code as ``batchops up``, configured for production backends (see docs/scaling.md):

* Prefect API servers (``prefect server start --no-services``) on PostgreSQL, and one
  process running Prefect's background services (``prefect server services start``);
* ``prefect-redis`` as Prefect's messaging broker and cache, event ordering, concurrency
  lease storage and Docket backend, so the API servers and the services share one state;
* a work pool ``batchops`` of the batchops worker type (:mod:`deployments.worker`) with the
  deployments of :mod:`deployments.serve`, and workers polling it that run each flow run warm
  in a thread; the reaper deployment re-runs the batches of a worker that died;
* batchops API replicas; the batch store on PostgreSQL, progress snapshots in Redis.

Each worker and API replica talks to one Prefect API server, assigned round-robin (process
``i`` uses server ``i mod n``): on one machine that spreads the load without a proxy; in
production put a load balancer in front of the servers and point everything at it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from rich.console import Console

from deployments.processes import Supervisor, wait_http

__all__ = ["ScaledSystem", "ScaledTopology", "claim_empty_redis_database", "run_scaled_system"]

console = Console()
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ScaledTopology:
    """Where everything runs and what it is called."""

    prefect_ports: tuple[int, ...] = (4200, 4201)
    api_ports: tuple[int, ...] = (8000, 8001)
    workers: int = 2
    worker_limit: int = 10  # flow runs at once per worker (each in a thread of it)
    postgres: str = "postgres@127.0.0.1:5432"
    prefect_database: str = "batchops_prefect"
    store_database: str = "batchops"
    redis_url: str = "redis://127.0.0.1:6379/1"
    work_pool: str = "batchops"
    data_dir: Path = Path(".data/scaled")
    heartbeat_seconds: int = 30  # Prefect's minimum flow-run heartbeat interval
    stale_after_seconds: int = 60  # a batch without a sign of life this long is re-run
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def prefect_api_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}/api" for port in self.prefect_ports]

    @property
    def api_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.api_ports]

    @property
    def store_url(self) -> str:
        return f"postgresql+psycopg2://{self.postgres}/{self.store_database}"

    def env(self, name: str, prefect_index: int = 0) -> dict[str, str]:
        """The environment of one process: every setting of the topology."""
        data = self.data_dir.resolve()
        (data / "home" / name).mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_", "BATCHOPS_"))}
        env.update({
            # Prefect server: PostgreSQL, and prefect-redis for everything shared in memory
            "PREFECT_API_DATABASE_CONNECTION_URL":
                f"postgresql+asyncpg://{self.postgres}/{self.prefect_database}",
            "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
            "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
            "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
            "PREFECT_REDIS_MESSAGING_URL": self.redis_url,
            "PREFECT_SERVER_DOCKET_URL": self.redis_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # Clients, workers, flow runs
            "PREFECT_HOME": str(data / "home" / name),
            "PREFECT_API_URL": self.prefect_api_urls[prefect_index % len(self.prefect_ports)],
            "PREFECT_LOCAL_STORAGE_PATH": str(data / "results"),  # every worker reaches it
            "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(self.heartbeat_seconds),
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_WORKER_PREFETCH_SECONDS": "2",
            # batchops
            "BATCHOPS_DATABASE_URL": self.store_url,
            "BATCHOPS_REDIS_URL": self.redis_url,
            "BATCHOPS_PREFECT_UI_URL": f"http://127.0.0.1:{self.prefect_ports[0]}",
            "BATCHOPS_STALE_AFTER_SECONDS": str(self.stale_after_seconds),
            "BATCHOPS_DEMO": "true",  # the demo batch's tables and handlers (extra_env may say no)
        })
        env.update(self.extra_env)
        return env


def claim_empty_redis_database(owner: str, url: str = "redis://127.0.0.1:6379") -> int | None:
    """A Redis database number no one uses now, marked as taken by ``owner`` (2-15: 0 and 1
    belong to ``make up`` and ``make up-scaled``); ``None`` when every one is in use. For a
    throwaway topology (tests, benchmarks) beside the ones a developer runs."""
    import redis

    for db in range(15, 1, -1):
        client = redis.Redis.from_url(f"{url}/{db}")
        try:
            if client.dbsize() == 0:
                client.set(f"batchops:{owner}", "taken")
                return db
        finally:
            client.close()
    return None


def ensure_databases(topology: ScaledTopology) -> None:
    """Create the Prefect and store databases when missing."""
    admin = sa.create_engine(f"postgresql+psycopg2://{topology.postgres}/postgres",
                             isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for name in (topology.prefect_database, topology.store_database):
                exists = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                      {"n": name}).first()
                if exists is None:
                    conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        admin.dispose()


class ScaledSystem:
    """The processes of a :class:`ScaledTopology`; :meth:`start`, then :meth:`stop`."""

    def __init__(self, topology: ScaledTopology) -> None:
        self.topology = topology
        self.processes = Supervisor(topology.data_dir / "logs", log=console.print)

    def _prefect_server(self, index: int) -> None:
        port = self.topology.prefect_ports[index]
        self.processes.start(
            f"prefect-api-{index + 1}",
            [sys.executable, "-m", "prefect", "server", "start", "--no-services",
             "--host", "127.0.0.1", "--port", str(port)],
            self.topology.env(f"prefect-api-{index + 1}", index), stop_signal=signal.SIGTERM)

    def _wait(self, url: str, what: str, timeout: float = 180) -> None:
        if not wait_http(url, timeout):
            logs = ", ".join(str(c.log_path) for c in self.processes.children if not c.running)
            raise RuntimeError(f"{what} did not answer at {url}; see the logs {logs or 'under '}"
                               f"{self.processes.log_dir}")

    def start_worker(self, index: int, limit: int | None = None) -> None:
        """Worker ``index`` (1-based name ``worker-{index}``) on the work pool, running at
        most ``limit`` flow runs at once (default: the topology's ``worker_limit``)."""
        t = self.topology
        name = f"worker-{index}"
        self.processes.start(
            name, [sys.executable, "-m", "prefect", "worker", "start", "--pool", t.work_pool,
                   "--type", "batchops", "--name", name,
                   "--limit", str(limit or t.worker_limit)],
            t.env(name, index - 1), cwd=REPO)

    def start(self) -> None:
        t = self.topology
        t.data_dir.mkdir(parents=True, exist_ok=True)
        ensure_databases(t)
        first = t.env("batchops-cli")
        subprocess.run([sys.executable, "-m", "cli", "db", "upgrade"], env=first, cwd=REPO,
                       check=True, stdout=subprocess.DEVNULL)
        # The first server migrates Prefect's database; the others start once it is done.
        self._prefect_server(0)
        self._wait(f"{t.prefect_api_urls[0]}/health", "the first Prefect API server")
        for index in range(1, len(t.prefect_ports)):
            self._prefect_server(index)
        self.processes.start("prefect-services",
                             [sys.executable, "-m", "prefect", "server", "services", "start"],
                             t.env("prefect-services"), stop_signal=signal.SIGTERM)
        for url in t.prefect_api_urls[1:]:
            self._wait(f"{url}/health", "a Prefect API server")
        subprocess.run([sys.executable, "-m", "cli", "deploy", "--work-pool", t.work_pool],
                       env=first, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        for index in range(1, t.workers + 1):
            self.start_worker(index)
        for index, port in enumerate(t.api_ports):
            name = f"api-{index + 1}"
            self.processes.start(name, [sys.executable, "-m", "cli", "api", "--port", str(port)],
                                 t.env(name, index), cwd=REPO)
        for url in t.api_urls:
            self._wait(f"{url}/healthz", "a batchops API")

    def stop(self) -> None:
        self.processes.stop_all()


def run_scaled_system(topology: ScaledTopology, demo_file: Path | None, *,
                      stay: bool = True) -> int:
    """Start the scaled system, submit the demo batch through the first API, keep running
    (restarting a process that dies) until Ctrl-C or SIGTERM, then stop every process."""
    system = ScaledSystem(topology)
    system.processes.stop_on_signals()
    t = topology
    try:
        console.print(f"Starting the scaled system (PostgreSQL databases {t.prefect_database} "
                      f"and {t.store_database}, Redis {t.redis_url}) …")
        system.start()
        ui = f"http://127.0.0.1:{t.prefect_ports[0]}"
        console.print(f"[green]Prefect API servers[/]: {', '.join(t.prefect_api_urls)} "
                      f"(UI {ui}); services in one process")
        console.print(f"[green]Workers[/]: {t.workers} on the work pool {t.work_pool!r} "
                      "(process-batch, bulk-sync, retry-failed deployed)")
        console.print(f"[green]batchops APIs[/]: {', '.join(t.api_urls)}")
        console.print(f"Logs: {system.processes.log_dir}/")
        code = 0
        if demo_file is not None:
            code = subprocess.call([sys.executable, "-m", "cli", "submit", str(demo_file),
                                    "--url", t.api_urls[0], "--wait"], env=t.env("batchops-cli"))
        if not stay:
            return code
        console.print("[bold]batchops (scaled) is up.[/] Ctrl-C stops everything.")
        system.processes.supervise()
    except KeyboardInterrupt:
        console.print("\nStopping …")
        return 0
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        console.print(f"[red]{exc}")
        return 1
    finally:
        system.stop()
