"""``batchops submit``: send a batch file to the API and follow it with a progress bar."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from batchops.csvio import input_format, open_operations
from batchops.errors import BadRequest, BatchopsError, ValidationFailed
from batchops.schemas import BatchStatus

__all__ = ["SubmitFailed", "submit_file"]



class SubmitFailed(BatchopsError):
    """The API refused the batch (its error code and message are kept)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        error = body.get("error") or {}
        self.code = str(error.get("code") or f"http_{status}")
        self.http_status = status
        self.errors = error.get("errors") or []
        super().__init__(f"the API answered {status} {self.code}: {error.get('message', '')}")


def _raise_for(answer: httpx.Response) -> None:
    if answer.status_code >= 400:
        try:
            body = answer.json()
        except ValueError:
            body = {"error": {"message": answer.text[:500]}}
        raise SubmitFailed(answer.status_code, body)


def submit_file(client: httpx.Client, file: Path, *, resource: str | None, method: str | None,
                concurrency: int | None, wait: bool, err: Console) -> BatchStatus | None:
    """POST the file (JSON/JSONL → ``/batches``, CSV → ``/batches/import``); with ``wait``,
    poll the status URL with a progress bar until the batch has finished."""
    is_csv = resource is not None or method is not None
    input_format(file, csv=is_csv)
    if is_csv:
        if resource is None or method is None:
            raise BadRequest("a CSV import needs both --resource and --method")
        answer = client.post("/batches/import", params={"resource": resource,
                                                         "method": method.upper()},
                             content=file.read_bytes(), headers={"Content-Type": "text/csv"})
    else:
        with open_operations(file) as operations:
            body: dict[str, Any] = {"operations": list(operations), "mode": "async"}
        if concurrency:
            body["concurrency"] = concurrency
        answer = client.post("/batches", json=body)
    _raise_for(answer)
    accepted = answer.json()
    status_url = accepted.get("status_url") or f"/batches/{accepted['batch_id']}/status"
    err.print(f"Batch [bold]{accepted['batch_id']}[/] accepted: {escape(status_url)}")
    if not wait:
        return None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=False) as progress:
        task = progress.add_task("queued", total=None)
        while True:
            poll = client.get(status_url)
            _raise_for(poll)
            status = BatchStatus.model_validate(poll.json())
            progress.update(task, total=status.total or None, completed=status.completed,
                            description=f"{status.status.value}: {status.succeeded} ok, "
                                        f"{status.failed} failed")
            if status.status.is_final:
                return status
            time.sleep(0.5)


def validation_errors(exc: SubmitFailed) -> ValidationFailed | None:
    """The API's 422 as the core's error, so the CLI prints it like a local one."""
    from batchops.errors import FieldError

    if exc.http_status != 422:
        return None
    return ValidationFailed([FieldError(e.get("index"), e.get("id"), e.get("field", ""),
                                        e.get("message", "")) for e in exc.errors], exc.message)
