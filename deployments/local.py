"""The embedded system on one machine: a standing Prefect server (SQLite) and the demo batch.

``batchops up`` (and ``make up``) calls :func:`run_local_system`. Everything lives under
``.data/``: the Prefect server's database and results, and the batchops store.
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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def _prefect_env(data_dir: Path, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", str(data_dir / "prefect"))
    env.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(data_dir / "prefect" / "storage"))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    return env


def run_local_system(demo_file: Path | None, *, port: int = 4200, data_dir: Path = Path(".data"),
                     stay: bool = True) -> int:
    """Start the Prefect server, run the demo batch, keep serving until Ctrl-C."""
    data_dir.mkdir(parents=True, exist_ok=True)
    env = _prefect_env(data_dir.resolve(), port)
    api_url = env["PREFECT_API_URL"]
    log = open(data_dir / "prefect-server.log", "ab")  # noqa: SIM115 - lives as long as the server
    server: subprocess.Popen[bytes] | None = None
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
        code = 0
        if demo_file is not None:
            console.print(f"Running the demo batch {demo_file} through the CLI …")
            code = subprocess.call([sys.executable, "-m", "cli", "run",
                                    str(demo_file)], env=env)
            console.print(f"Demo batch finished (exit code {code}); its flow run is in the UI: "
                          f"{ui}/runs")
        if not stay:
            return code
        console.print("[bold]batchops is up.[/] Prefect UI: " + ui +
                      "  — Ctrl-C stops everything.")
        while server is None or server.poll() is None:
            time.sleep(1)
        console.print("[red]The Prefect server stopped.")
        return 1
    except KeyboardInterrupt:
        console.print("\nStopping …")
        return 0
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()
