"""The embedded system on one machine: an embedded PostgreSQL, a Prefect server on it, the
deployments on a ``batchops`` work pool with one batchops worker (:mod:`deployments.worker`),
the webhook API (on ``BATCHOPS_API_PORT``, 8000), then the demo batch.

``batchops up`` (and ``make up``) calls :func:`run_local_system`. Everything lives under
``.data/``: PostgreSQL's data (the Prefect server's database and the batchops store), Prefect's
results, the logs. A process that dies is restarted (:class:`~deployments.processes.Supervisor`);
Ctrl-C or SIGTERM stops them all, a second one at once, and then PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from deployments.embedded_postgres import EmbeddedPostgres, start_embedded_postgres
from deployments.processes import Supervisor, port_in_use, wait_http

__all__ = ["run_local_system", "wait_for_prefect"]

console = Console()

WORK_POOL = "batchops"
WORKER_LIMIT = 4  # flow runs at once in the worker (each batch has its own chunk threads)


def wait_for_prefect(api_url: str, timeout: float = 120) -> bool:
    return wait_http(f"{api_url}/health", timeout)


def _system_env(data_dir: Path, port: int, postgres: EmbeddedPostgres) -> dict[str, str]:
    """The environment of every process: Prefect's server and client settings, and the store
    (a database URL or Prefect setting the user gave is kept)."""
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", str(data_dir / "prefect"))
    env.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(data_dir / "prefect" / "storage"))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_API_DATABASE_CONNECTION_URL", postgres.url("prefect", "asyncpg"))
    env.setdefault("BATCHOPS_DATABASE_URL", postgres.url("batchops"))
    env.setdefault("BATCHOPS_DEMO", "true")  # the demo batch's tables and handlers
    # the worker looks for new flow runs four times a second (Prefect's default is every 10 s):
    # one indexed query on the embedded PostgreSQL each time, and an async batch starts within
    # a quarter of a second of its 202
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "0.25")
    env.setdefault("PREFECT_WORKER_PREFETCH_SECONDS", "1")
    # batch runs send Prefect's flow-run heartbeats: the UI shows a run that went silent, and
    # Prefect's zombie-run detection (an automation of one's own) can mark it Crashed, which
    # starts the reaper at once (its deployment trigger)
    env.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    return env


def _url_host(host: str) -> str:
    """``host`` as it goes in a URL that this machine can open."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def run_local_system(demo_file: Path | None, *, port: int = 4200, api_port: int = 8000,
                     api_host: str = "127.0.0.1", data_dir: Path = Path(".data"),
                     stay: bool = True) -> int:
    """Start PostgreSQL, the Prefect server, the worker and the API, run the demo batch, keep
    serving (restarting a process that dies) until Ctrl-C or SIGTERM, then stop everything."""
    if port_in_use(api_host, api_port):  # known now, not after starting everything else
        console.print(f"[red]Port {api_port} on {api_host} is in use, so the API cannot "
                      "listen there; stop what listens on it or set BATCHOPS_API_PORT.")
        return 1
    data_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"Starting PostgreSQL (data under {data_dir / 'postgres'}) …")
    postgres = start_embedded_postgres(data_dir)
    env = _system_env(data_dir.resolve(), port, postgres)
    env.setdefault("BATCHOPS_PREFECT_UI_URL", f"http://127.0.0.1:{port}")
    api_url = env["PREFECT_API_URL"]
    processes = Supervisor(data_dir, log=console.print)
    processes.stop_on_signals()
    try:
        if wait_for_prefect(api_url, timeout=1):
            console.print(f"[yellow]A Prefect server already answers at {api_url}; using it.")
        else:
            console.print(f"Starting the Prefect server on 127.0.0.1:{port} …")
            server = processes.start(
                "prefect-server", [sys.executable, "-m", "prefect", "server", "start",
                                   "--host", "127.0.0.1", "--port", str(port)], env,
                stop_signal=signal.SIGTERM)
            if not wait_for_prefect(api_url):
                console.print(f"[red]The Prefect server did not start; see {server.log_path}")
                return 1
        ui = f"http://127.0.0.1:{port}"
        console.print(f"[green]Prefect server ready[/]: UI {ui}  API {api_url}")
        subprocess.check_call([sys.executable, "-m", "cli", "db", "upgrade"], env=env)
        subprocess.check_call([sys.executable, "-m", "cli", "deploy", "--work-pool",
                               WORK_POOL], env=env)
        processes.start("worker", [sys.executable, "-m", "cli", "worker", "--work-pool",
                                   WORK_POOL, "--limit", str(WORKER_LIMIT)], env)
        processes.start("api", [sys.executable, "-m", "cli", "api", "--host", api_host,
                                "--port", str(api_port)], env)
        webhook = f"http://{_url_host(api_host)}:{api_port}"
        if not wait_http(f"{webhook}/healthz"):
            console.print(f"[red]The API did not start; see {data_dir / 'api.log'}")
            return 1
        console.print(f"[green]API ready[/]: {webhook}  (docs {webhook}/docs); a batchops "
                      f"worker runs the work pool {WORK_POOL!r}")
        code = 0
        if demo_file is not None:
            console.print(f"Running the demo batch {demo_file} through the CLI …")
            code = subprocess.call([sys.executable, "-m", "cli", "run",
                                    str(demo_file)], env=env)
            console.print(f"Demo batch finished (exit code {code}); its flow run is in the UI: "
                          f"{ui}/runs")
        if not stay:
            return code
        console.print(f"[bold]batchops is up.[/] Prefect UI {ui}  API {webhook}  — "
                      "Ctrl-C stops everything.")
        processes.supervise()
    except KeyboardInterrupt:
        console.print("\nStopping …")
        return 0
    except subprocess.CalledProcessError as exc:  # its own message is above
        console.print(f"[red]{' '.join(exc.cmd[1:])} failed (exit code {exc.returncode})")
        return 1
    finally:
        processes.stop_all()
        postgres.stop()
