"""Benchmark: batchops' HTTP API against a hand-written batch endpoint (the seed's design).

    python -m bench.api                                   # the full run (about 5 minutes)
    python -m bench.api --requests 10 --async-runs 1 --no-profile --cli-runs 1   # quick

In one run, against PostgreSQL (the store in database ``batchops_bench_api``, dropped and
created anew unless ``--keep-db``), the batchops side runs the way ``make up`` does:

* a Prefect server of the bench's own: plain ``prefect server start`` on a free 127.0.0.1
  port, on the machine's PostgreSQL, database ``batchops_bench_prefect`` (dropped and created
  anew every run; ``bench._prefect_server``);
* the deployments registered with ``deployments.serve.deploy_to_work_pool`` on a work pool of
  the bench's own (``batchops-bench-api``, of the ``batchops`` worker type);
* one batchops worker, ``python -m cli worker --work-pool batchops-bench-api --limit 4``
  (``deployments.worker``: each flow run in a thread of its long-lived process), with
  ``PREFECT_WORKER_QUERY_SECONDS=0.25`` and ``PREFECT_WORKER_PREFETCH_SECONDS=1``;
* **batchops** — the real API, ``uvicorn --factory api.main:create_app`` in a subprocess on a
  free 127.0.0.1 port (quota off, no config file);
* **hand-written** — ``bench._handwritten_api``: ``POST /batches`` looping over the operations
  with an ``asyncio.Semaphore(10)``, one SQL statement and transaction per item (psycopg2 in
  threads), per-item results in the answer; served by uvicorn the same way.

Cases (both sides get the same kind of work, ``POST /users`` with fresh ids, so every item
succeeds; requests are sequential and alternate between the two sides):

* a 10-item and a 100-item sync batch (``mode: sync``): latency p50/p95 over ``--requests``;
* a 1,000-item async batch: seconds from ``POST`` to status ``completed`` (polled), beside the
  hand-written endpoint answering the same 1,000 items (run to completion), ``--async-runs``;
* ``batchops run`` of a 1-item file as a whole process (``python -m cli run``, with the system
  up: the same store and Prefect server), ``--cli-runs`` times: its fixed cost.

Targets (issue 17): 1,000-item async POST → completed ≤ 1.0 s; 10-item sync p50 ≤ 60 ms and
p95 ≤ 150 ms; ``batchops run`` of a 1-item file ≤ 2.5 s. The ratios to the hand-written side
are printed beside them. Where the time goes: per-request timelines (client, store and Prefect
API timestamps) and a ``py-spy`` wall-time profile of the API process. Results:
``bench/results/api-<timestamp>.json``, ``api-latest.json`` and ``api-latest.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg2
import psycopg2.extras

from bench._api_analysis import (
    ASYNC_PHASES,
    SYNC_EXTRA,
    SYNC_PHASES,
    async_timeline,
    fetch_prefect_runs,
    median_phases,
    percentile,
    summarize_flow_profile,
    sync_timeline,
)
from bench._api_procs import ManagedProcess, http_ok, uvicorn_app, worker
from bench._batchops_run import _cpu_seconds, _postgres_pids
from bench._prefect_server import PrefectServer, process_tree
from bench.sql_target import ensure_database, git_state, log, snapshot_code, wait_quiet

RESULTS = Path(__file__).resolve().parent / "results"
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
DB_NAME = "batchops_bench_api"
DB_URL = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{DB_NAME}"
DSN = f"host=127.0.0.1 port=5432 user=postgres dbname={DB_NAME}"
PREFECT_DB_NAME = "batchops_bench_prefect"  # the Prefect server's own database
WORK_POOL = "batchops-bench-api"
WORKER_LIMIT = 4  # as make up (deployments.local.WORKER_LIMIT)
WORKER_POLL_SECONDS = 0.25  # PREFECT_WORKER_QUERY_SECONDS, as `make up` sets it
# issue 17
TARGET_ASYNC_S = 1.0
TARGET_SYNC10_P50_MS, TARGET_SYNC10_P95_MS = 60.0, 150.0
TARGET_CLI_RUN_S = 2.5
HANDWRITTEN_FIRST_ID = 500_000_000  # the two sides insert disjoint ids into one users table
CLI_FIRST_ID = 900_000_000  # and `batchops run` its own
PY_SPY_RATE = 100
TERMINAL = {"completed", "failed", "cancelled"}


# -- database ------------------------------------------------------------------------------


def query(statement: str, params: Any = None) -> list[dict[str, Any]]:
    conn = psycopg2.connect(DSN)
    conn.autocommit = True
    try:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(statement, params)
            return [dict(r) for r in cur.fetchall()] if cur.description else []
    finally:
        conn.close()


def batch_rows(batch_ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = query("SELECT id, created_at, started_at, finished_at, flow_run_id FROM batches "
                 "WHERE id = ANY(%s)", (batch_ids,))
    return {r["id"]: r for r in rows}


# -- machine load --------------------------------------------------------------------------


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]


class Phase:
    """Wall time, machine CPU busy share, load average, and the CPU seconds of the bench's
    processes over a measured phase (``processes``: name → function giving its pids)."""

    def __init__(self, processes: dict[str, Callable[[], list[int]]] | None = None) -> None:
        self.processes = processes or {}

    def _sample(self) -> dict[str, float]:
        return {name: _cpu_seconds(pids()) for name, pids in self.processes.items()}

    def __enter__(self) -> Phase:
        self.load_before = round(os.getloadavg()[0], 2)
        self.cpu0 = _cpu_times()
        self.proc0 = self._sample()
        self.wall0 = time.perf_counter()
        return self

    def __exit__(self, *_: Any) -> None:
        total, idle = _cpu_times()
        busy = 1 - (idle - self.cpu0[1]) / max(1, total - self.cpu0[0])
        after = self._sample()
        self.result = {"wall_seconds": round(time.perf_counter() - self.wall0, 1),
                       "machine_cpu_busy": round(busy, 3),
                       "loadavg_1m_before": self.load_before,
                       "cpu_seconds": {k: round(after[k] - v, 2) for k, v in self.proc0.items()}}


# -- the workload --------------------------------------------------------------------------


class Workload:
    """``POST /users`` operations with fresh ids, for each side its own id range."""

    def __init__(self) -> None:
        self.next_id = {"batchops": 1, "handwritten": HANDWRITTEN_FIRST_ID,
                        "cli": CLI_FIRST_ID}

    def body(self, side: str, size: int, mode: str) -> bytes:
        first = self.next_id[side]
        self.next_id[side] += size
        ops = [{"id": f"op-{i}", "method": "POST", "path": "/users",
                "body": {"id": first + i, "email": f"{side[0]}{first + i}@bench.example",
                         "name": f"user {first + i}"}} for i in range(size)]
        return json.dumps({"operations": ops, "mode": mode}).encode()


def _all_succeeded(resp: httpx.Response, size: int) -> bool:
    if resp.status_code != 200:
        return False
    body = resp.json()
    return bool(body.get("summary", {}).get("succeeded") == size
                and len(body.get("results", [])) == size)


class ApiBench:
    def __init__(self, urls: dict[str, str], workload: Workload) -> None:
        self.urls = urls
        self.workload = workload
        self.client = httpx.Client(timeout=httpx.Timeout(300.0),
                                   headers={"Content-Type": "application/json"})

    def post_sync(self, side: str, size: int) -> dict[str, Any]:
        """One sync batch; its latency and whether every item succeeded."""
        content = self.workload.body("batchops" if side.startswith("batchops") else side,
                                     size, "sync")
        sent_at = time.time()
        started = time.perf_counter()
        resp = self.client.post(f"{self.urls[side]}/batches", content=content)
        seconds = time.perf_counter() - started
        received_at = time.time()
        ok = _all_succeeded(resp, size)
        sample = {"seconds": seconds, "sent_at": sent_at, "received_at": received_at,
                  "status": resp.status_code, "ok": ok}
        if side.startswith("batchops") and resp.status_code in (200, 202, 207):
            sample["batch_id"] = resp.json().get("batch_id")
        if not ok:
            sample["body"] = resp.text[:500]
        return sample

    def sync_pairs(self, sides: list[str], size: int, requests: int,
                   ) -> dict[str, list[dict[str, Any]]]:
        """``requests`` requests per side, alternating which side goes first."""
        samples: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for i in range(requests):
            for side in (sides if i % 2 == 0 else sides[::-1]):
                samples[side].append(self.post_sync(side, size))
        return samples

    def async_batchops(self, size: int, poll: float, timeout: float = 600.0) -> dict[str, Any]:
        """POST an async batch, poll its status until it is final: the seconds in between."""
        content = self.workload.body("batchops", size, "async")
        base = self.urls["batchops"]
        sent_at = time.time()
        started = time.perf_counter()
        resp = self.client.post(f"{base}/batches", content=content)
        accepted_at = time.time()
        post_seconds = time.perf_counter() - started
        if resp.status_code != 202:
            return {"ok": False, "status": resp.status_code, "body": resp.text[:500],
                    "seconds": float("nan")}
        batch_id = resp.json()["batch_id"]
        polls = 0
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.client.get(f"{base}/batches/{batch_id}/status").json()
            polls += 1
            if status.get("status") in TERMINAL:
                break
            time.sleep(poll)
        seen_at = time.time()
        seconds = time.perf_counter() - started
        ok = status.get("status") == "completed" and status.get("succeeded") == size
        return {"ok": ok, "seconds": seconds, "post_seconds": post_seconds,
                "batch_id": batch_id, "flow_run_id": status.get("flow_run_id"),
                "final_status": status.get("status"), "succeeded": status.get("succeeded"),
                "failed": status.get("failed"), "polls": polls, "sent_at": sent_at,
                "accepted_at": accepted_at, "completed_seen_at": seen_at}

    def async_handwritten(self, size: int) -> dict[str, Any]:
        """The hand-written endpoint runs the same batch to completion (one request)."""
        content = self.workload.body("handwritten", size, "sync")
        started = time.perf_counter()
        resp = self.client.post(f"{self.urls['handwritten']}/batches", content=content)
        return {"ok": _all_succeeded(resp, size), "seconds": time.perf_counter() - started,
                "status": resp.status_code}


def per_request_cpu(phase: dict[str, Any], idle: dict[str, Any], requests: int,
                    ) -> dict[str, float]:
    """CPU ms per request of each process, less what it burns idle (background loops, the
    worker's polling) over the same wall time."""
    out = {}
    for name, seconds in phase["cpu_seconds"].items():
        idle_rate = idle["cpu_seconds"].get(name, 0.0) / max(idle["wall_seconds"], 1e-9)
        net = seconds - idle_rate * phase["wall_seconds"]
        out[name] = round(1000 * max(net, 0.0) / requests, 1)
    return out


def latency_stats(samples: list[dict[str, Any]]) -> dict[str, Any]:
    ms = [1000 * s["seconds"] for s in samples]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 1),
            "p95_ms": round(percentile(ms, 95), 1), "mean_ms": round(statistics.fmean(ms), 1),
            "min_ms": round(min(ms), 1), "max_ms": round(max(ms), 1),
            "all_ok": all(s["ok"] for s in samples),
            "failures": [s for s in samples if not s["ok"]][:3],
            "samples_ms": [round(v, 1) for v in ms]}


# -- py-spy --------------------------------------------------------------------------------


def profile_sync(bench: ApiBench, py_spy: str, pid: int, size: int, requests: int,
                 workdir: Path, flow_source: list[str]) -> dict[str, Any]:
    """``requests`` batchops sync batches of ``size`` while py-spy samples the API process."""
    raw = workdir / f"py-spy-{size}.txt"
    spy_log = (workdir / f"py-spy-{size}.log").open("wb")
    spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--idle", "--threads",
                            "--rate", str(PY_SPY_RATE), "--format", "raw", "--output", str(raw)],
                           stdout=spy_log, stderr=subprocess.STDOUT)
    time.sleep(1.5)  # attached
    samples = [bench.post_sync("batchops", size) for _ in range(requests)]
    time.sleep(0.5)
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
    spy_log.close()
    summary = summarize_flow_profile(raw, flow_source, requests, PY_SPY_RATE)
    summary["latency_p50_ms_while_profiled"] = round(
        percentile([1000 * s["seconds"] for s in samples], 50), 1)
    summary["raw"] = str(raw)  # kept with --keep-work
    return summary


# -- report --------------------------------------------------------------------------------


def target_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue-17 targets this run measured: name, value, limit, pass."""
    checks = []

    def check(name: str, value: float, limit: float, unit: str) -> None:
        checks.append({"target": name, "value": value, "limit": limit, "unit": unit,
                       "pass": value <= limit})

    ten = report["sync"].get("10-item")
    if ten:
        check("10-item sync p50", ten["batchops"]["p50_ms"], TARGET_SYNC10_P50_MS, "ms")
        check("10-item sync p95", ten["batchops"]["p95_ms"], TARGET_SYNC10_P95_MS, "ms")
    a = report.get("async")
    if a:
        check(f"{a['size']:,}-item async POST → completed (median)",
              round(a["batchops"]["median_seconds"], 3), TARGET_ASYNC_S, "s")
    cli = report.get("cli_run")
    if cli:
        check("batchops run, 1-item file, whole process (median)",
              round(cli["median_seconds"], 3), TARGET_CLI_RUN_S, "s")
    return checks


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for case, r in report["sync"].items():
        b, h = r["batchops"], r["handwritten"]
        target = (f"≤ {TARGET_SYNC10_P50_MS:.0f} / ≤ {TARGET_SYNC10_P95_MS:.0f}"
                  if case == "10-item" else "")
        rows.append([f"{case} sync, p50 / p95 (ms, n={b['n']})",
                     f"{b['p50_ms']:.0f} / {b['p95_ms']:.0f}",
                     f"{h['p50_ms']:.0f} / {h['p95_ms']:.0f}",
                     f"{b['p50_ms'] / h['p50_ms']:.1f}x / {b['p95_ms'] / h['p95_ms']:.1f}x",
                     target])
    a = report.get("async")
    if a:
        runs = len(a["batchops"]["runs"])
        b_s, h_s = a["batchops"]["median_seconds"], a["handwritten"]["median_seconds"]
        rows.append([f"{a['size']:,}-item async, POST → completed (s, median of {runs})",
                     f"{b_s:.2f}", f"{h_s:.2f}", f"{b_s / h_s:.1f}x",
                     f"≤ {TARGET_ASYNC_S:.1f}"])
    cli = report.get("cli_run")
    if cli:
        rows.append([f"batchops run, 1-item file, whole process (s, median of {cli['n']})",
                     f"{cli['median_seconds']:.2f}", "—", "—", f"≤ {TARGET_CLI_RUN_S:.1f}"])
    return rows


HEADER = ["case", "batchops", "hand-written", "ratio", "target (issue 17)"]
EXTRA = {key for key, _ in SYNC_EXTRA}


def print_table(report: dict[str, Any]) -> None:
    rows = [HEADER, *table_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    print()
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                        for j, (c, w) in enumerate(zip(row, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for line in report["text"]:
        print(line)
    print()


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for c in report["targets"]:
        lines.append(f"target, {c['target']}: {c['value']:g} {c['unit']} ≤ {c['limit']:g} "
                     f"{c['unit']} → {'PASS' if c['pass'] else 'FAIL'}")
    lines.append(f"targets overall: {'PASS' if report['target_pass'] else 'FAIL'}")
    lines.append("the hand-written endpoint does the rows only: no batch or per-item results "
                 "stored, no idempotency, retries, progress, flow run or artifacts; batchops "
                 "does all of these on every request")
    a = report.get("async")
    if a:
        lines.append(f"async: one batchops worker (limit {WORKER_LIMIT}) polls the work pool "
                     f"every {WORKER_POLL_SECONDS} s (PREFECT_WORKER_QUERY_SECONDS="
                     f"{WORKER_POLL_SECONDS}, PREFECT_WORKER_PREFETCH_SECONDS="
                     "1); status polled every "
                     f"{report['settings']['status_poll_seconds']:g} s")
    if not report["verified"]:
        lines.append("WARNING: some requests did not succeed on every item (see 'failures')")
    busy = [p["machine_cpu_busy"] for name, p in report["phases"].items() if name != "idle"]
    if busy:
        lines.append(f"machine CPU busy during the measured phases: {min(busy):.0%} to "
                     f"{max(busy):.0%} of {os.cpu_count()} CPUs (all processes: API, Prefect "
                     "server, PostgreSQL, worker, client and anything else running)")
    return lines


def _phase_ms(rows: list[dict[str, Any]], *keys: str) -> float:
    return sum(r["median_ms"] or 0.0 for r in rows if r["phase"] in keys)


def analysis_lines(report: dict[str, Any]) -> list[str]:
    """Where the time goes, in sentences built from this run's figures."""
    lines = []
    bd = report.get("breakdown", {})
    for case, r in report["sync"].items():
        rows = bd.get("sync", {}).get(case)
        if not rows:
            continue
        before = _phase_ms(rows, "register", "flow_start")
        lines.append(
            f"{case} sync, batchops p50 {r['batchops']['p50_ms']:.0f} ms vs hand-written "
            f"{r['handwritten']['p50_ms']:.0f} ms. Median phases: HTTP in "
            f"{_phase_ms(rows, 'http_in'):.0f} ms; store the batch + create the flow run + "
            f"Running {before:.0f} ms; load + the chunk task {_phase_ms(rows, 'chunks'):.0f} ms; "
            f"to the batch final in the store {_phase_ms(rows, 'final'):.0f} ms; to the answer "
            f"{_phase_ms(rows, 'after'):.0f} ms. The flow run is Completed "
            f"{_phase_ms(rows, 'flow_end_after_response'):.0f} ms after the answer (artifacts, "
            "Completed state).")
    for name, ph in report["phases"].items():
        cpu = ph.get("cpu_ms_per_request")
        if cpu:
            lines.append(
                f"CPU per request, {name}: batchops API {cpu['batchops API']:.0f} ms + Prefect "
                f"server {cpu['Prefect server']:.0f} ms, against the hand-written API "
                f"{cpu['hand-written API']:.0f} ms (PostgreSQL, the store of both sides and the "
                f"Prefect server's database: {cpu['PostgreSQL (all)']:.0f} ms per pair; the "
                "sync runs execute in the API process, the worker runs the async batches).")
    for case, prof in report.get("profile", {}).items():
        top = prof.get("flow_thread", [])[:6]
        if top:
            lines.append(f"py-spy, {case}: the sync flow thread spends "
                         f"{prof['flow_thread_ms_per_request']:.0f} ms per request; most in "
                         + "; ".join(f"{t['activity']} {t['ms_per_request']:.0f} ms"
                                     for t in top) + ".")
    rows = bd.get("async")
    if rows:
        lines.append(
            "1,000-item async, median phases: "
            + "; ".join(f"{p['phase']} {p['median_ms']:.0f} ms" for p in rows
                        if p["median_ms"] is not None)
            + f" (worker poll interval {WORKER_POLL_SECONDS} s).")
    return lines


def markdown(report: dict[str, Any]) -> str:
    out = [f"# bench.api — {report['timestamp']}", "",
           f"PostgreSQL {report['environment']['postgres']}, Prefect "
           f"{report['environment']['prefect']}, Python {report['environment']['python']}, "
           f"{report['environment']['cpus']} CPUs; code {report['code']['measured']} at "
           f"{report['code']['head'][:10]}"
           f"{' + uncommitted changes' if report['code']['dirty_core_files'] else ''}; "
           "`prefect server start` on PostgreSQL, one batchops worker (limit "
           f"{WORKER_LIMIT}, polling every {WORKER_POLL_SECONDS} s).", "",
           "| " + " | ".join(HEADER) + " |", "|---|---:|---:|---:|---:|"]
    out += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    out += ["", *[f"- {line}" for line in report["text"]]]
    for case, bd in report.get("breakdown", {}).get("sync", {}).items():
        out += ["", f"## Where a {case} sync batch's time goes (median per phase)", "",
                "| phase | median ms | p95 ms |", "|---|---:|---:|"]
        for p in bd:
            label = f"*{p['label']}* (not part of the sum)" if p["phase"] in EXTRA else p["label"]
            out.append(f"| {label} | {p['median_ms']} | {p['p95_ms']} |")
    bd_async = report.get("breakdown", {}).get("async")
    if bd_async:
        out += ["", "## 1,000-item async batch (median per phase)", "",
                "| phase | median ms |", "|---|---:|"]
        out += [f"| {p['label']} | {p['median_ms']} |" for p in bd_async]
    cpu_rows = [(name, ph["cpu_ms_per_request"]) for name, ph in report["phases"].items()
                if "cpu_ms_per_request" in ph]
    if cpu_rows:
        names = list(cpu_rows[0][1])
        out += ["", "## CPU time per measured request pair (one batchops + one hand-written "
                "request)", "", "| case | " + " | ".join(names) + " |",
                "|---|" + "---:|" * len(names)]
        out += [f"| {case} | " + " | ".join(f"{cpu[n]:.0f} ms" for n in names) + " |"
                for case, cpu in cpu_rows]
        idle_phase = report["phases"].get("idle", {})
        idle, wall = idle_phase.get("cpu_seconds", {}), idle_phase.get("wall_seconds", 10.0)
        out += ["", f"Net of each process's idle CPU (measured over {wall:.0f} s before the "
                "cases: " + ", ".join(f"{k} {100 * v / wall:.0f} %" for k, v in idle.items())
                + " of a CPU). PostgreSQL: every postgres process of the machine (both "
                "sides' store, the Prefect server's database, and anything else using it)."]
    for case, prof in report.get("profile", {}).items():
        if "flow_thread" not in prof:
            continue
        out += ["", f"## py-spy, {case} sync batches: the sync flow thread, wall time per request",
                "", f"{prof['requests']} requests at {prof['rate_hz']} Hz; flow thread "
                f"{prof['flow_thread_ms_per_request']} ms per request.", "",
                "| activity | ms / request | share |", "|---|---:|---:|"]
        out += [f"| `{r['activity']}` | {r['ms_per_request']} | {100 * r['share']:.1f} % |"
                for r in prof["flow_thread"][:15]]
    if report.get("analysis"):
        out += ["", "## Reading the figures (generated from this run)", "",
                *[f"- {line}" for line in report["analysis"]]]
    return "\n".join(out) + "\n"


# -- main ----------------------------------------------------------------------------------


def worker_ready(api_url: str, pool: str) -> Callable[[], bool]:
    """True once a worker has sent its heartbeat to the work pool ``pool``."""
    def check() -> bool:
        try:
            resp = httpx.post(f"{api_url}/work_pools/{pool}/workers/filter", json={},
                              timeout=2)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200 and bool(resp.json())
    return check


def cli_run(code_dir: Path, env: dict[str, str], workdir: Path, workload: Workload,
            size: int) -> dict[str, Any]:
    """``python -m cli run FILE`` of a ``size``-item file, as a whole process: its wall time
    (start to exit) and whether it exited 0 (every item succeeded)."""
    ops = json.loads(workload.body("cli", size, "sync"))["operations"]
    path = workdir / "cli-batch.json"
    path.write_text(json.dumps(ops))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cli", "run", str(path)], cwd=code_dir,
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    out: dict[str, Any] = {"seconds": seconds, "exit_code": proc.returncode,
                           "ok": proc.returncode == 0}
    if proc.returncode != 0:
        out["output"] = (proc.stdout + proc.stderr)[-1000:]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=50, help="measured requests per sync case")
    ap.add_argument("--warmup", type=int, default=5, help="unmeasured requests per sync case")
    ap.add_argument("--sizes", default="10,100", help="items per sync batch")
    ap.add_argument("--async-size", type=int, default=1000)
    ap.add_argument("--async-runs", type=int, default=3, help="measured async batches")
    ap.add_argument("--poll", type=float, default=0.05, help="status poll interval (s)")
    ap.add_argument("--code", choices=("worktree", "head"), default="worktree",
                    help="measure a copy of the work tree taken at the start, or the last commit")
    ap.add_argument("--keep-db", action="store_true",
                    help=f"reuse the database {DB_NAME} (default: drop and create it)")
    ap.add_argument("--settle", type=float, default=30.0,
                    help="before each phase wait up to this many seconds for the machine to be "
                         "< 25%% busy")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                    help="py-spy profile of the API process (extra, unmeasured requests)")
    ap.add_argument("--profile-requests", type=int, default=20)
    ap.add_argument("--py-spy", default=shutil.which("py-spy")
                    or str(Path(sys.executable).with_name("py-spy")),
                    help="py-spy (default: on PATH, else beside this Python)")
    ap.add_argument("--cli-runs", type=int, default=5,
                    help="measured `batchops run` processes of a 1-item file (0: none)")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep the work directory (process logs, raw py-spy output)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    RESULTS.mkdir(parents=True, exist_ok=True)

    workdir = Path(tempfile.mkdtemp(prefix="batchops-bench-api-"))
    log(f"work dir {workdir}")
    code = git_state()
    code["measured"] = args.code
    code_dir = snapshot_code(workdir / "code", args.code)
    flow_source = (code_dir / "flows" / "process_batch.py").read_text().splitlines()
    ensure_database(fresh=not args.keep_db, name=DB_NAME)
    server = PrefectServer(workdir / "prefect-server", workdir / "prefect-server.log",
                           database=PREFECT_DB_NAME)
    log(f"starting prefect server on PostgreSQL (database {PREFECT_DB_NAME}) …")
    server.start()
    log(f"prefect server healthy at {server.api_url} after {server.startup_seconds:.1f} s")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "BATCHOPS_"))}
    env.update(PREFECT_API_URL=server.api_url, PREFECT_HOME=str(workdir / "prefect-client"),
               PREFECT_LOCAL_STORAGE_PATH=str(workdir / "prefect-results"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS=str(WORKER_POLL_SECONDS),
               PREFECT_WORKER_PREFETCH_SECONDS="1",
               BATCHOPS_DATABASE_URL=DB_URL, BATCHOPS_CONFIG_FILE="/nonexistent",
               BATCHOPS_DEMO="true",
               BATCHOPS_QUOTA_OPS_PER_MINUTE="0", BENCH_HANDWRITTEN_DSN=DSN)
    procs: list[ManagedProcess] = []
    report: dict[str, Any] = {"phases": {}}
    try:
        api, api_url = uvicorn_app("batchops API", "api.main:create_app", cwd=code_dir, env=env,
                                   log_path=workdir / "api.log")
        procs.append(api)
        api.start(http_ok(f"{api_url}/healthz"))  # its startup creates the demo tables
        log(f"batchops API at {api_url} (pid {api.pid}) after {api.startup_seconds:.1f} s")
        hand, hand_url = uvicorn_app("hand-written API", "bench._handwritten_api:create_app",
                                     cwd=code_dir, env=env, log_path=workdir / "handwritten.log")
        procs.append(hand)
        hand.start(http_ok(f"{hand_url}/healthz"))
        log(f"hand-written API at {hand_url} (pid {hand.pid})")
        deploy_started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cli", "deploy", "--work-pool", WORK_POOL],
                       cwd=code_dir, env=env, check=True, stdout=subprocess.DEVNULL)
        log(f"deployments on the work pool {WORK_POOL!r} after "
            f"{time.perf_counter() - deploy_started:.1f} s")
        serve = worker(WORK_POOL, WORKER_LIMIT, cwd=code_dir, env=env,
                       log_path=workdir / "worker.log")
        procs.append(serve)
        serve.start(worker_ready(server.api_url, WORK_POOL))
        log(f"batchops worker on {WORK_POOL!r} (pid {serve.pid}, limit {WORKER_LIMIT}) after "
            f"{serve.startup_seconds:.1f} s; polls every {WORKER_POLL_SECONDS} s")

        bench = ApiBench({"batchops": api_url, "handwritten": hand_url}, Workload())
        server_pid = server.proc.pid if server.proc else 0
        cpu_of: dict[str, Callable[[], list[int]]] = {
            "batchops API": lambda: [api.pid], "hand-written API": lambda: [hand.pid],
            "Prefect server": lambda: process_tree(server_pid),
            "batchops worker (its flow runs)": lambda: process_tree(serve.pid),
            "PostgreSQL (all)": _postgres_pids,
            "bench client": lambda: [os.getpid()]}
        wait_quiet(args.settle)
        log("idle CPU of the bench's processes over 10 s …")
        with Phase(cpu_of) as idle:
            time.sleep(10)
        report["phases"]["idle"] = idle.result
        sync: dict[str, Any] = {}
        raw_sync: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for size in sizes:
            case = f"{size}-item"
            wait_quiet(args.settle)
            log(f"{case} sync: {args.warmup} warm-up + {args.requests} measured requests per "
                "side …")
            bench.sync_pairs(["batchops", "handwritten"], size, args.warmup)
            with Phase(cpu_of) as phase:
                samples = bench.sync_pairs(["batchops", "handwritten"], size, args.requests)
            phase.result["cpu_ms_per_request"] = per_request_cpu(phase.result, idle.result,
                                                                 args.requests)
            report["phases"][f"sync-{size}"] = phase.result
            raw_sync[case] = samples
            sync[case] = {side: latency_stats(s) for side, s in samples.items()}
            log(f"  batchops p50 {sync[case]['batchops']['p50_ms']:.0f} ms, hand-written p50 "
                f"{sync[case]['handwritten']['p50_ms']:.0f} ms")
        report["sync"] = sync

        log(f"{args.async_size:,}-item async: 1 warm-up + {args.async_runs} measured runs …")
        bench.async_batchops(args.async_size, args.poll)
        bench.async_handwritten(args.async_size)
        b_runs, h_runs = [], []
        with Phase(cpu_of) as phase:
            for _ in range(args.async_runs):
                wait_quiet(args.settle)
                b_runs.append(bench.async_batchops(args.async_size, args.poll))
                h_runs.append(bench.async_handwritten(args.async_size))
                log(f"  batchops {b_runs[-1]['seconds']:.2f} s, hand-written "
                    f"{h_runs[-1]['seconds']:.2f} s")
        report["phases"]["async"] = phase.result
        report["async"] = {
            "size": args.async_size,
            "batchops": {"median_seconds": statistics.median(r["seconds"] for r in b_runs),
                         "all_ok": all(r["ok"] for r in b_runs), "runs": b_runs},
            "handwritten": {"median_seconds": statistics.median(r["seconds"] for r in h_runs),
                            "all_ok": all(r["ok"] for r in h_runs), "runs": h_runs},
        }

        if args.profile and Path(args.py_spy).exists():
            report["profile"] = {}
            for size in sizes:
                wait_quiet(args.settle)
                log(f"py-spy: {args.profile_requests} batchops {size}-item sync requests …")
                report["profile"][f"{size}-item"] = profile_sync(
                    bench, args.py_spy, api.pid, size, args.profile_requests, workdir,
                    flow_source)
        elif args.profile:
            log(f"py-spy not found at {args.py_spy}: no profile")

        if args.cli_runs > 0:
            wait_quiet(args.settle)
            log(f"batchops run of a 1-item file: 1 warm-up + {args.cli_runs} measured "
                "processes …")
            cli_run(code_dir, env, workdir, bench.workload, 1)
            cli_runs = [cli_run(code_dir, env, workdir, bench.workload, 1)
                        for _ in range(args.cli_runs)]
            report["cli_run"] = {
                "n": len(cli_runs),
                "median_seconds": statistics.median(r["seconds"] for r in cli_runs),
                "min_seconds": min(r["seconds"] for r in cli_runs),
                "max_seconds": max(r["seconds"] for r in cli_runs),
                "all_ok": all(r["ok"] for r in cli_runs), "runs": cli_runs}
            log(f"  median {report['cli_run']['median_seconds']:.2f} s")

        log("timelines from the store and the Prefect API …")
        time.sleep(2)  # task-run events reach the Prefect server's tables
        report["breakdown"] = breakdown(server.api_url, raw_sync, b_runs)
        server_memory = server.memory_mb()
    finally:
        for proc in reversed(procs):
            proc.stop()
        log("stopping prefect server")
        server.stop()

    import prefect

    report.update({
        "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "code": code,
        "environment": {"postgres": query("SHOW server_version")[0]["server_version"],
                        "cpus": os.cpu_count(), "python": platform.python_version(),
                        "prefect": prefect.__version__, "prefect_server_memory": server_memory,
                        "prefect_server_startup_seconds": round(server.startup_seconds, 1)},
        "settings": {"requests": args.requests, "warmup": args.warmup,
                     "async_runs": args.async_runs, "status_poll_seconds": args.poll,
                     "cli_runs": args.cli_runs,
                     "prefect_server": f"prefect server start on PostgreSQL, database "
                                       f"{PREFECT_DB_NAME}",
                     "work_pool": WORK_POOL, "worker_limit": WORKER_LIMIT,
                     "worker_query_seconds": WORKER_POLL_SECONDS,
                     "worker_prefetch_seconds": 1,
                     "handwritten_concurrency": 10, "workload": "POST /users, fresh ids",
                     "client": "one httpx client, sequential requests, sides alternating"},
    })
    report["targets"] = target_checks(report)
    report["target_pass"] = all(c["pass"] for c in report["targets"])
    report["verified"] = all(r[side]["all_ok"] for r in report["sync"].values()
                             for side in ("batchops", "handwritten")) \
        and report["async"]["batchops"]["all_ok"] and report["async"]["handwritten"]["all_ok"] \
        and report.get("cli_run", {}).get("all_ok", True)
    report["text"] = summary_lines(report)
    report["analysis"] = analysis_lines(report)
    print_table(report)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(report, indent=2, default=str)
    name = "api"
    (RESULTS / f"{name}-{stamp}.json").write_text(text)
    (RESULTS / f"{name}-latest.json").write_text(text)
    (RESULTS / f"{name}-latest.md").write_text(markdown(report))
    log(f"wrote {RESULTS / f'{name}-{stamp}.json'}, {name}-latest.json/.md")
    if not args.keep_work:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report["verified"] else 2


def breakdown(api_url: str, raw_sync: dict[str, dict[str, list[dict[str, Any]]]],
              async_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median phases of the measured batchops requests (see ``bench._api_analysis``);
    ``raw_sync`` maps a case to its samples per side (every side but ``handwritten``)."""
    samples = {case if side == "batchops" else f"{case} ({side})":
               [s for s in by_side[side] if s.get("batch_id")]
               for case, by_side in raw_sync.items() for side in by_side
               if side != "handwritten"}
    ids = [s["batch_id"] for ss in samples.values() for s in ss] + \
        [r["batch_id"] for r in async_runs if r.get("batch_id")]
    rows = batch_rows(ids)
    flow_runs, task_runs = fetch_prefect_runs(
        api_url, [r["flow_run_id"] for r in rows.values() if r["flow_run_id"]])
    out: dict[str, Any] = {"sync": {}}
    for case, ss in samples.items():
        timelines = []
        for s in ss:
            row = rows.get(s["batch_id"]) or {}
            fr_id = row.get("flow_run_id")
            timelines.append(sync_timeline(s, row, flow_runs.get(fr_id or ""),
                                           task_runs.get(fr_id or "", [])))
        out["sync"][case] = median_phases(timelines, SYNC_PHASES + SYNC_EXTRA)
    timelines = []
    for r in async_runs:
        row = rows.get(r.get("batch_id") or "") or {}
        timelines.append(async_timeline(r, row, flow_runs.get(row.get("flow_run_id") or "")))
    out["async"] = median_phases(timelines, ASYNC_PHASES)
    out["async_runs"] = timelines
    return out


if __name__ == "__main__":
    sys.exit(main())
