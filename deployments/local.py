"""The embedded system on one machine: a standing Prefect server (SQLite), the runner serving
the deployments, the webhook API on :8000, then the demo batch.

``batchops up`` (and ``make up``) calls :func:`run_local_system`. Everything lives under
``.data/``: the Prefect server's database and results, the batchops store, the logs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console

__all__ = ["run_local_system", "wait_for_prefect"]

console = Console()


def wait_for_prefect(api_url: str, timeout: float = 120) -> bool:
    return _wait_http(f"{api_url}/health", timeout)


def _prefect_env(data_dir: Path, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", str(data_dir / "prefect"))
    env.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(data_dir / "prefect" / "storage"))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    return env


def _wait_http(url: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # runners and uvicorn finish what they run
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def run_local_system(demo_file: Path | None, *, port: int = 4200, api_port: int = 8000,
                     data_dir: Path = Path(".data"), stay: bool = True) -> int:
    """Start the Prefect server, the runner and the API, run the demo batch, keep serving
    until Ctrl-C, then stop every process."""
    # Ctrl-C and SIGTERM both stop everything (SIGINT may arrive ignored in a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    data_dir.mkdir(parents=True, exist_ok=True)
    env = _prefect_env(data_dir.resolve(), port)
    env.setdefault("BATCHOPS_PREFECT_UI_URL", f"http://127.0.0.1:{port}")
    api_url = env["PREFECT_API_URL"]
    log = open(data_dir / "prefect-server.log", "ab")  # noqa: SIM115 - lives as long as the server
    server: subprocess.Popen[bytes] | None = None
    children: list[subprocess.Popen[bytes]] = []
    try:
        if wait_for_prefect(api_url, timeout=1):
            console.print(f"[yellow]A Prefect server already answers at {api_url}; using it.")
        else:
            console.print(f"Starting the Prefect server on 127.0.0.1:{port} (SQLite under "
                          f"{env['PREFECT_HOME']}) …")
            server = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                 "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
            if not wait_for_prefect(api_url):
                console.print(f"[red]The Prefect server did not start; see {log.name}")
                return 1
        ui = f"http://127.0.0.1:{port}"
        console.print(f"[green]Prefect server ready[/]: UI {ui}  API {api_url}")
        subprocess.check_call([sys.executable, "-m", "cli", "db", "upgrade"], env=env)
        for name, args in (
            ("runner", ["-m", "cli", "serve"]),
            ("api", ["-m", "cli", "api", "--port", str(api_port)]),
        ):
            out = open(data_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
            children.append(subprocess.Popen([sys.executable, *args], env=env, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True))
        webhook = f"http://127.0.0.1:{api_port}"
        if not _wait_http(f"{webhook}/healthz"):
            console.print(f"[red]The API did not start; see {data_dir / 'api.log'}")
            return 1
        console.print(f"[green]API ready[/]: {webhook}  (docs {webhook}/docs); runner serving "
                      "process-batch, bulk-sync, retry-failed")
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
        while (server is None or server.poll() is None) and all(
                c.poll() is None for c in children):
            time.sleep(1)
        console.print("[red]A process stopped; see the logs under .data/. Stopping the rest.")
        return 1
    except KeyboardInterrupt:
        console.print("\nStopping …")
        return 0
    finally:
        for child in reversed(children):
            _stop(child)
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()
