"""Human-readable views of a batch: artifact tables and the markdown summary."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from batchops.schemas import BatchStatus, ChunkRef, ItemResult

__all__ = ["summary_markdown", "table_rows"]


def table_rows(results: Iterable[ItemResult]) -> list[dict[str, Any]]:
    return [
        {"index": r.index, "id": r.id or "", "state": r.state.value, "status": r.status,
         "error": f"{r.error.code}: {r.error.message}" if r.error else "",
         "replayed": r.replayed}
        for r in results
    ]


def summary_markdown(status: BatchStatus, failed_chunks: Sequence[ChunkRef],
                     error: str | None) -> str:
    lines = [
        f"# Batch `{status.batch_id}`: {status.status.value}",
        "",
        "| total | succeeded | failed | skipped | progress |",
        "|---:|---:|---:|---:|---:|",
        f"| {status.total} | {status.succeeded} | {status.failed} | {status.skipped} | "
        f"{status.progress:.0%} |",
    ]
    if status.started_at and status.finished_at:
        seconds = (status.finished_at - status.started_at).total_seconds()
        lines += ["", f"Ran {seconds:.2f} s."]
    if failed_chunks:
        lines += ["", "## Chunks that could not finish", ""]
        lines += [f"- chunk {c.chunk_index} ({c.label})" for c in failed_chunks]
    if error:
        lines += ["", f"Error: `{error}`"]
    return "\n".join(lines) + "\n"
