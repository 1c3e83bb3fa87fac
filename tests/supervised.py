"""A small system under a :class:`~deployments.processes.Supervisor`, run the way ``batchops up``
runs its processes, for tests:

    python -m tests.supervised LOG_DIR STOP_TIMEOUT PORT [PORT ...]

One web server (``python -m http.server``) per port; the last one is started by ``slow``, a
parent that ignores SIGINT, so a graceful stop of it waits for the whole ``STOP_TIMEOUT``. The
supervisor prints the pids it started (``started {json}``) and its reports, line by line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from deployments.processes import Supervisor

_SLOW = """
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-m", "http.server", sys.argv[1], "--bind", "127.0.0.1"])
time.sleep(3600)
"""


def main(argv: list[str]) -> None:
    log_dir, stop_timeout, *ports = argv
    processes = Supervisor(Path(log_dir), log=lambda line: print(line, flush=True))
    processes.stop_on_signals()
    env = dict(os.environ)
    try:
        for port in ports[:-1]:
            processes.start(f"web-{port}", [sys.executable, "-m", "http.server", port,
                                            "--bind", "127.0.0.1"], env, cwd=Path(log_dir))
        processes.start("slow", [sys.executable, "-c", _SLOW, ports[-1]], env, cwd=Path(log_dir))
        print("started", json.dumps({c.name: c.proc.pid for c in processes.children}),
              flush=True)
        processes.supervise(poll=0.1)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        processes.stop_all(timeout=float(stop_timeout))
        print("stopped", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
