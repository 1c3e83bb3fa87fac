"""The ``batchops`` command line: run a batch file with a live progress bar, then read results.

::

    batchops run ops.json                                   # a JSON array, or ops.jsonl
    batchops run users.csv --resource users --method POST   # one operation per row
    batchops status ID [--json]
    batchops results ID [--state failed] [--format csv|json] [-o FILE]
    batchops db upgrade
    batchops dead-letters list [--batch-id ID] [--target http] [--code C] [--json]
    batchops dead-letters replay [DEAD_LETTER_ID ...] [--batch-id ID ...] [--all]

Exit codes: 0 every item succeeded, 1 some items failed, 2 bad input (nothing ran), 3 the run
itself failed. Errors of the :mod:`batchops.errors` tree become a message and an exit code in
one place, :class:`_Commands`.

Runs execute in this process. They report to the Prefect server named by ``PREFECT_API_URL``,
else to the one ``batchops up`` runs (``BATCHOPS_PREFECT_UI_URL``, default
``http://127.0.0.1:4200``) when it answers, so they show in its UI, else to a temporary
Prefect server started for the run.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from itertools import chain
from pathlib import Path
from typing import Annotated, Any, TextIO

import httpx
import sqlalchemy as sa
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from typer.core import TyperGroup

from batchops.csvio import (
    CsvImport,
    input_format,
    line_of,
    open_operations,
    write_results_csv,
    write_results_json,
)
from batchops.dead_letters import DeadLetterFilter, DeadLetterReplay, DeadLetters
from batchops.dead_letters import replay_dead_letters as register_replay
from batchops.errors import BadRequest, BatchopsError, ValidationFailed
from batchops.runtime import Runtime, get_runtime
from batchops.schemas import BatchState, BatchStatus, ItemState
from batchops.settings import MAX_CHUNK_SIZE, get_settings
from batchops.store import Store
from batchops.submission import Submission
from batchops.submission import submit as submit_batch

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_ITEMS_FAILED",
    "EXIT_OK",
    "EXIT_RUN_FAILED",
    "app",
    "prefect_for_runs",
    "use_local_prefect_server",
]

EXIT_OK = 0
EXIT_ITEMS_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 3
EXIT_INTERRUPTED = 130

# Validation errors shown in the terminal; the message says how many there were in all.
_SHOWN_ERRORS = 100
_POLL_SECONDS = 0.25

_out = Console(highlight=False)
_err = Console(stderr=True, highlight=False)


class _Commands(TyperGroup):
    """The command group; the one place a :class:`BatchopsError` becomes a message and a code."""

    def invoke(self, ctx: Any) -> Any:  # typer's vendored click.Context
        try:
            return super().invoke(ctx)
        except BatchopsError as exc:
            _print_error(exc)
            raise typer.Exit(EXIT_BAD_INPUT if exc.http_status < 500 else EXIT_RUN_FAILED
                             ) from None
        except sa.exc.OperationalError as exc:
            _err.print(f"[bold red]error:[/] cannot use the batch store's database: "
                       f"{escape(str(exc.orig).strip())}")
            raise typer.Exit(EXIT_RUN_FAILED) from None


app = typer.Typer(
    cls=_Commands,
    name="batchops",
    help="Run batches of API operations as Prefect flows, and read their results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
db_app = typer.Typer(help="The batch store's database.", no_args_is_help=True)
app.add_typer(db_app, name="db")
dead_letters_app = typer.Typer(help="Items that ran out of retries: list them, replay them.",
                               no_args_is_help=True)
app.add_typer(dead_letters_app, name="dead-letters")


class ResultFormat(StrEnum):
    CSV = "csv"
    JSON = "json"


def use_local_prefect_server(api_url: str | None = None, timeout: float = 0.5) -> str | None:
    """Choose the Prefect API for runs of this process; the URL, or ``None`` for a temporary one.

    ``PREFECT_API_URL`` wins when set. Otherwise, when a Prefect server answers at ``api_url``
    (default: the API under ``BATCHOPS_PREFECT_UI_URL``, the server ``batchops up`` starts), it
    is exported as ``PREFECT_API_URL``, so runs appear in that server's UI and processes
    started from here use it too. The same place keeps Prefect's console logs to warnings (the
    progress bar tells the rest; the UI still receives every log), keeps a temporary server's
    telemetry off and gives it time to start.
    """
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    # A first temporary server migrates a new database; Prefect's 20 s is often too short.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        return configured
    if api_url is None:
        api_url = get_settings().prefect_ui_url.rstrip("/") + "/api"
    try:
        answer = httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout)
    except httpx.HTTPError:
        return None
    if answer.status_code != 200:
        return None
    os.environ["PREFECT_API_URL"] = api_url
    return api_url


@contextmanager
def prefect_for_runs(*, flow_heartbeats: bool = True) -> Iterator[str | None]:
    """Run the block against the Prefect API :func:`use_local_prefect_server` chooses.

    Prefect reads its settings from the environment once, when it is first imported (the
    http target imports it with the runtime), so a URL found here is also applied through
    Prefect's settings context for this process.

    Without ``flow_heartbeats`` (the commands that run a batch's flow in this process), the
    runs send no Prefect flow-run heartbeats unless ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is
    set: Prefect joins its heartbeat thread, which sleeps in 1-second steps, when a run ends,
    and the command exits only then (up to 1 s on every run). The batch's own heartbeats in
    the store are what the reaper watches: it marks the run of a killed CLI crashed and runs
    the batch again. Both changes go in one settings context (each costs ~0.1 s).
    """
    url = use_local_prefect_server()
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )

    updates = {PREFECT_API_URL: url} if url and get_current_settings().api.url != url else {}
    defaults = {} if flow_heartbeats else {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    if not updates and not defaults:
        yield url
        return
    with temporary_settings(updates=updates, set_defaults=defaults):
        yield url


def _runs_ui_url(prefect_api: str | None) -> str | None:
    """The UI of the Prefect server at ``prefect_api``, the one this process's runs are
    recorded on: Prefect's ``PREFECT_UI_URL``, which it derives from the API URL unless set.
    ``None`` for a temporary server (its UI is gone once the command ends)."""
    if prefect_api is None:
        return None
    from prefect.settings import PREFECT_UI_URL

    return PREFECT_UI_URL.value()


# -- output ------------------------------------------------------------------------------------


def _print_error(exc: BatchopsError) -> None:
    if isinstance(exc, ValidationFailed):
        _print_validation_errors(exc)
    else:  # one line, whatever the terminal's width
        _err.print(f"[bold red]error:[/] {escape(exc.message)}", soft_wrap=True)


def _print_validation_errors(exc: ValidationFailed) -> None:
    errors = exc.errors
    lines = [line_of(e.id) for e in errors]
    show_line = any(n is not None for n in lines)
    show_id = any(e.id is not None and n is None for e, n in zip(errors, lines, strict=True))
    table = Table(title=escape(exc.message), title_justify="left", title_style="bold red")
    if show_line:
        table.add_column("line", justify="right")
    table.add_column("index", justify="right")
    if show_id:
        table.add_column("id")
    table.add_column("field")
    table.add_column("message")
    for error, line in list(zip(errors, lines, strict=True))[:_SHOWN_ERRORS]:
        cells = [str(line) if line is not None else ""] if show_line else []
        cells.append("" if error.index is None else str(error.index))
        if show_id:
            cells.append(escape(error.id or ""))
        cells += [escape(error.field), escape(error.message)]
        table.add_row(*cells)
    _err.print(table)
    if len(errors) > _SHOWN_ERRORS:
        _err.print(f"… {len(errors) - _SHOWN_ERRORS} more not shown.")
    _err.print("Nothing ran. Fix the input and run it again.")


def _describe_progress(status: BatchStatus) -> str:
    failed = f", [red]{status.failed} failed[/]" if status.failed else ""
    skipped = f", [yellow]{status.skipped} skipped[/]" if status.skipped else ""
    return f"{status.status.value}: {status.succeeded} succeeded{failed}{skipped}"


def _print_summary(status: BatchStatus, prefect_api: str | None) -> None:
    state_style = "green" if status.status is BatchState.COMPLETED else "red"
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("batch", status.batch_id)
    table.add_row("status", f"[{state_style}]{status.status.value}[/]")
    table.add_row("total", str(status.total))
    table.add_row("succeeded", f"[green]{status.succeeded}[/]")
    table.add_row("failed", f"[red]{status.failed}[/]" if status.failed else "0")
    if status.skipped:
        table.add_row("skipped", f"[yellow]{status.skipped}[/] (deadline passed)")
    if status.started_at and status.finished_at:
        seconds = (status.finished_at - status.started_at).total_seconds()
        table.add_row("time", f"{seconds:.1f} s")
    _out.print(table)
    _out.print(f"Results:  batchops results {status.batch_id} -o results.csv")
    if status.failed:
        _out.print(f"Failures: batchops results {status.batch_id} --state failed")
    if prefect_api and status.ui_url:
        _out.print(f"Prefect:  {status.ui_url}")


def _print_status(status: BatchStatus) -> None:
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = {
        "batch": status.batch_id,
        "status": status.status.value,
        "progress": f"{status.completed}/{status.total} ({status.progress:.0%})",
        "succeeded": str(status.succeeded),
        "failed": str(status.failed),
        "skipped": str(status.skipped) if status.skipped else "",
        "deadline": status.deadline_at.isoformat() if status.deadline_at else "",
        "started": status.started_at.isoformat() if status.started_at else "",
        "finished": status.finished_at.isoformat() if status.finished_at else "",
        "flow run": status.flow_run_id or "",
        "Prefect UI": status.ui_url or "",
    }
    for name, value in rows.items():
        if value:
            table.add_row(name, escape(value))
    _out.print(table)


# -- run ---------------------------------------------------------------------------------------


def _register(runtime: Runtime, file: Path, csv: CsvImport | None, concurrency: int | None,
              chunk_size: int | None, deadline: float | None = None) -> tuple[str, int]:
    with _err.status(f"Reading and validating {escape(file.name)}…"), \
            open_operations(file, csv=csv) as operations:
        first = next(operations, None)
        if first is None:
            raise BadRequest(f"{file.name}: no operations in the file")
        # Run here (``sync``: this process runs the flow), for the default scope, unmetered.
        submission = Submission(scope="default", mode="sync", source="cli",
                                concurrency=concurrency, chunk_size=chunk_size,
                                max_operations=runtime.settings.api.max_import_rows,
                                deadline_seconds=deadline)
        submitted = asyncio.run(submit_batch(runtime, submission, chain([first], operations)))
        return submitted.batch_id, submitted.total


def _follow(store: Store, batch_id: str, progress: Progress, task: TaskID,
            finished: threading.Event) -> None:
    """Move the progress bar from the store's counters until ``finished`` is set."""
    while not finished.wait(_POLL_SECONDS):
        try:
            status = store.status(batch_id)
        except sa.exc.SQLAlchemyError:
            continue  # a missed reading only delays the bar; the run reports real trouble
        progress.update(task, completed=status.completed, description=_describe_progress(status))


def _execute(runtime: Runtime, batch_id: str, total: int) -> str | None:
    """Run the batch's flow in this process with a live progress bar; why it failed, or None.
    (Inside :func:`prefect_for_runs`, without flow heartbeats.)

    The run is a flow run of the ``process-batch`` deployment (its tags, named
    ``batch-<id>`` from its creation), created ``Pending`` so that no worker of the pool takes
    it, and executed here by a batchops worker embedded in this process, as the API does for a
    sync batch: a cancel in the Prefect UI stops it too. On a server without the deployment (a
    temporary one), it is a run of the flow alone.
    """
    from prefect.settings import get_current_settings

    from batchops import orchestration  # imports Prefect: after its environment
    from deployments.worker import BatchopsWorker
    from flows.process_batch import process_batch

    pending = orchestration.PendingRuns(runtime.settings.api.process_batch_deployment)
    worker = BatchopsWorker(work_pool_name="batchops-cli", name=f"batchops-cli-{os.getpid()}")

    def run_here() -> Any:
        flow_run = pending.create(process_batch, {"batch_id": batch_id},
                                  name=f"batch-{batch_id}")
        return worker.execute_watched(process_batch, flow_run)

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=_err) as progress:
        task = progress.add_task("queued", total=total)
        finished = threading.Event()
        follower = threading.Thread(target=_follow, name="batchops-progress", daemon=True,
                                    args=(runtime.store, batch_id, progress, task, finished))
        follower.start()
        try:
            state = pending.run(get_current_settings(), run_here)
        except Exception as exc:  # Prefect could not run the flow at all (API unreachable, …)
            return f"{type(exc).__name__}: {exc}"
        finally:
            pending.close()
            finished.set()
            follower.join()
            last = runtime.store.status(batch_id)
            progress.update(task, completed=last.completed, description=_describe_progress(last))
    if state is None:
        return "Prefect's engine could not run the flow (see the log above)"
    if not state.is_completed():
        return state.message or f"the flow run ended {state.type.value}"
    return None


@app.command()
def run(
    file: Annotated[Path, typer.Argument(
        help="Operations: a JSON array (.json), one per line (.jsonl), or rows (.csv).",
        metavar="FILE", show_default=False)],
    resource: Annotated[str | None, typer.Option(
        help="CSV only: the resource each row is for, e.g. users.")] = None,
    method: Annotated[str | None, typer.Option(
        help="CSV only: POST creates /RESOURCE; PUT, PATCH, DELETE, GET use the row's id.")
    ] = None,
    concurrency: Annotated[int | None, typer.Option(
        min=1, max=1000, help="Items in flight at once (default: the configured default).")] = None,
    chunk_size: Annotated[int | None, typer.Option(
        min=1, max=MAX_CHUNK_SIZE, help="Items per chunk task run (default: sized by work, at most "
             "max_chunk_items).")] = None,
    deadline: Annotated[float | None, typer.Option(
        min=0.001, metavar="SECONDS",
        help="No item starts after this many seconds; the rest are skipped.")] = None,
) -> None:
    """Validate a batch file, run it with a live progress bar, and summarise the outcome.

    Exit code 0 when every item succeeded, 1 when some failed or were skipped, 2 when the
    input is invalid (nothing ran), 3 when the run itself failed.
    """
    with prefect_for_runs(flow_heartbeats=False) as api_url:
        _run_file(file, resource, method, concurrency, chunk_size, deadline, api_url)


def _run_file(file: Path, resource: str | None, method: str | None, concurrency: int | None,
              chunk_size: int | None, deadline: float | None, prefect_api: str | None) -> None:
    is_csv = resource is not None or method is not None
    input_format(file, csv=is_csv)
    if is_csv and (resource is None or method is None):
        raise BadRequest("a CSV import needs both --resource and --method")
    runtime = get_runtime()
    csv = CsvImport.for_route(runtime.router, resource, method) if resource and method else None
    batch_id, total = _register(runtime, file, csv, concurrency, chunk_size, deadline)
    _err.print(f"Batch [bold]{batch_id}[/]: {total} operations, valid. Running…"
               + ("" if prefect_api else " (temporary Prefect server; start `prefect server "
                  "start` to follow runs in its UI)"))
    started = time.monotonic()
    try:
        failure = _execute(runtime, batch_id, total)
    except KeyboardInterrupt:
        _err.print(f"[bold red]interrupted[/] after {time.monotonic() - started:.0f} s; "
                   f"see `batchops status {batch_id}`")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    status = runtime.store.status(batch_id, ui_url=_runs_ui_url(prefect_api))
    _print_summary(status, prefect_api)
    if failure is not None:
        _err.print(f"[bold red]the run failed:[/] {escape(failure)}")
        raise typer.Exit(EXIT_RUN_FAILED)
    raise typer.Exit(EXIT_ITEMS_FAILED if status.failed or status.skipped else EXIT_OK)


# -- status, results, db -----------------------------------------------------------------------


@app.command()
def status(
    batch_id: Annotated[str, typer.Argument(metavar="ID", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Show a batch's status and counters."""
    runtime = get_runtime()
    current = runtime.store.status(batch_id, ui_url=runtime.settings.prefect_ui_url)
    if as_json:
        typer.echo(current.model_dump_json(indent=2))
    else:
        _print_status(current)


def _write_results(store: Store, batch_id: str, state: ItemState | None, fmt: ResultFormat,
                   out: TextIO) -> int:
    items = store.results.of_batch(batch_id, state=state)
    if fmt is ResultFormat.JSON:
        return write_results_json(items, out)
    return write_results_csv(items, out)


@app.command()
def results(
    batch_id: Annotated[str, typer.Argument(metavar="ID", show_default=False)],
    state: Annotated[ItemState | None, typer.Option(
        help="Only the items in this state.", show_default=False)] = None,
    fmt: Annotated[ResultFormat, typer.Option("--format", help="File format.")] = (
        ResultFormat.CSV),
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write to this file instead of standard output.",
        dir_okay=False, show_default=False)] = None,
) -> None:
    """Write a batch's per-item results as CSV or JSON.

    CSV columns: row, index, id, state, status, error_code, error_message, result (JSON).
    ``row`` is the input line of a CSV import. Cells a spreadsheet would run as a formula
    start with an apostrophe.
    """
    store = get_runtime().store
    store.get_batch(batch_id)  # an unknown id fails before a file is created
    if output is None:
        _write_results(store, batch_id, state, fmt, sys.stdout)
        return
    with output.open("w", encoding="utf-8", newline="") as fh:
        count = _write_results(store, batch_id, state, fmt, fh)
    _err.print(f"Wrote {count} results to {escape(str(output))}")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Bring the batch store's schema to the newest migration (Alembic)."""
    from alembic.runtime.migration import MigrationContext

    store = get_runtime().store  # building the runtime migrates the store
    store.migrate()
    with store.read() as conn:
        revision = MigrationContext.configure(conn).get_current_revision()
    url = store.engine.url.render_as_string(hide_password=True)
    _out.print(f"Store {escape(url)} is at revision {revision} (head).")


# -- dead letters ------------------------------------------------------------------------------

_SCOPE_HELP = "The API key's scope the dead letters belong to."


def _filter(batch_id: str | None, target: str | None, resource: str | None,
            code: str | None, status: int | None) -> DeadLetterFilter | None:
    flt = DeadLetterFilter(batch_id=batch_id, target=target, resource=resource, code=code,
                           status=status)
    return None if flt.is_empty else flt


@dead_letters_app.command("list")
def dead_letters_list(
    batch_id: Annotated[str | None, typer.Option(help="The batch they failed in.")] = None,
    target: Annotated[str | None, typer.Option(help="http, sql or python.")] = None,
    resource: Annotated[str | None, typer.Option(help="The upstream (or resource).")] = None,
    code: Annotated[str | None, typer.Option(help="The last attempt's error code.")] = None,
    status: Annotated[int | None, typer.Option(help="The last attempt's status.")] = None,
    replayed: Annotated[bool | None, typer.Option(
        "--replayed/--not-replayed", help="Only replayed ones, or only the others.",
        show_default=False)] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, oldest first.")] = 100,
    scope: Annotated[str, typer.Option(help=_SCOPE_HELP)] = "default",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line.")] = False,
) -> None:
    """List dead letters: the request, how often it was tried, the last error."""
    found = DeadLetters(get_runtime().store).find(
        scope, _filter(batch_id, target, resource, code, status), replayed=replayed,
        limit=limit)
    if as_json:
        for dead in found:
            typer.echo(dead.model_dump_json())
        return
    table = Table(title=f"{len(found)} dead letter(s)", title_justify="left")
    for column in ("id", "batch", "item", "request", "attempts", "last error", "replayed into"):
        table.add_column(column, overflow="fold")
    for dead in found:
        table.add_row(str(dead.id), dead.batch_id, escape(dead.item_id or str(dead.item_index)),
                      escape(f"{dead.method} {dead.path}"), str(dead.attempts),
                      escape(f"{dead.status} {dead.code}: {dead.message}"),
                      dead.replayed_batch_id or "")
    _out.print(table)


@dead_letters_app.command("replay")
def dead_letters_replay(
    ids: Annotated[list[int] | None, typer.Argument(
        metavar="[DEAD_LETTER_ID]...", help="These dead letters.", show_default=False)] = None,
    batch_id: Annotated[str | None, typer.Option(help="Those of this batch.")] = None,
    target: Annotated[str | None, typer.Option(help="Those of this target.")] = None,
    resource: Annotated[str | None, typer.Option(help="Those of this upstream.")] = None,
    code: Annotated[str | None, typer.Option(help="Those with this error code.")] = None,
    status: Annotated[int | None, typer.Option(help="Those with this status.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Every one not replayed yet.")
                          ] = False,
    include_replayed: Annotated[bool, typer.Option(
        help="Also those replayed before.")] = False,
    scope: Annotated[str, typer.Option(help=_SCOPE_HELP)] = "default",
) -> None:
    """Run dead letters again as a new batch, here, with a progress bar.

    Choose them by id, by filter options, or --all (no choice is refused, never read as
    "everything"). Exit codes as for `run`.
    """
    with prefect_for_runs(flow_heartbeats=False) as api_url:
        _replay(ids, batch_id, target, resource, code, status, replay_all, include_replayed,
                scope, api_url)


def _replay(ids: list[int] | None, batch_id: str | None, target: str | None,
            resource: str | None, code: str | None, status: int | None, replay_all: bool,
            include_replayed: bool, scope: str, prefect_api: str | None) -> None:
    runtime = get_runtime()
    request = DeadLetterReplay(ids=ids or None, filter=_filter(batch_id, target, resource, code,
                                                                status),
                               all=replay_all, include_replayed=include_replayed)
    replay = register_replay(runtime, scope, request)
    if replay.batch_id is None:
        _err.print("No dead letters to replay.")
        raise typer.Exit(EXIT_OK)
    _err.print(f"Replaying {replay.replayed} dead letter(s) as batch [bold]{replay.batch_id}[/]…")
    failure = _execute(runtime, replay.batch_id, replay.replayed)
    current = runtime.store.status(replay.batch_id, ui_url=_runs_ui_url(prefect_api))
    _print_summary(current, prefect_api)
    if failure is not None:
        _err.print(f"[bold red]the run failed:[/] {escape(failure)}")
        raise typer.Exit(EXIT_RUN_FAILED)
    raise typer.Exit(EXIT_ITEMS_FAILED if current.failed else EXIT_OK)


@app.command()
def up(
    demo: Annotated[Path | None, typer.Option(help="Batch to run once the server is up.")] = Path(
        "examples/demo.json"),
    port: Annotated[int, typer.Option(help="Port of the Prefect server (UI and API).")] = 4200,
    api_port: Annotated[int | None, typer.Option(
        help="Port of the batchops API (default BATCHOPS_API_PORT, 8000).")] = None,
    stay: Annotated[bool, typer.Option(
        help="Keep running (a process that dies is restarted) until Ctrl-C.")] = True,
    scaled: Annotated[bool, typer.Option(
        help="Production backends on this machine: 2 Prefect API servers and the services on "
             "PostgreSQL with prefect-redis, 2 workers on the 'batchops' work pool, 2 APIs "
             "(BATCHOPS_API_PORT and the next, :8000 and :8001). See docs/scaling.md.")
    ] = False,
) -> None:
    """Start the system on the embedded default: PostgreSQL from a wheel (data under .data/),
    a Prefect server on it, a batchops worker, the API on BATCHOPS_API_PORT (8000), then the
    demo batch through this CLI. A process that
    dies is restarted; Ctrl-C stops everything (a second Ctrl-C at once)."""
    settings = get_settings()  # a bad setting stops here, before anything starts
    demo_file = demo if demo and demo.exists() else None
    if scaled:
        from deployments.scaled import ScaledTopology, run_scaled_system

        topology = ScaledTopology(api_ports=(settings.api.port, settings.api.port + 1))
        raise typer.Exit(run_scaled_system(topology, demo_file, stay=stay))
    from deployments.local import run_local_system

    raise typer.Exit(run_local_system(
        demo_file, port=port, api_port=settings.api.port if api_port is None else api_port,
        api_host=settings.api.host, stay=stay))


@app.command()
def deploy(
    work_pool: Annotated[str, typer.Option(
        help="The batchops-type work pool (created if missing).")] = "batchops",
) -> None:
    """Register the deployments with a work pool for batchops workers (the reaper among them: it
    re-runs the batches of a worker that died)."""
    from deployments.serve import deploy_to_work_pool

    ids = deploy_to_work_pool(work_pool)
    _out.print(f"{len(ids)} deployments on the work pool {work_pool!r}")


@app.command()
def worker(
    work_pool: Annotated[str, typer.Option(help="The work pool to poll.")] = "batchops",
    limit: Annotated[int, typer.Option(min=1, help="Flow runs at once.")] = 10,
    name: Annotated[str | None, typer.Option(help="The worker's name in Prefect.")] = None,
) -> None:
    """Run a batchops worker: it polls the work pool and runs each flow run warm, in a thread
    of this process (the same as ``prefect worker start --type batchops``)."""
    import anyio

    from deployments.worker import BatchopsWorker

    with prefect_for_runs():
        anyio.run(BatchopsWorker(work_pool_name=work_pool, limit=limit, name=name).start)


@app.command()
def serve() -> None:
    """Serve the deployments (process-batch, bulk-sync, retry-failed) as a Prefect runner."""
    with prefect_for_runs():
        from deployments.serve import serve_deployments

        serve_deployments()



@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Interface (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(
        help="Port (default BATCHOPS_API_PORT, 8000).")] = None,
) -> None:
    """Serve the webhook API (FastAPI, uvicorn). Without API keys it binds to 127.0.0.1 only."""
    with prefect_for_runs():
        from api.main import run as run_api

        run_api(host, port)


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="Operations (.json/.jsonl) or rows (.csv).",
                                         metavar="FILE", show_default=False)],
    url: Annotated[str | None, typer.Option(
        help="The batchops API (default http://127.0.0.1:BATCHOPS_API_PORT).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="BATCHOPS_API_KEY",
                                                help="API key (or BATCHOPS_API_KEY).")] = None,
    resource: Annotated[str | None, typer.Option(help="CSV only: the resource.")] = None,
    method: Annotated[str | None, typer.Option(help="CSV only: the method.")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, max=1000)] = None,
    wait: Annotated[bool, typer.Option(help="Follow the batch until it has finished.")] = False,
) -> None:
    """Submit a batch through the API; with --wait, show its progress until it finishes.

    Exit codes as for `run`: 0 all succeeded, 1 some failed, 2 refused input, 3 failed run.
    """
    from cli.submit import SubmitFailed, submit_file, validation_errors

    url = url or f"http://127.0.0.1:{get_settings().api.port}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
            status = submit_file(client, file, resource=resource, method=method,
                                 concurrency=concurrency, wait=wait, err=_err)
    except SubmitFailed as exc:
        invalid = validation_errors(exc)
        if invalid is not None:
            raise invalid from None
        _err.print(f"[bold red]error:[/] {escape(exc.message)}")
        raise typer.Exit(EXIT_BAD_INPUT if exc.http_status < 500 else EXIT_RUN_FAILED) from None
    except httpx.HTTPError as exc:
        _err.print(f"[bold red]error:[/] cannot reach the API at {escape(url)}: {exc}")
        raise typer.Exit(EXIT_RUN_FAILED) from None
    if status is None:
        raise typer.Exit(EXIT_OK)
    _print_summary(status, status.ui_url)
    if status.status is BatchState.FAILED:
        raise typer.Exit(EXIT_RUN_FAILED)
    raise typer.Exit(EXIT_ITEMS_FAILED if status.failed else EXIT_OK)
