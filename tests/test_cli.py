"""The ``batchops`` CLI end to end: real runtime (SQLite, PostgreSQL), real Prefect test server."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner, Result

from batchops.devtools import free_port
from batchops.runtime import Runtime
from cli.main import (
    EXIT_BAD_INPUT,
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    app,
    use_local_prefect_server,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Environment the CLI sets for Prefect; registered so each test leaves it as it found it.
PREFECT_ENV = ("PREFECT_API_URL", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")


@pytest.fixture
def prefect_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PREFECT_ENV:
        monkeypatch.setenv(name, os.environ.get(name, ""))
        monkeypatch.delenv(name)


@pytest.fixture
def flow_env(prefect_server: None, prefect_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs go to the session's Prefect test server (the CLI then probes nothing)."""
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))


def cli(*args: str | Path) -> Result:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def table(text: str) -> list[tuple[str, ...]]:
    """The body rows of the Rich tables in ``text``, cells stripped."""
    return [tuple(cell.strip() for cell in line.split("│")[1:-1])
            for line in text.splitlines() if line.startswith("│")]


def summary(result: Result) -> dict[str, str]:
    return {row[0]: row[1] for row in table(result.stdout) if len(row) == 2}


def count(runtime: Runtime, table: str) -> int:
    with runtime.store.engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


def users_csv(path: Path, rows: int, *, duplicates: dict[int, int] | None = None,
              invalid: dict[int, dict[str, str]] | None = None) -> Path:
    """``rows`` users; ``duplicates`` maps a data row to the earlier one whose email it reuses,
    ``invalid`` replaces cells of a data row (data row 0 is on line 2)."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["id", "email", "name"], lineterminator="\n")
        writer.writeheader()
        for i in range(rows):
            row = {"id": str(i + 1), "email": f"user{i}@example.com", "name": f"User {i}"}
            if duplicates and i in duplicates:
                row["email"] = f"user{duplicates[i]}@example.com"
            row.update((invalid or {}).get(i, {}))
            writer.writerow(row)
    return path


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# -- run -----------------------------------------------------------------------------------------


def test_csv_import_of_5000_users_reports_failures_by_input_line(
        flow_env: None, runtime: Runtime, tmp_path: Path) -> None:
    duplicates = {700: 10, 2500: 2400, 4999: 0}  # lines 702, 2502, 5001
    path = users_csv(tmp_path / "users.csv", 5000, duplicates=duplicates)

    result = cli("run", path, "--resource", "users", "--method", "POST", "--concurrency", "20")

    assert result.exit_code == EXIT_ITEMS_FAILED, result.output
    batch_id = summary(result)["batch"]
    assert summary(result) == {"batch": batch_id, "status": "completed", "total": "5000",
                               "succeeded": "4997", "failed": "3",
                               "time": summary(result)["time"]}
    assert f"Failures: batchops results {batch_id} --state failed" in result.stdout
    assert count(runtime, "users") == 4997
    status = json.loads(cli("status", batch_id, "--json").stdout)
    assert (status["status"], status["total"], status["succeeded"], status["failed"]) == (
        "completed", 5000, 4997, 3)

    out = tmp_path / "failed.csv"
    assert cli("results", batch_id, "--state", "failed", "-o", out).exit_code == EXIT_OK
    failed = read_csv(out.read_text())
    assert [(r["row"], r["index"], r["id"], r["status"], r["error_code"]) for r in failed] == [
        ("702", "700", "line 702", "409", "unique_violation"),
        ("2502", "2500", "line 2502", "409", "unique_violation"),
        ("5001", "4999", "line 5001", "409", "unique_violation")]
    assert all("email" in r["error_message"] for r in failed)

    every = read_csv(cli("results", batch_id).stdout)
    assert len(every) == 5000
    assert all(r["row"] == str(int(r["index"]) + 2) for r in every)
    assert json.loads(every[0]["result"]) == {"id": 1, "email": "user0@example.com",
                                              "name": "User 0"}


def test_csv_with_invalid_values_lists_their_lines_and_runs_nothing(
        runtime: Runtime, prefect_env: None, tmp_path: Path) -> None:
    path = users_csv(tmp_path / "users.csv", 5000, invalid={
        41: {"id": "forty-two"}, 1999: {"email": ""}, 4998: {"id": "4.5", "email": ""}})

    result = cli("run", path, "--resource", "users", "--method", "POST")

    assert result.exit_code == EXIT_BAD_INPUT
    assert "4 validation error(s) in 3 operation(s); nothing ran" in result.stderr
    assert set(table(result.stderr)) == {
        ("43", "41", "body.id", "expected an integer, got 'forty-two'"),
        ("2001", "1999", "body.email", "field required"),
        ("5000", "4998", "body.id", "expected an integer, got '4.5'"),
        ("5000", "4998", "body.email", "field required"),
    }
    assert count(runtime, "batches") == 0 and count(runtime, "users") == 0


def test_json_demo_batch_runs_every_kind_of_target(flow_env: None, runtime: Runtime) -> None:
    result = cli("run", EXAMPLES / "demo.json")

    assert result.exit_code == EXIT_ITEMS_FAILED, result.output
    batch_id = summary(result)["batch"]
    items = json.loads(cli("results", batch_id, "--format", "json").stdout)
    by_id = {item["id"]: item for item in items}
    assert len(items) == 26
    assert [i["id"] for i in items if i["state"] == "failed"] == ["user-dup"]
    assert by_id["user-dup"]["error"]["code"] == "unique_violation"
    assert (by_id["order-123"]["status"], by_id["product-456-gone"]["status"]) == (201, 204)
    assert by_id["email-3"]["result"]["subject"] == "Alan, 20% off this week"
    assert count(runtime, "outbox") == 3 and count(runtime, "users") == 19


def test_example_users_csv_has_two_duplicates(flow_env: None, configure: Any,
                                              tmp_path: Path) -> None:
    configure(database_url=f"sqlite:///{tmp_path / 'batchops.db'}")
    result = cli("run", EXAMPLES / "users.csv", "--resource", "users", "--method", "POST")

    assert result.exit_code == EXIT_ITEMS_FAILED, result.output
    failed = read_csv(cli("results", summary(result)["batch"], "--state", "failed").stdout)
    assert [(r["row"], r["error_code"]) for r in failed] == [
        ("22", "unique_violation"), ("43", "unique_violation")]


def test_jsonl_batch_that_succeeds_exits_0_and_escapes_formula_ids(
        flow_env: None, runtime: Runtime, tmp_path: Path) -> None:
    ids = ["=HYPERLINK(\"http://evil\")", "+1", "-1", "@SUM(A1)", "\tx", "plain"]
    path = tmp_path / "ops.jsonl"
    path.write_text("\n".join(json.dumps(
        {"id": op_id, "method": "PUT", "path": f"/orders/{n}", "body": {"status": "new"}})
        for n, op_id in enumerate(ids, start=1)) + "\n\n")

    result = cli("run", path, "--chunk-size", "2")

    assert result.exit_code == EXIT_OK, result.output
    assert "Failures:" not in result.stdout
    rows = read_csv(cli("results", summary(result)["batch"]).stdout)
    assert [r["id"] for r in rows] == [
        "'=HYPERLINK(\"http://evil\")", "'+1", "'-1", "'@SUM(A1)", "'\tx", "plain"]
    assert {r["row"] for r in rows} == {""} and {r["status"] for r in rows} == {"201"}
    assert count(runtime, "orders") == 6


def test_a_run_that_cannot_finish_exits_3(flow_env: None, configure: Any,
                                          tmp_path: Path) -> None:
    ghosts = {"ghosts": {"columns": {"id": {"type": "integer"}, "name": {}},
                         "database_url": "postgresql+psycopg2://postgres@127.0.0.1:1/none"}}
    configure(database_url=f"sqlite:///{tmp_path / 'b.db'}", resources=json.dumps(ghosts),
              chunk_retries=0)
    path = tmp_path / "ghosts.json"
    path.write_text(json.dumps([{"method": "PUT", "path": "/ghosts/1", "body": {"name": "x"}}]))

    result = cli("run", path)

    assert result.exit_code == EXIT_RUN_FAILED, result.output
    assert "the run failed:" in result.stderr and "could not finish" in result.stderr
    # A transient failure (the target's database is unreachable) past the chunk's retries
    # leaves the batch processing: the reaper runs it again once it is stale.
    assert summary(result)["status"] == "processing"


# -- bad input -----------------------------------------------------------------------------------


@pytest.fixture
def sqlite_runtime(configure: Any, prefect_env: None, tmp_path: Path) -> Runtime:
    runtime: Runtime = configure(database_url=f"sqlite:///{tmp_path / 'batchops.db'}")
    return runtime


@pytest.mark.parametrize(("name", "text", "options", "message"), [
    ("missing.json", None, [], "missing.json: no such file"),
    ("ops.json", '[{"method": "GET", "path": "/users/1"},\n oops]',
     [], "ops.json: invalid JSON at line 2 column 2: Expecting value"),
    ("ops.jsonl", '{"method": "GET"}\n{"method"}\n', [], "ops.jsonl: invalid JSON on line 2"),
    ("ops.json", "[]", [], "ops.json: no operations in the file"),
    ("ops.yaml", "- a", [], "cannot tell the format"),
    ("users.csv", "email\na@example.com\n", [], "a CSV file needs a resource and a method"),
    ("users.csv", "email\na@example.com\n", ["--resource", "users"],
     "needs both --resource and --method"),
    ("users.csv", "name\nAnn\n", ["--resource", "users", "--method", "POST"],
     "users.csv: missing column(s) email needed for POST /users"),
    ("users.csv", "email,age\na@example.com,3\n", ["--resource", "users", "--method", "POST"],
     "users.csv: users has no column(s) age"),
    ("users.csv", "email\na@example.com\n", ["--resource", "customers", "--method", "POST"],
     "unknown resource 'customers'"),
    ("users.csv", "id,email\n1,a\n2,b,c\n", ["--resource", "users", "--method", "PUT"],
     "users.csv line 3: 3 fields, but the header has 2"),
    ("users.csv", "id,name\n1,Ann\n,Bob\n", ["--resource", "users", "--method", "PATCH"],
     "users.csv line 3: the id cell is empty"),
    ("ops.json", json.dumps([{"method": "POST", "path": "/users", "body": {"email": "a"}}]),
     ["--resource", "users", "--method", "POST"], "apply to CSV files only"),
])
def test_bad_files_get_a_message_and_exit_2(sqlite_runtime: Runtime, tmp_path: Path, name: str,
                                            text: str | None, options: list[str],
                                            message: str) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)

    result = cli("run", path, *options)

    assert result.exit_code == EXIT_BAD_INPUT
    assert "error:" in result.stderr and message in " ".join(result.stderr.split())
    assert result.stdout == ""
    assert count(sqlite_runtime, "batches") == 0


def test_json_validation_errors_show_index_and_id(sqlite_runtime: Runtime,
                                                  tmp_path: Path) -> None:
    path = tmp_path / "ops.json"
    path.write_text(json.dumps([
        {"id": "ok", "method": "DELETE", "path": "/users/1"},
        {"id": "bad", "method": "FETCH", "path": "/users"},
        {"method": "POST", "path": "/nowhere", "body": {}},
    ]))
    result = cli("run", path)

    assert result.exit_code == EXIT_BAD_INPUT
    assert "┃ index ┃ id  ┃ field  ┃ message" in result.stderr
    errors = table(result.stderr)
    assert ("2", "", "path", "no target serves '/nowhere'") in errors
    assert [e[:3] for e in errors] == [("1", "bad", "method"), ("2", "", "path")]


def test_unknown_batch_ids_exit_2(sqlite_runtime: Runtime, tmp_path: Path) -> None:
    for args in (["status", "nope"], ["results", "nope", "-o", tmp_path / "r.csv"]):
        result = cli(*args)
        assert result.exit_code == EXIT_BAD_INPUT
        assert "error: no batch with id 'nope'" in result.stderr
    assert not (tmp_path / "r.csv").exists()


# -- status, db ----------------------------------------------------------------------------------


def test_status_table_of_a_registered_batch(sqlite_runtime: Runtime) -> None:
    from batchops.registration import register_batch

    batch_id, _ = register_batch(sqlite_runtime, [
        {"method": "DELETE", "path": f"/users/{i}"} for i in range(3)])
    result = cli("status", batch_id)
    assert result.exit_code == EXIT_OK
    assert summary(result) == {"batch": batch_id, "status": "queued", "progress": "0/3 (0%)",
                               "succeeded": "0", "failed": "0"}
    assert cli("results", batch_id).stdout == (
        "row,index,id,state,status,error_code,error_message,result\n")


def test_db_upgrade_migrates_the_store(runtime: Runtime) -> None:
    result = cli("db", "upgrade")
    assert result.exit_code == EXIT_OK
    assert "is at revision" in result.stdout and "(head)" in result.stdout
    with runtime.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


# -- Prefect server ------------------------------------------------------------------------------


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/api/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[str]:
    """A server answering ``/api/health`` as a Prefect server does; its API URL."""
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/api"
    server.shutdown()
    server.server_close()


def test_a_prefect_server_that_answers_is_used(prefect_env: None, health_server: str) -> None:
    assert use_local_prefect_server(health_server) == health_server
    assert os.environ["PREFECT_API_URL"] == health_server
    assert os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] == "WARNING"


def test_without_a_server_prefect_runs_a_temporary_one(prefect_env: None) -> None:
    assert use_local_prefect_server(f"http://127.0.0.1:{free_port()}/api") is None
    assert "PREFECT_API_URL" not in os.environ


def test_a_configured_prefect_api_url_wins(prefect_env: None, health_server: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.internal:4200/api")
    assert use_local_prefect_server(health_server) == "http://prefect.internal:4200/api"


def _run_one_user(tmp_path: Path, email: str, **env: str) -> tuple[str, str, str]:
    """``batchops run`` of a 1-item file in a process of its own, with no Prefect setting but
    ``env`` and an empty ``PREFECT_HOME``; exits 0, no traceback. Its output, the Prefect link
    it printed, and the batch id."""
    import subprocess
    import sys

    ops = tmp_path / "one.json"
    ops.write_text(json.dumps([{"method": "POST", "path": "/users", "body": {"email": email}}]))
    full = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    full.update({"PREFECT_HOME": str(tmp_path / "empty-prefect-home"),
                 "BATCHOPS_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}",
                 "COLUMNS": "250", **env})
    done = subprocess.run([sys.executable, "-m", "cli", "run", str(ops)], env=full,
                          cwd=EXAMPLES.parent, capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == EXIT_OK, output
    assert "Traceback" not in output
    [link] = [line.split()[-1] for line in done.stdout.splitlines()
              if line.startswith("Prefect:")]
    [batch_id] = [line.split()[-2] for line in done.stdout.splitlines()
                  if line.startswith("│ batch ")]
    return output, link, batch_id


@pytest.mark.parametrize("found", [True, False], ids=["found", "PREFECT_API_URL"])
def test_run_records_its_flow_run_on_the_running_server_and_links_to_it(
        prefect_server: None, tmp_path: Path, found: bool) -> None:
    """With no PREFECT_API_URL, `batchops run` finds the server `batchops up` runs (at
    BATCHOPS_PREFECT_UI_URL), records its flow run there, and prints a link to that run; with
    PREFECT_API_URL, it records it on that server and links to that server's UI."""
    import uuid

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    api_url = str(PREFECT_API_URL.value())
    if found:
        env = {"BATCHOPS_PREFECT_UI_URL": api_url.removesuffix("/api")}
    else:  # batchops' own default UI (nothing listens there) is not where the run is
        env = {"PREFECT_API_URL": api_url,
               "BATCHOPS_PREFECT_UI_URL": f"http://127.0.0.1:{free_port()}"}
    output, link, _batch_id = _run_one_user(tmp_path, "linked@example.com", **env)

    assert "temporary Prefect server" not in output
    assert link.startswith(f"{api_url.removesuffix('/api')}/runs/flow-run/")
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(link.rsplit("/", 1)[1]))
    assert run.name.startswith("batch-")
    assert run.state is not None and run.state.is_completed()


def test_run_is_a_flow_run_of_the_process_batch_deployment_named_by_its_batch(
        prefect_server: None, tmp_path: Path) -> None:
    """With the deployments on the server (as `make up` has them), `batchops run` records its
    batch as a flow run of ``process-batch`` with the deployment's tags, named ``batch-<id>``
    when it is created; no worker of the pool takes it: it ran in the CLI's process."""
    import uuid

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    from deployments.serve import deploy_to_work_pool

    pool = f"batchops-cli-test-{uuid.uuid4().hex[:6]}"
    ids = deploy_to_work_pool(pool)
    try:
        _output, link, batch_id = _run_one_user(tmp_path, "deployed@example.com",
                                                PREFECT_API_URL=str(PREFECT_API_URL.value()))
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(uuid.UUID(link.rsplit("/", 1)[1]))
            deployment = client.read_deployment_by_name("process-batch/process-batch")
            states = [s.name for s in client.read_flow_run_states(run.id)]
    finally:
        with get_client(sync_client=True) as client:
            for deployment_id in ids:
                client.delete_deployment(deployment_id)
            client.delete_work_pool(pool)

    assert run.deployment_id == deployment.id
    assert run.work_pool_name == pool
    assert "batchops" in run.tags
    assert run.name == f"batch-{batch_id}"
    assert states == ["Pending", "Running", "Completed"]  # never Scheduled for the pool


# -- start-up ------------------------------------------------------------------------------------


def start(args: list[str], cwd: Path, **env: str) -> tuple[int, str, str]:
    """``batchops ARGS`` in a process of its own: exit code, stdout, stderr. A command still
    running after 60 s is stopped (SIGTERM: it stops what it started) and fails the test."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", *args], cwd=cwd, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent),
                                     "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",
                                     **env})
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"batchops {' '.join(args)} still ran after 60 s:\n{out}\n{err}")
    return proc.returncode, out, err


@pytest.mark.parametrize(("command", "name", "value"), [
    ("api", "BATCHOPS_API_PORT", "eighty"),
    ("up", "BATCHOPS_API_KEYS", '["unclosed'),
])
def test_a_bad_setting_stops_start_up_with_one_line_naming_it(
        tmp_path: Path, command: str, name: str, value: str) -> None:
    # Free ports all the same: a start-up that went on would not take anyone's.
    args = [command, "--port", str(free_port())] + (["--no-stay"] if command == "up" else [])
    code, out, err = start(args, tmp_path, **{"BATCHOPS_API_PORT": str(free_port()),
                                              name: value})

    assert code == EXIT_RUN_FAILED, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: invalid setting {name}: ")
    assert value not in lines[0]  # values are not shown: some are secrets
    assert not (tmp_path / ".data").exists()  # nothing started


def test_up_uses_the_api_port_setting_and_says_at_once_when_it_is_busy(tmp_path: Path) -> None:
    with socket.socket() as taken:  # the port the setting names is busy: up says so at once
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        code, out, err = start(["up", "--no-stay", "--port", str(free_port())], tmp_path,
                               BATCHOPS_API_PORT=str(port))

    assert code == 1, (out, err)
    assert f"Port {port} on 127.0.0.1 is in use" in out
    assert "Starting the Prefect server" not in out
