"""Where ``bench.api``'s batchops time goes: per-request timelines and py-spy wall-time profiles.

Timelines join four clocks of one machine: the client's send/receive times, the store's batch
row (``created_at``, ``started_at``, ``finished_at``), and the Prefect API's flow run (created,
state times) and task runs (start/end). Profiles are ``py-spy record --idle --threads`` of the
API process: every sample of the thread running the sync flow
(``api.runs.BatchRunner._run_in_thread``) is labelled by what the flow was doing, so shares are
of wall time, waiting included.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

__all__ = ["ASYNC_PHASES", "SYNC_EXTRA", "SYNC_PHASES", "async_timeline", "fetch_prefect_runs",
           "median_phases", "percentile", "summarize_flow_profile", "sync_timeline"]

SYNC_PHASES = [
    ("http_in", "request sent → batch row inserted (HTTP, body read and parsed)"),
    ("register", "→ flow run created (validate + store the batch, hand-off to the sync thread, "
                 "create the flow run through the Prefect API)"),
    ("flow_start", "→ flow run Running (engine setup, Pending/Running states)"),
    ("chunks", "→ last chunk task done (load the batch, run_chunk: cache lookup, execute + "
               "record, result persisted)"),
    ("final", "→ batch final in the store (the flow's finish step)"),
    ("after", "→ response received (the API sees the final status, results query, JSON "
              "answer)"),
]
# Not phases of the sum.
SYNC_EXTRA = [
    ("flow_end_after_response", "response received → flow run Completed (artifacts, "
                                "Completed state: after the answer)"),
    ("total", "request sent → response received"),
]

ASYNC_PHASES = [
    ("post", "POST → 202 (validate, store, create the deployment's flow run)"),
    ("pickup", "202 → the worker picks the run up (Pending; it polls the work pool)"),
    ("spawn", "Pending → Running (the worker starts the run in a thread of its process: "
              "engine setup)"),
    ("work", "Running → batch completed in the store (load, chunks, finish)"),
    ("seen", "completed → seen by the client (status poll interval)"),
]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _ts(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def fetch_prefect_runs(api_url: str, flow_run_ids: Iterable[str],
                       ) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Flow runs (with their state history) and their task runs, by flow run id."""
    ids = sorted({i for i in flow_run_ids if i})
    flow_runs: dict[str, dict[str, Any]] = {}
    task_runs: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    with httpx.Client(base_url=api_url, timeout=60) as client:
        for start in range(0, len(ids), 200):
            page = ids[start:start + 200]
            resp = client.post("/flow_runs/filter",
                               json={"flow_runs": {"id": {"any_": page}}, "limit": 200})
            resp.raise_for_status()
            for fr in resp.json():
                flow_runs[fr["id"]] = fr
            offset = 0
            while True:
                resp = client.post("/task_runs/filter", json={
                    "flow_runs": {"id": {"any_": page}}, "limit": 200, "offset": offset})
                resp.raise_for_status()
                rows = resp.json()
                for tr in rows:
                    task_runs.setdefault(tr["flow_run_id"], []).append(tr)
                if len(rows) < 200:
                    break
                offset += 200
        for fr_id in ids:
            if fr_id in flow_runs:
                resp = client.get("/flow_run_states/", params={"flow_run_id": fr_id})
                if resp.status_code == 200:
                    flow_runs[fr_id]["_states"] = resp.json()
    return flow_runs, task_runs


def _state_time(flow_run: dict[str, Any], state_type: str) -> float | None:
    times = [_ts(s["timestamp"]) for s in flow_run.get("_states", [])
             if s.get("type") == state_type]
    return min((t for t in times if t is not None), default=None)


def _task_end(task_runs: list[dict[str, Any]], prefix: str) -> float | None:
    ends = [_ts(t.get("end_time")) for t in task_runs if str(t.get("name", "")).startswith(prefix)]
    return max((e for e in ends if e is not None), default=None)


def _diffs(points: list[tuple[str, float | None]]) -> dict[str, float | None]:
    """Phase durations between consecutive points (``None`` where a point is missing)."""
    out: dict[str, float | None] = {}
    previous: float | None = points[0][1]
    for name, at in points[1:]:
        out[name] = None if at is None or previous is None else at - previous
        if at is not None:
            previous = at
    return out


def sync_timeline(sample: dict[str, Any], batch_row: dict[str, Any] | None,
                  flow_run: dict[str, Any] | None, tasks: list[dict[str, Any]],
                  ) -> dict[str, float | None]:
    """One sync request's phases (seconds), in the order of ``SYNC_PHASES``."""
    batch_row = batch_row or {}
    fr = flow_run or {}
    points = [
        ("start", sample["sent_at"]),
        ("http_in", _ts(batch_row.get("created_at"))),
        ("register", _ts(fr.get("created"))),
        ("flow_start", _ts(fr.get("start_time")) or _state_time(fr, "RUNNING")),
        ("chunks", _task_end(tasks, "chunk ")),
        ("final", _ts(batch_row.get("finished_at"))),
        ("after", sample["received_at"]),
    ]
    out = _diffs(points)
    flow_end = _ts(fr.get("end_time")) or _state_time(fr, "COMPLETED")
    out["flow_end_after_response"] = (None if flow_end is None
                                      else flow_end - sample["received_at"])
    out["total"] = sample["received_at"] - sample["sent_at"]
    return out


def async_timeline(run: dict[str, Any], batch_row: dict[str, Any] | None,
                   flow_run: dict[str, Any] | None) -> dict[str, float | None]:
    """One async batch's phases (seconds), in the order of ``ASYNC_PHASES``."""
    batch_row = batch_row or {}
    fr = flow_run or {}
    points = [
        ("start", run["sent_at"]),
        ("post", run["accepted_at"]),
        ("pickup", _state_time(fr, "PENDING")),
        ("spawn", _ts(fr.get("start_time")) or _state_time(fr, "RUNNING")),
        ("work", _ts(batch_row.get("finished_at"))),
        ("seen", run["completed_seen_at"]),
    ]
    return _diffs(points)


def median_phases(timelines: list[dict[str, float | None]],
                  phases: list[tuple[str, str]]) -> list[dict[str, Any]]:
    rows = []
    for key, label in phases:
        values = [t[key] for t in timelines if t.get(key) is not None]
        rows.append({"phase": key, "label": label, "samples": len(values),
                     "median_ms": round(1000 * statistics.median(values), 1) if values else None,
                     "p95_ms": round(1000 * percentile(values, 95), 1) if values else None})
    return rows


# -- py-spy ---------------------------------------------------------------------------------


def _parse_raw(raw: Path) -> list[tuple[str, list[str], int]]:
    """``(thread name, frames root→leaf, samples)`` per line of py-spy's raw output."""
    out = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = ""
        if frames and frames[0].startswith("thread ("):
            thread = frames[0].split(": ", 1)[-1]
            frames = frames[1:]
        out.append((thread, frames, int(count)))
    return out


def _function(frame: str) -> str:
    return frame.split(" (", 1)[0]


def _where(frame: str) -> tuple[str, int]:
    inside = frame.rsplit(" (", 1)[-1].rstrip(")")
    file, _, line = inside.rpartition(":")
    return file, int(line) if line.isdigit() else 0


_WAITS = {
    "Prefect API": ("HTTP11Connection.", "httpcore", "httpx"),
    "database": ("DefaultDialect.do_", "cursor.execute", "psycopg2"),
    "waiting for another thread": ("Condition.wait", "Event.wait", "_wait_for_tstate_lock",
                                   "Future.result"),
}


def _kind(frames: list[str]) -> str:
    """What the leaf of a sample is doing: an HTTP call, SQL, waiting on a thread, or CPU."""
    for frame in reversed(frames[-12:]):
        for kind, marks in _WAITS.items():
            if any(mark in frame for mark in marks):
                return kind
    return "CPU"


def _flow_label(frames: list[str], flow_source: list[str]) -> str:
    """What a sample of the sync flow thread was doing: the flow body's current line, else
    the deepest Prefect engine step; and whether it waited on the Prefect API, SQL, a thread
    or ran Python."""
    kind = _kind(frames)
    names = [_function(f) for f in frames]
    if "_send_heartbeats" in names and "Thread.join" in names:
        return "engine: heartbeat thread join at flow end (it sleeps in 1 s steps)"
    for frame in reversed(frames):
        name = _function(frame)
        file, line = _where(frame)
        if name == "process_batch" and file.endswith("process_batch.py"):
            text = flow_source[line - 1] if 0 < line <= len(flow_source) else "?"
            text = text.split("  #", 1)[0].strip()
            return f"flow body: {text[:60]} [{kind}]"
    if "get_client" in names:
        return f"engine: get_client (a new Prefect client for the run) [{kind}]"
    engine = [n for n in names if n.startswith("FlowRunEngine.")]
    if engine:
        callee = next((n for n in names[names.index(engine[-1]) + 1:]
                       if n.startswith(("FlowRunClient.", "SyncPrefectClient."))), "")
        return f"engine: {engine[-1]}{' > ' + callee if callee else ''} [{kind}]"
    return f"other: {names[-1] if names else '?'} [{kind}]"


def summarize_flow_profile(raw: Path, flow_source: list[str], requests: int, rate: int,
                           top: int = 20) -> dict[str, Any]:
    """Wall time per request of the sync flow thread, by activity; and of the chunk threads.

    ``requests`` sync batches ran while py-spy sampled ``rate`` times a second.
    """
    if not raw.exists():
        return {"error": "py-spy wrote nothing"}
    flow: Counter[str] = Counter()
    chunk_incl: Counter[str] = Counter()
    loop_incl: Counter[str] = Counter()
    chunk_total = loop_total = flow_total = 0
    for thread, frames, n in _parse_raw(raw):
        names = [_function(f) for f in frames]
        if "BatchRunner._run_in_thread" in names:
            flow_total += n
            flow[_flow_label(frames, flow_source)] += n
        elif "run_chunk" in names:
            chunk_total += n
            for name in set(names):
                chunk_incl[name] += n
        elif thread == "MainThread" and not any(
                name.endswith(("select", "_run_once")) and i == len(names) - 1
                for i, name in enumerate(names)):
            loop_total += n  # the API's event loop, busy (not waiting in select)
            for name in set(names):
                loop_incl[name] += n

    def ms(samples: int) -> float:
        return round(1000 * samples / rate / max(requests, 1), 1)

    return {
        "requests": requests, "rate_hz": rate,
        "flow_thread_ms_per_request": ms(flow_total),
        "flow_thread": [{"activity": k, "ms_per_request": ms(v),
                         "share": round(v / flow_total, 3) if flow_total else 0.0}
                        for k, v in flow.most_common(top)],
        "chunk_threads_ms_per_request": ms(chunk_total),
        "chunk_threads_inclusive": [{"function": k, "ms_per_request": ms(v)}
                                    for k, v in chunk_incl.most_common(top)],
        "event_loop_busy_ms_per_request": ms(loop_total),
        "event_loop_inclusive": [{"function": k, "ms_per_request": ms(v)}
                                 for k, v in loop_incl.most_common(12)],
    }
