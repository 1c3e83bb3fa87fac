#!/usr/bin/env python3
"""Screenshots of the Prefect UI for the docs: a batch's flow run and its item table.

Re-runnable::

    .venv/bin/python scripts/screenshot_ui.py            # or: make up in another terminal first

1. Uses the system answering at 127.0.0.1:4200 (Prefect) and 127.0.0.1:8000 (batchops API);
   when the API does not answer, starts it with ``batchops up --demo examples/demo.json``
   (which uses a Prefect server already answering at :4200, or starts one) and stops it with
   SIGTERM at the end.
2. Submits a batch of 1,500 mixed operations through the API (``POST /batches``, async):
   ``POST /users`` with a few duplicate e-mail addresses and ``POST /emails`` with a few
   unknown templates or missing template variables — three chunk task runs, ~30 failed items.
   Every run uses fresh addresses, so running it again gives the same picture.
3. Waits for the batch, its flow run and its artifacts (artifact ids from the Prefect API,
   ``POST /api/artifacts/filter`` by flow run id), then has headless Chromium (Debian's
   ``chromium``, driven over the DevTools protocol) screenshot, at 1600x1000,
   * ``docs/ui-flow-run.png``    the flow run page with its Task Runs tab open: the graph with
     the chunk task runs side by side and the artifacts on the timeline, and below it the
     task runs, each *Completed*,
   * ``docs/ui-items-table.png`` the item table artifact (``/artifacts/artifact/<id>``): each
     item's index, id, state, status and error; three failures are among the first six rows.

   The Prefect UI is a JavaScript app: a page is shot only once its text holds what the
   picture is for (the flow run's name, *Completed*, the chunk task runs; the artifact's key
   and the failures' error codes) and the graph's canvas exists, plus a few seconds for the
   canvas to be drawn; a page that does not get there in 60 s is loaded once more, then the
   script fails (exit 1). A PNG under 40 kB (blank) never replaces the one in docs/.

Run it with the project's venv: besides the standard library it needs only ``websockets``,
which Prefect installs. Exit codes: 0 done, 1 a page did not render, 2 Chromium (or
``websockets``) missing or bad arguments, 3 the system or the batch failed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
TERMINAL_BATCH = {"completed", "failed", "cancelled"}
TERMINAL_FLOW_RUN = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
MIN_PNG_BYTES = 40_000  # a blank or skeleton page of this size compresses to far less
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--force-device-scale-factor=1", "--mute-audio",
)


def log(message: str) -> None:
    print(f"[screenshot_ui] {message}", flush=True)


class Failed(Exception):
    def __init__(self, message: str, code: int = 3) -> None:
        super().__init__(message)
        self.code = code


# -- HTTP ------------------------------------------------------------------------------------


def http_json(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
              timeout: float = 60) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Accept": "application/json", **(headers or {})})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            status, raw = answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def answers(url: str) -> bool:
    try:
        return http_json("GET", url, timeout=3)[0] == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str,
               interval: float = 1.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# -- the system ------------------------------------------------------------------------------


def batchops_command() -> list[str]:
    venv = ROOT / ".venv" / "bin" / "batchops"
    if venv.exists():
        return [str(venv)]
    found = shutil.which("batchops")
    if found:
        return [found]
    raise Failed("no `batchops` command: run `make install` (creates .venv) first")


def start_system(demo: Path, operations: int, log_file: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    # POST /batches takes 1,000 operations by default; this batch is bigger (the limit is a
    # setting, BATCHOPS_MAX_OPERATIONS), so the system started here accepts it.
    limit = int(env.get("BATCHOPS_MAX_OPERATIONS") or 1000)
    env["BATCHOPS_MAX_OPERATIONS"] = str(max(limit, operations))
    command = [*batchops_command(), "up", "--demo", str(demo)]
    log(f"no batchops API answers; starting `batchops {' '.join(command[-3:])}` (it reuses a "
        f"Prefect server answering at :4200, if any; BATCHOPS_MAX_OPERATIONS="
        f"{env['BATCHOPS_MAX_OPERATIONS']}; output: {log_file})")
    # Its own session: a Ctrl-C here reaches this script only, which then stops it (SIGTERM).
    with log_file.open("ab") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop_system(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    log(f"stopping the system it started (SIGTERM to pid {proc.pid}) …")
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        log(f"pid {proc.pid} still running after 90 s; sending SIGKILL")
        proc.kill()
        proc.wait(timeout=10)


# -- the batch -------------------------------------------------------------------------------


def make_operations(count: int, tag: str) -> list[dict[str, Any]]:
    """Two users for one e-mail now and then; every third operation an e-mail to send.

    Failures (all at run time; validation passes): a duplicate user e-mail is 409
    ``unique_violation``, an unknown template 422 ``unknown_template``, a ``promo`` without its
    ``code`` 422 ``missing_template_var``. The first rows hold one of each kind, so the first
    page of the item table shows them.
    """
    operations: list[dict[str, Any]] = []
    emails = 0
    for i in range(count):
        if i % 3 == 2:
            emails += 1
            body: dict[str, Any] = {"to": f"reader{i}.{tag}@example.com", "name": f"Reader {i}",
                                    "template": "welcome"}
            if i == 2 or emails % 40 == 0:
                body["template"] = "newsletter"  # unknown
            elif i == 5 or emails % 55 == 0:
                body["template"] = "promo"  # without vars.code
            elif emails % 2 == 0:
                body.update(template="promo", vars={"code": f"SAVE{i % 97}"})
            operations.append({"id": f"email-{i}", "method": "POST", "path": "/emails",
                               "body": body})
        else:
            email = f"user{i}.{tag}@example.com"
            # Now and then the address of the user three rows up: the same chunk, so the
            # chunks stay independent and run in parallel.
            if i == 4 or (i % 100 == 1 and i % 500 >= 3):
                email = f"user{i - 3}.{tag}@example.com"
            operations.append({"id": f"user-{i}", "method": "POST", "path": "/users",
                               "body": {"email": email, "name": f"User {i}"}})
    return operations


def submit(api: str, operations: list[dict[str, Any]], headers: dict[str, str]) -> str:
    status, body = http_json("POST", f"{api}/batches",
                             {"operations": operations, "mode": "async"}, headers, timeout=120)
    if status == 413 and isinstance(body, dict):
        limit = (body.get("error") or {}).get("limit")
        if isinstance(limit, int) and 0 < limit < len(operations):
            log(f"the running API takes at most {limit} operations per request "
                f"(BATCHOPS_MAX_OPERATIONS); submitting the first {limit}")
            return submit(api, operations[:limit], headers)
    if status != 202 or not isinstance(body, dict) or "batch_id" not in body:
        raise Failed(f"POST {api}/batches answered {status}: {str(body)[:500]}")
    return str(body["batch_id"])


def wait_for_batch(api: str, batch_id: str, headers: dict[str, str],
                   timeout: float) -> dict[str, Any]:
    shown = [""]

    def finished() -> dict[str, Any] | None:
        code, status = http_json("GET", f"{api}/batches/{batch_id}/status", headers=headers)
        if code != 200:
            raise Failed(f"GET /batches/{batch_id}/status answered {code}: {status}")
        line = (f"{status['status']}: {status['completed']}/{status['total']} "
                f"({status['succeeded']} ok, {status['failed']} failed)")
        if line != shown[0]:
            log(f"batch {batch_id} {line}")
            shown[0] = line
        return status if status["status"] in TERMINAL_BATCH else None

    return wait_until(finished, timeout, f"batch {batch_id}", interval=1.0)


def wait_for_flow_run(prefect_api: str, flow_run_id: str, timeout: float) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        code, run = http_json("GET", f"{prefect_api}/flow_runs/{flow_run_id}")
        if code != 200:
            raise Failed(f"GET {prefect_api}/flow_runs/{flow_run_id} answered {code}: {run}")
        return run if run.get("state_type") in TERMINAL_FLOW_RUN else None

    return wait_until(finished, timeout, f"flow run {flow_run_id} to finish")


def artifacts_of(prefect_api: str, flow_run_id: str, timeout: float) -> dict[str, dict[str, Any]]:
    """The flow run's artifacts by type (progress, table, markdown), once the table exists."""

    def found() -> dict[str, dict[str, Any]] | None:
        code, rows = http_json("POST", f"{prefect_api}/artifacts/filter",
                               {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
        if code != 200:
            raise Failed(f"POST {prefect_api}/artifacts/filter answered {code}: {rows}")
        by_type = {row["type"]: row for row in rows}
        return by_type if "table" in by_type else None

    return wait_until(found, timeout, f"the item table artifact of flow run {flow_run_id}")


def task_run_names(prefect_api: str, flow_run_id: str) -> list[str]:
    code, rows = http_json("POST", f"{prefect_api}/task_runs/filter",
                           {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200})
    if code != 200:
        raise Failed(f"POST {prefect_api}/task_runs/filter answered {code}: {rows}")
    return sorted(row["name"] for row in rows)


# -- Chromium --------------------------------------------------------------------------------


def find_chromium(given: str | None) -> str:
    path = given or shutil.which("chromium") or "/usr/bin/chromium"
    if Path(path).exists():
        return path
    print("Chromium is missing. Install Debian's package, then run this again:\n\n"
          "    sudo apt-get install -y chromium      # as root: apt-get install -y chromium\n",
          file=sys.stderr)
    raise Failed("no chromium", code=2)


class Browser:
    """Headless Chromium driven over the DevTools protocol, one page, real time.

    The ``--screenshot`` CLI with ``--virtual-time-budget`` drew the flow run graph (a canvas)
    with its time axis labels piled up in a corner in about half of the runs; a real browser
    that is given a few seconds once the page holds its content does not. The protocol runs
    over a websocket: the ``websockets`` package, which Prefect installs in the venv.
    """

    def __init__(self, binary: str, width: int, height: int) -> None:
        try:
            from websockets.sync.client import connect
        except ImportError:
            raise Failed("the `websockets` package is missing: run this script with the "
                         "project's venv, `.venv/bin/python scripts/screenshot_ui.py`",
                         code=2) from None
        self.profile = Path(tempfile.mkdtemp(prefix="screenshot-ui-chromium-"))
        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._ids = 0
        try:
            port_file = self.profile / "DevToolsActivePort"

            def port() -> str | None:
                if self.proc.poll() is not None:
                    raise Failed(f"chromium exited with {self.proc.returncode}", code=1)
                lines = port_file.read_text().split() if port_file.exists() else []
                return lines[0] if len(lines) >= 2 else None

            devtools = f"http://127.0.0.1:{wait_until(port, 30, 'chromium', 0.1)}"
            _, targets = http_json("GET", f"{devtools}/json/list")
            page = next(t for t in targets if t.get("type") == "page")
            self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: its renderers
                self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def call(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        self._ids += 1
        deadline = time.monotonic() + timeout
        try:
            self.ws.send(json.dumps({"id": self._ids, "method": method, "params": params}))
            while True:  # events (none are enabled, but some arrive) are skipped
                left = max(0.1, deadline - time.monotonic())
                message = json.loads(self.ws.recv(timeout=left))
                if message.get("id") == self._ids:
                    break
        except Exception as exc:  # a timeout, a closed connection: chromium is gone or stuck
            raise Failed(f"chromium: {method}: {type(exc).__name__}: {exc}", code=1) from None
        if "error" in message:
            raise Failed(f"chromium: {method}: {message['error']}", code=1)
        result: dict[str, Any] = message.get("result", {})
        return result

    def evaluate(self, expression: str) -> Any:
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return answer.get("result", {}).get("value")

    def open(self, url: str) -> None:
        answer = self.call("Page.navigate", url=url)
        if answer.get("errorText"):
            raise Failed(f"chromium cannot open {url}: {answer['errorText']}", code=1)

    def missing(self, markers: list[str], selectors: tuple[str, ...] = ()) -> list[str]:
        """The markers not (yet) in the page's text, and the CSS selectors matching nothing."""
        text = str(self.evaluate("document.body ? document.body.innerText : ''") or "").lower()
        gone = [m for m in markers if m.lower() not in text]
        return gone + [s for s in selectors
                       if not self.evaluate(f"!!document.querySelector({json.dumps(s)})")]

    def wait_for(self, markers: list[str], selectors: tuple[str, ...], timeout: float,
                 ) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            gone = self.missing(markers, selectors)
            if not gone or time.monotonic() > deadline:
                return gone
            time.sleep(0.25)

    def click_tab(self, label: str) -> bool:
        return bool(self.evaluate(
            "(() => { const tab = [...document.querySelectorAll('li.p-tab')]"
            f".find(t => t.innerText.trim() === {json.dumps(label)});"
            " if (!tab) return false; tab.click(); return true; })()"))

    def screenshot(self, png: Path) -> int:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        draft = png.with_name(f".{png.stem}.draft.png")
        draft.write_bytes(data)
        if len(data) < MIN_PNG_BYTES:
            draft.unlink()
            return len(data)
        draft.replace(png)  # the PNG in docs/ changes only when the new one is good
        return len(data)


def shoot(browser: Browser, url: str, png: Path, markers: list[str], *,
          selectors: tuple[str, ...] = (), tab: str | None = None,
          tab_markers: list[str] | None = None, timeout: float, settle: float) -> None:
    """Open ``url``; once the page holds every marker (and the tab, if any, is open and holds
    its markers), give it ``settle`` seconds to finish drawing, then screenshot it."""
    problem = ""
    for attempt in (1, 2):
        browser.open(url)
        gone = browser.wait_for(markers, selectors, timeout)
        if not gone and tab is not None:
            if browser.click_tab(tab):
                gone = browser.wait_for(tab_markers or [], (), timeout)
            else:
                gone = [f"the {tab!r} tab"]
        if gone:
            problem = f"after {timeout:.0f} s the page lacks {gone}"
            log(f"  attempt {attempt}: {problem}")
            continue
        time.sleep(settle)
        size = browser.screenshot(png)
        if size >= MIN_PNG_BYTES:
            return
        problem = f"the screenshot is only {size} bytes (blank?)"
        log(f"  attempt {attempt}: {problem}")
    raise Failed(f"{url} did not render: {problem}", code=1)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--operations", type=int, default=1500,
                        help="operations in the batch (default 1500: three chunk task runs)")
    parser.add_argument("--prefect", default="http://127.0.0.1:4200",
                        help="Prefect server (UI and API, under /api); a system this script "
                             "starts always uses 127.0.0.1:4200 and :8000")
    parser.add_argument("--api", default="http://127.0.0.1:8000", help="the batchops API")
    parser.add_argument("--demo", type=Path, default=ROOT / "examples" / "demo.json",
                        help="demo file for `batchops up --demo` when the script starts it")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go")
    parser.add_argument("--chromium", default=None, help="Chromium binary (default: chromium)")
    parser.add_argument("--window-size", default="1600,1000", help="WIDTH,HEIGHT")
    parser.add_argument("--render-timeout", type=float, default=60,
                        help="seconds a page may take to show its content")
    parser.add_argument("--settle", type=float, default=3,
                        help="seconds between the content showing and the screenshot")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds to wait for the system and for the batch")
    args = parser.parse_args(argv)
    if not 4 <= args.operations <= 1_000_000:
        parser.error("--operations must be between 4 and 1000000")
    try:
        width, height = (int(n) for n in args.window_size.split(","))
    except ValueError:
        parser.error("--window-size is WIDTH,HEIGHT, e.g. 1600,1000")
    args.width, args.height = width, height
    args.demo = args.demo.resolve()
    if not args.demo.is_file():
        parser.error(f"--demo {args.demo}: no such file")
    return args


def run(args: argparse.Namespace) -> int:
    binary = find_chromium(args.chromium)
    prefect, api = args.prefect.rstrip("/"), args.api.rstrip("/")
    prefect_api = f"{prefect}/api"
    headers = {}
    if os.environ.get("BATCHOPS_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['BATCHOPS_API_KEY']}"

    system: subprocess.Popen[bytes] | None = None
    log_dir = Path(tempfile.mkdtemp(prefix="screenshot-ui-"))
    succeeded = False
    try:
        prefect_up, api_up = answers(f"{prefect_api}/health"), answers(f"{api}/healthz")
        if api_up and not prefect_up:
            raise Failed(f"the API answers at {api} but no Prefect server at {prefect}")
        if api_up:
            log(f"using the running system: Prefect {prefect}, API {api}")
        else:
            system = start_system(args.demo, args.operations, log_dir / "batchops-up.log")

            def ready() -> bool:
                if system.poll() is not None:
                    raise Failed(f"`batchops up` exited with {system.returncode}; see "
                                 f"{log_dir / 'batchops-up.log'}")
                return answers(f"{prefect_api}/health") and answers(f"{api}/healthz")

            wait_until(ready, args.timeout, "the Prefect server and the API")
            log(f"system up: Prefect {prefect}, API {api}")

        tag = uuid.uuid4().hex[:8]
        operations = make_operations(args.operations, tag)
        batch_id = submit(api, operations, headers)
        log(f"submitted batch {batch_id} through POST {api}/batches")
        status = wait_for_batch(api, batch_id, headers, args.timeout)
        if status["status"] != "completed":
            raise Failed(f"batch {batch_id} ended {status['status']}")
        flow_run_id = status.get("flow_run_id")
        if not flow_run_id:
            raise Failed(f"batch {batch_id} has no flow_run_id: {status}")
        flow_run = wait_for_flow_run(prefect_api, flow_run_id, args.timeout)
        artifacts = artifacts_of(prefect_api, flow_run_id, 120)
        chunks = [n for n in task_run_names(prefect_api, flow_run_id) if n.startswith("chunk ")]
        log(f"flow run {flow_run['name']} ({flow_run_id}) {flow_run['state_type']}; "
            f"{len(chunks)} chunk task runs: {', '.join(chunks)}; artifacts: "
            f"{', '.join(sorted(artifacts))}")

        args.out.mkdir(parents=True, exist_ok=True)
        run_url = f"{prefect}/runs/flow-run/{flow_run_id}"
        table_url = f"{prefect}/artifacts/artifact/{artifacts['table']['id']}"
        failure_codes = sorted({i["error"]["code"] for i in failed_items(api, batch_id, headers)})
        with Browser(binary, args.width, args.height) as browser:
            # The Task Runs tab is opened by a click: a ?tab=Task%20Runs in the URL is dropped
            # while the flow run loads, as the UI hides that tab until it knows the run's state.
            png = args.out / "ui-flow-run.png"
            log(f"screenshot of {run_url} (Task Runs tab)")
            shoot(browser, run_url, png, [flow_run["name"], "Completed", "Task Runs"],
                  selectors=(".flow-run-graphs canvas",), tab="Task Runs",
                  tab_markers=["Search by run name", *chunks],
                  timeout=args.render_timeout, settle=args.settle)
            log(f"  wrote {png} ({png.stat().st_size // 1024} KiB)")
            png = args.out / "ui-items-table.png"
            log(f"screenshot of {table_url}")
            shoot(browser, table_url, png,
                  [f"batch-{batch_id}-items", "succeeded", "failed", *failure_codes],
                  timeout=args.render_timeout, settle=args.settle)
            log(f"  wrote {png} ({png.stat().st_size // 1024} KiB)")
        log(f"done: batch {batch_id}, {status['total']} items, {status['succeeded']} "
            f"succeeded, {status['failed']} failed; flow run {run_url}")
        succeeded = True
        return 0
    finally:
        if system is not None:
            stop_system(system)
        if succeeded:
            shutil.rmtree(log_dir, ignore_errors=True)
        elif system is not None:
            log(f"the output of `batchops up` is kept in {log_dir / 'batchops-up.log'}")
        else:
            shutil.rmtree(log_dir, ignore_errors=True)


def failed_items(api: str, batch_id: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    code, page = http_json("GET", f"{api}/batches/{batch_id}/results?state=failed&limit=1000",
                           headers=headers)
    if code != 200:
        raise Failed(f"GET /batches/{batch_id}/results answered {code}: {page}")
    return [item for item in page.get("items", []) if item.get("error")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except Failed as exc:
        if exc.code != 2 or str(exc) != "no chromium":
            log(f"error: {exc}")
        return exc.code
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
