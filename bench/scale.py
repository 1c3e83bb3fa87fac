"""Benchmark: the scaled topology with 1 worker and with 2 workers, in one run.

    python -m bench.scale                  # both cases, each with 1, 2, 2, 1 workers
    python -m bench.scale --cases sql      # 20 batches x 1,000 sql items only
    python -m bench.scale --cases io       # 16 batches x 200 http operations only
    python -m bench.scale --batches 4 --items 200 --io-batches 4 --rounds 1   # quick

Starts :class:`deployments.scaled.ScaledSystem` (2 Prefect API servers and the services
process on PostgreSQL with prefect-redis, 2 batchops APIs, a batchops work pool) on databases,
ports and a Redis database of its own, with one worker; a second worker is started (and
stopped) between cases. Each case empties the store's tables, then submits its batches at once
through both APIs (``Prefer: respond-async``, 202) and polls their statuses until all are
final. Two cases:

* **sql** — ``--batches`` async batches of ``--items`` ``POST /users`` operations (unique
  emails), workers at the topology's limit (10 flow runs at once): the CPU is the limit;
* **io** — ``--io-batches`` batches of ``--io-items`` ``POST /crm/contacts`` operations to the
  fault-injecting upstream (``python -m batchops.devtools.upstream``, a process of its own on
  127.0.0.1) answering after ``--io-latency-ms``, each batch at concurrency
  ``--io-concurrency``, each worker started with ``--limit --io-worker-limit``: the upstream's
  latency is the limit, by Little's law ``min(batches, workers * limit) * concurrency /
  latency`` operations a second (4 * 10 / 0.2 s = 200 with 1 worker, 400 with 2). The
  upstream's ``max_concurrency`` (a Prefect global concurrency limit shared by every batch and
  worker) is set to ``io-batches * io-concurrency``, so that limit never binds and the workers'
  is the one measured. The upstream is reset before each case; every operation must reach it
  once (its executed count equals the case's operations).

Each case reports:

* items/s from the first ``POST`` to the last batch's ``finished_at``;
* ``POST /batches`` answer times (validation, registration of the items and the flow run's
  creation through the Prefect API);
* the Prefect server's own flow-run creation latency: a probe thread calls
  ``create_flow_run_from_deployment`` every ``--probe-interval`` s (alternating between the
  two servers) on a deployment of a work pool no worker polls, before the cases (idle) and
  throughout each case;
* CPU seconds used by each part of the system (and the whole machine, and the upstream)
  during the case;
* io: the upstream's executed requests, peak requests in flight and time per request.

Results: a table per case on stdout and ``bench/results/scale-<timestamp>.json``. Everything
started is stopped, and the databases and the Redis database emptied, at the end; the
processes' logs stay in the temporary directory named in the JSON (``topology.logs``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import redis
import sqlalchemy as sa

from bench._api_analysis import percentile
from bench._api_procs import ManagedProcess, http_ok
from bench._batchops_run import _cpu_seconds, _postgres_pids
from bench._prefect_server import free_port, process_tree
from bench.sql_target import git_state, log, wait_quiet
from deployments.scaled import ScaledSystem, ScaledTopology, claim_empty_redis_database

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
FINAL = {"completed", "failed", "cancelled"}
PROBE_POOL = "bench-scale-probe"  # no worker polls it: probe runs stay Scheduled
CASES = ("sql", "io")
MAX_WORKERS = 2
UPSTREAM = "crm"  # the io case's upstream, under the prefix /crm
IO_TARGET = 1.7  # 2 workers / 1 worker, items/s (issue 17)
SQL_TARGET = 2000  # items/s with 1 worker (issue 17)


def _empty_redis_database() -> int:
    db = claim_empty_redis_database("bench-scale")
    if db is None:
        raise RuntimeError("no empty Redis database left (2-15)")
    return db


def _machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores, from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def _redis_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "redis-server":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


class CpuSample:
    """CPU seconds per part of the system: each child process tree (a worker's includes its
    flow-run processes), PostgreSQL and Redis (all of the machine's), the upstream of the io
    case (not part of the system: it stands for someone else's API), and the machine."""

    PARTS = ("prefect-api", "prefect-services", "worker", "api", "postgres", "redis")

    def __init__(self, system: ScaledSystem, upstream_pid: int | None = None) -> None:
        self.parts: dict[str, float] = dict.fromkeys(self.PARTS, 0.0)
        for child in system.processes.children:
            if child.running:
                part = next(p for p in self.PARTS if child.name.startswith(p))
                self.parts[part] += _cpu_seconds(process_tree(child.proc.pid))
        self.parts["postgres"] = _cpu_seconds(_postgres_pids())
        self.parts["redis"] = _cpu_seconds(_redis_pids())
        self.upstream = _cpu_seconds(process_tree(upstream_pid)) if upstream_pid else 0.0
        self.machine = _machine_busy_seconds()
        self.at = time.monotonic()

    def since(self, before: CpuSample) -> dict[str, float]:
        out = {p: round(self.parts[p] - before.parts[p], 1) for p in self.PARTS}
        out["upstream"] = round(self.upstream - before.upstream, 1)
        out["machine"] = round(self.machine - before.machine, 1)
        # the machine's CPU not used by the parts above: other work sharing the machine
        out["other"] = round(out["machine"] - sum(out[p] for p in self.PARTS)
                             - out["upstream"], 1)
        out["wall"] = round(self.at - before.at, 1)
        return out


class FlowRunProbe:
    """Times ``create_flow_run_from_deployment`` on the Prefect API servers, in a thread."""

    def __init__(self, api_urls: list[str], interval: float) -> None:
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.actions import WorkPoolCreate

        self.interval = interval
        self.clients = [SyncPrefectClient(url) for url in api_urls]
        for client in self.clients:
            client.__enter__()
        first = self.clients[0]
        first.create_work_pool(WorkPoolCreate(name=PROBE_POOL, type="process"),
                               overwrite=True)
        flow_id = first.create_flow_from_name("bench-scale-probe")
        self.deployment_id = first.create_deployment(flow_id, "probe",
                                                     work_pool_name=PROBE_POOL)
        self.samples: list[tuple[float, float, int]] = []  # (time.time() at start, s, server)
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flow-run-probe", daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            server = n % len(self.clients)
            started, t0 = time.time(), time.perf_counter()
            try:
                self.clients[server].create_flow_run_from_deployment(
                    self.deployment_id, name=f"probe-{n}")
                self.samples.append((started, time.perf_counter() - t0, server))
            except Exception:  # a failed call is counted, not timed
                self.errors += 1
            n += 1
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        for client in self.clients:
            client.__exit__(None, None, None)

    def between(self, start: float, end: float) -> list[float]:
        return [s for t, s, _ in self.samples if start <= t <= end]


def latency(values: list[float]) -> dict[str, Any]:
    return {"n": len(values),
            "p50_ms": round(1000 * percentile(values, 50), 1) if values else None,
            "p95_ms": round(1000 * percentile(values, 95), 1) if values else None,
            "max_ms": round(1000 * max(values), 1) if values else None}


def _truncate_store(url: str) -> None:
    """Empty the store's tables (a fresh store for every case; the schema stays)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        names = [r[0] for r in conn.exec_driver_sql(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename <> 'alembic_version'")]
        conn.exec_driver_sql(f"TRUNCATE {', '.join(names)} RESTART IDENTITY CASCADE")
    engine.dispose()


def _worker_limit(system: ScaledSystem, index: int) -> int | None:
    """The ``--limit`` of worker ``index`` if it runs, else ``None``."""
    for child in system.processes.children:
        if child.name == f"worker-{index}" and child.running:
            return int(child.argv[child.argv.index("--limit") + 1])
    return None


def _set_workers(system: ScaledSystem, workers: int, limit: int) -> None:
    """Workers 1..``workers`` running, each at most ``limit`` flow runs at once (a worker
    started with another limit is started again); the others stopped."""
    for index in range(1, MAX_WORKERS + 1):
        running = _worker_limit(system, index)
        if running is not None and (index > workers or running != limit):
            system.processes.get(f"worker-{index}").stop(timeout=60)
            running = None
        if index <= workers and running is None:
            system.start_worker(index, limit)


def _sql_bodies(tag: str, batches: int, items: int) -> list[bytes]:
    return [json.dumps({"operations": [
        {"method": "POST", "path": "/users",
         "body": {"email": f"{tag}-{b}-{i}@example.com", "name": f"User {b}-{i}"}}
        for i in range(items)]}).encode() for b in range(batches)]


def _io_bodies(tag: str, batches: int, items: int, concurrency: int) -> list[bytes]:
    return [json.dumps({"concurrency": concurrency, "operations": [
        {"method": "POST", "path": "/crm/contacts",
         "body": {"name": f"Contact {tag}-{b}-{i}"}}
        for i in range(items)]}).encode() for b in range(batches)]


def _post(client: httpx.Client, url: str, body: bytes) -> tuple[str, float, float]:
    """The batch id, the answer's time, and when it came (``time.time()``)."""
    t0 = time.perf_counter()
    answer = client.post(f"{url}/batches", content=body, headers={
        "Content-Type": "application/json", "Prefer": "respond-async"})
    elapsed = time.perf_counter() - t0
    if answer.status_code != 202:
        raise RuntimeError(f"POST /batches answered {answer.status_code}: {answer.text[:300]}")
    return str(answer.json()["batch_id"]), elapsed, time.time()


def _poll(client: httpx.Client, urls: list[str], batch_ids: list[str],
          timeout: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    statuses: dict[str, dict[str, Any]] = {}
    n = 0
    while True:
        for batch_id in batch_ids:
            if statuses.get(batch_id, {}).get("status") not in FINAL:
                n += 1
                try:
                    answer = client.get(f"{urls[n % len(urls)]}/batches/{batch_id}/status")
                except httpx.HTTPError:
                    continue
                if answer.status_code == 200:
                    statuses[batch_id] = answer.json()
        if len(statuses) == len(batch_ids) and all(
                s["status"] in FINAL for s in statuses.values()):
            return statuses
        if time.monotonic() > deadline:
            raise RuntimeError(f"batches not final after {timeout:.0f} s: "
                               f"{ {b: s.get('status') for b, s in statuses.items()} }")
        time.sleep(0.5)


def _flow_runs(api_url: str, batch_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each batch's flow run: the worker that ran it and when it first entered each state
    (``time.time()``; ``Scheduled`` is its creation)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    out: dict[str, dict[str, Any]] = {}
    with SyncPrefectClient(api_url) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[f"batch-{b}" for b in batch_ids])), limit=200)
        for run in runs:
            states: dict[str, float] = {}
            for state in sorted(client.read_flow_run_states(run.id), key=lambda x: x.timestamp):
                states.setdefault(str(state.name), state.timestamp.timestamp())
            out[run.name.removeprefix("batch-")] = {
                "worker": str(run.labels.get("prefect.worker.name")), "states": states}
    return out


def _runs_per_worker(runs: dict[str, dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in runs.values():
        counts[run["worker"]] = counts.get(run["worker"], 0) + 1
    return dict(sorted(counts.items()))


class Upstream:
    """The io case's fault-injecting upstream, a process of its own on 127.0.0.1."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.reset_at = 0.0
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_", "BATCHOPS_"))}
        self.process = ManagedProcess(
            "upstream", [sys.executable, "-m", "batchops.devtools.upstream",
                         "--port", str(self.port)],
            cwd=REPO, env=env, log_path=workdir / "upstream.log")

    def start(self) -> None:
        self.process.start(http_ok(f"{self.url}/_upstream/stats"))

    def stop(self) -> None:
        self.process.stop()

    @property
    def pid(self) -> int:
        return self.process.pid

    def reset(self, latency_ms: float) -> None:
        """Forget every request and answer each one after ``latency_ms``, without faults.
        The upstream times its requests from the reset (``reset_at``, ``time.time()``)."""
        before = time.time()
        httpx.post(f"{self.url}/_upstream/reset", json={"latency_ms": latency_ms},
                   timeout=10).raise_for_status()
        self.reset_at = (before + time.time()) / 2

    def requests(self) -> list[dict[str, Any]]:
        """Every request since the reset: its key, when it came (``time.time()``) and how
        long it took to answer."""
        records = httpx.get(f"{self.url}/_upstream/requests", timeout=60).json()
        return [{"key": r["key"], "at": self.reset_at + r["at"], "seconds": r["seconds"]}
                for r in records]

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.url}/_upstream/stats", timeout=60).json()
        return {"requests": stats["requests"], "by_outcome": stats["by_outcome"],
                "executed_keys": stats["executed_keys"],
                "executed_more_than_once": len(stats["executed_more_than_once"]),
                "peak_in_flight": stats["peak_in_flight"],
                "peak_accepted_per_second": stats["peak_accepted_per_second"],
                "first_to_last_request_s": round(stats["last_at"] - stats["first_at"], 2),
                "latency_ms": stats["latency_ms"]}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def timeline(began: float, posted: list[tuple[str, float, float]],
             statuses: dict[str, dict[str, Any]], runs: dict[str, dict[str, Any]],
             requests: list[dict[str, Any]], slots: int, seconds: float) -> dict[str, Any]:
    """Where an io case's time goes, batch by batch, from the first ``POST`` (``began``).

    Per batch (seconds since ``began``): its ``POST`` answered, its flow run ``Pending`` (a
    worker took it), ``Running``, the batch started in the store, its first request at the
    upstream, its last request answered, the batch finished in the store, the run
    ``Completed``. Means of the phases between them, and of the *handoff*: from a run's
    ``Completed`` to the next run its worker takes (a flow-run slot free, no batch in it). And
    how busy the workers' ``slots`` (workers x limit) were with a started batch over the
    case's ``seconds``."""
    by_batch: dict[str, list[dict[str, Any]]] = {}
    for r in requests:
        by_batch.setdefault(str(r["key"]).split(":", 1)[0], []).append(r)
    rows = []
    for batch_id, _, answered in posted:
        s, run = statuses[batch_id], runs.get(batch_id, {"worker": None, "states": {}})
        sent = by_batch.get(batch_id, [])
        marks = {
            "answered": answered, "pending": run["states"].get("Pending"),
            "running": run["states"].get("Running"),
            "started": datetime.fromisoformat(s["started_at"]).timestamp(),
            "first_request": min((r["at"] for r in sent), default=None),
            "last_answer": max((r["at"] + r["seconds"] for r in sent), default=None),
            "finished": datetime.fromisoformat(s["finished_at"]).timestamp(),
            "completed": run["states"].get("Completed")}
        rows.append({"batch_id": batch_id, "worker": run["worker"], **{
            k: None if v is None else round(v - began, 3) for k, v in marks.items()}})

    def phase(a: str, b: str) -> float | None:
        return _mean([r[b] - r[a] for r in rows if r[a] is not None and r[b] is not None])

    handoffs = []
    for row in rows:
        if row["pending"] is None:
            continue
        freed = [o["completed"] for o in rows if o["worker"] == row["worker"]
                 and o["completed"] is not None and o["completed"] <= row["pending"]]
        if freed:  # a slot of this worker came free before it took this run
            handoffs.append(row["pending"] - max(freed))
    busy = sum(r["finished"] - r["started"] for r in rows)
    return {
        "post_to_pending_s": phase("answered", "pending"),
        "pending_to_running_s": phase("pending", "running"),
        "running_to_started_s": phase("running", "started"),
        "started_to_first_request_s": phase("started", "first_request"),
        "requests_s": phase("first_request", "last_answer"),
        "last_answer_to_finished_s": phase("last_answer", "finished"),
        "finished_to_completed_s": phase("finished", "completed"),
        "handoff_s": _mean(handoffs), "handoffs": len(handoffs), "slots": slots,
        "slots_busy": round(busy / (slots * seconds), 3) if seconds else None,
        "batches": sorted(rows, key=lambda r: r["answered"])}


def little_limit(args: argparse.Namespace, workers: int) -> float:
    """The io case's operations a second by Little's law: requests in flight / latency."""
    runs = min(args.io_batches, workers * args.io_worker_limit)
    return runs * args.io_concurrency / (args.io_latency_ms / 1000)


def run_case(system: ScaledSystem, probe: FlowRunProbe, kind: str, workers: int,
             args: argparse.Namespace, upstream: Upstream | None) -> dict[str, Any]:
    t = system.topology
    tag = uuid.uuid4().hex[:8]
    if kind == "sql":
        batches, items, limit = args.batches, args.items, t.worker_limit
        bodies = _sql_bodies(tag, batches, items)
    else:
        assert upstream is not None
        batches, items, limit = args.io_batches, args.io_items, args.io_worker_limit
        bodies = _io_bodies(tag, batches, items, args.io_concurrency)
    _set_workers(system, workers, limit)
    _truncate_store(t.store_url)
    if upstream is not None:
        upstream.reset(args.io_latency_ms)
    time.sleep(5)  # workers polling (every 2 s) before the first batch arrives
    wait_quiet(args.quiet_wait)
    log(f"case {kind}: {workers} worker(s) of at most {limit} flow runs, {batches} x {items} "
        "items")
    upstream_pid = upstream.pid if upstream is not None else None
    cpu_before = CpuSample(system, upstream_pid)
    with httpx.Client(timeout=120) as client:
        started = time.time()
        with ThreadPoolExecutor(batches) as pool:
            posted = list(pool.map(lambda i: _post(client, t.api_urls[i % len(t.api_urls)],
                                                   bodies[i]), range(batches)))
        batch_ids = [b for b, _, _ in posted]
        statuses = _poll(client, t.api_urls, batch_ids, args.timeout)
    cpu = CpuSample(system, upstream_pid).since(cpu_before)
    runs = _flow_runs(t.prefect_api_urls[0], batch_ids)
    finished = max(datetime.fromisoformat(s["finished_at"]).timestamp()
                   for s in statuses.values())
    seconds = finished - started
    case: dict[str, Any] = {
        "case": kind, "workers": workers, "worker_limit": limit, "batches": batches,
        "items": batches * items,
        "statuses": sorted({s["status"] for s in statuses.values()}),
        "succeeded": sum(int(s["succeeded"]) for s in statuses.values()),
        "seconds": round(seconds, 2), "items_per_s": round(batches * items / seconds, 1),
        "post_batches": latency([s for _, s, _ in posted]),
        "flow_run_creation": latency(probe.between(started, finished)),
        "flow_runs_per_worker": _runs_per_worker(runs),
        "cpu_seconds": cpu,
    }
    if kind == "sql":
        engine = sa.create_engine(t.store_url, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            case["rows_created"] = conn.execute(
                sa.text("SELECT count(*) FROM users WHERE email LIKE :p"),
                {"p": f"{tag}-%"}).scalar_one()
        engine.dispose()
        extra = ""
    else:
        assert upstream is not None
        case["concurrency"] = args.io_concurrency
        case["latency_ms"] = args.io_latency_ms
        case["little_limit_ops_per_s"] = little_limit(args, workers)
        case["upstream"] = up = upstream.stats()
        case["timeline"] = timeline(started, posted, statuses, runs, upstream.requests(),
                                    workers * args.io_worker_limit, seconds)
        tl = case["timeline"]
        extra = (f", upstream executed {up['executed_keys']}, peak {up['peak_in_flight']} in "
                 f"flight (Little's law {case['little_limit_ops_per_s']:.0f} ops/s); "
                 + ", ".join(f"{k} {v}" for k, v in tl.items() if k != "batches"))
    log(f"  {case['items_per_s']} items/s ({seconds:.1f} s), {case['succeeded']} succeeded, "
        f"POST p95 {case['post_batches']['p95_ms']} ms, flow-run creation p95 "
        f"{case['flow_run_creation']['p95_ms']} ms, runs per worker "
        f"{case['flow_runs_per_worker']}{extra}")
    return case


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f}" if isinstance(value, float) else str(value)


def system_cpu(case: dict[str, Any]) -> float:
    """CPU seconds used by the system under test (every part but the machine's other work)."""
    return float(sum(case["cpu_seconds"][p] for p in CpuSample.PARTS))


def _cases(report: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    # a case without a kind is of a report from before the io case: sql
    return [c for c in report["cases"] if c.get("case", "sql") == kind]


def _mean_by_workers(cases: list[dict[str, Any]],
                     value: Callable[[dict[str, Any]], float]) -> dict[int, float]:
    out = {}
    for workers in (1, 2):
        values = [value(c) for c in cases if c["workers"] == workers]
        out[workers] = sum(values) / len(values)
    return out


def ratios(cases: list[dict[str, Any]]) -> dict[str, float]:
    """2-worker / 1-worker: items/s, and items per CPU second of the system."""
    rate = _mean_by_workers(cases, lambda c: c["items_per_s"])
    per_cpu = _mean_by_workers(cases, lambda c: c["items"] / system_cpu(c))
    return {"items_per_s": round(rate[2] / rate[1], 3),
            "items_per_system_cpu_s": round(per_cpu[2] / per_cpu[1], 3),
            "items_per_s_1_worker": round(rate[1], 1), "items_per_s_2_workers": round(rate[2], 1)}


def verdicts(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 17's targets for bench.scale, for the cases that ran."""
    out = []
    sql = _cases(report, "sql")
    if sql:
        rate = ratios(sql)["items_per_s_1_worker"]
        out.append({"target": f"sql: 1 worker ≥ {SQL_TARGET:,} items/s", "value": rate,
                    "verdict": "PASS" if rate >= SQL_TARGET else "FAIL"})
    io = _cases(report, "io")
    if io:
        ratio = ratios(io)["items_per_s"]
        everything = all(c["statuses"] == ["completed"] and c["succeeded"] == c["items"]
                         and c["upstream"]["executed_keys"] == c["items"]
                         and c["upstream"]["executed_more_than_once"] == 0 for c in io)
        out.append({"target": f"io: 2 workers ≥ {IO_TARGET} times 1 worker (items/s), every "
                              "operation succeeded and executed once upstream",
                    "value": f"{ratio:.2f}, {'all' if everything else 'NOT all'} succeeded",
                    "verdict": "PASS" if ratio >= IO_TARGET and everything else "FAIL"})
    return out


def _cpu_cells(c: dict[str, Any], cores: int) -> str:
    cpu = c["cpu_seconds"]
    used = system_cpu(c)
    return (f"| {100 * cpu['machine'] / (cpu['wall'] * cores):.0f} % "
            f"| {used:.0f} / {cpu['other']:.0f} | {used / cpu['wall']:.2f} of {cores} "
            f"| {c['items'] / used:.0f} "
            f"| {cpu['worker']:.0f} / {cpu['prefect-api'] + cpu['prefect-services']:.0f} / "
            f"{cpu['api']:.0f} / {cpu['postgres']:.0f} |")


def sql_table(report: dict[str, Any]) -> list[str]:
    """The sql cases as a markdown table (one line per case, then the ratios)."""
    cores = report["machine"]["cpus"]
    lines = ["| workers | items | seconds | items/s | POST /batches p50 / p95 ms | "
             "flow-run creation p50 / p95 ms (n) | machine busy | CPU s: system / other work "
             "| cores the system got | items per system CPU s | CPU s: flow runs+workers / "
             "Prefect APIs+services / batchops APIs / PostgreSQL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    idle = report["idle_flow_run_creation"]
    lines.append(f"| idle | - | - | - | - | {_fmt(idle['p50_ms'])} / {_fmt(idle['p95_ms'])} "
                 f"({idle['n']}) | - | - | - | - | - |")
    cases = _cases(report, "sql")
    for c in cases:
        post, fr = c["post_batches"], c["flow_run_creation"]
        lines.append(
            f"| {c['workers']} | {c['items']:,} | {c['seconds']:.1f} | {c['items_per_s']:,.0f} "
            f"| {_fmt(post['p50_ms'])} / {_fmt(post['p95_ms'])} "
            f"| {_fmt(fr['p50_ms'])} / {_fmt(fr['p95_ms'])} ({fr['n']}) "
            + _cpu_cells(c, cores))
    r = ratios(cases)
    lines.append("")
    lines.append(f"2-worker / 1-worker: items/s **{r['items_per_s']:.2f}**, items per CPU second "
                 f"of the system **{r['items_per_system_cpu_s']:.2f}**")
    return lines


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _sum(values: dict[str, Any], *keys: str) -> float | None:
    parts = [values[k] for k in keys]
    return None if any(p is None for p in parts) else float(sum(parts))


def io_table(report: dict[str, Any]) -> list[str]:
    """The io cases as a markdown table (one line per case, then the ratios)."""
    cores = report["machine"]["cpus"]
    lines = ["| workers | operations | seconds | ops/s | Little's law ops/s | upstream executed "
             "| upstream peak in flight | upstream ms/request p50 / p95 | per run s: handoff / "
             "Pending→first request / requests / last answer→Completed | flow-run slots busy "
             "| POST /batches p50 / "
             "p95 ms | flow-run creation p50 / p95 ms (n) | machine busy | CPU s: system / "
             "other work | cores the system got | ops per system CPU s | CPU s: flow "
             "runs+workers / Prefect APIs+services / batchops APIs / PostgreSQL |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cases = _cases(report, "io")
    for c in cases:
        post, fr, up = c["post_batches"], c["flow_run_creation"], c["upstream"]
        lat, tl = up["latency_ms"] or {}, c["timeline"]
        start = _sum(tl, "pending_to_running_s", "running_to_started_s",
                     "started_to_first_request_s")
        end = _sum(tl, "last_answer_to_finished_s", "finished_to_completed_s")
        lines.append(
            f"| {c['workers']} | {c['items']:,} | {c['seconds']:.1f} | {c['items_per_s']:,.0f} "
            f"| {c['little_limit_ops_per_s']:,.0f} | {up['executed_keys']:,} "
            f"| {up['peak_in_flight']} | {_fmt(lat.get('p50'))} / {_fmt(lat.get('p95'))} "
            f"| {_s(tl['handoff_s'])} / {_s(start)} / {_s(tl['requests_s'])} / {_s(end)} "
            f"| {100 * tl['slots_busy']:.0f} % of {tl['slots']} "
            f"| {_fmt(post['p50_ms'])} / {_fmt(post['p95_ms'])} "
            f"| {_fmt(fr['p50_ms'])} / {_fmt(fr['p95_ms'])} ({fr['n']}) "
            + _cpu_cells(c, cores))
    r = ratios(cases)
    lines.append("")
    lines.append(f"2-worker / 1-worker: ops/s **{r['items_per_s']:.2f}**, ops per CPU second "
                 f"of the system **{r['items_per_system_cpu_s']:.2f}**")
    return lines


def table(report: dict[str, Any]) -> list[str]:
    """The report as markdown: a table per case that ran, then the targets."""
    lines: list[str] = []
    if _cases(report, "sql"):
        lines += ["### sql", "", *sql_table(report), ""]
    if _cases(report, "io"):
        lines += ["### io", "", *io_table(report), ""]
    lines += [f"{v['verdict']}: {v['target']} ({v['value']})" for v in verdicts(report)]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--batches", type=int, default=20, help="sql: batches")
    parser.add_argument("--items", type=int, default=1000, help="sql: items per batch")
    parser.add_argument("--io-batches", type=int, default=16)
    parser.add_argument("--io-items", type=int, default=200, help="io: operations per batch")
    parser.add_argument("--io-latency-ms", type=float, default=200,
                        help="io: the upstream answers after this long")
    parser.add_argument("--io-concurrency", type=int, default=10,
                        help="io: requests in flight per batch")
    parser.add_argument("--io-worker-limit", type=int, default=4,
                        help="io: flow runs at once per worker (its --limit)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="1: 1 then 2 workers; 2: 1, 2, 2, 1 (drift cancels out); …")
    parser.add_argument("--probe-interval", type=float, default=0.25)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--quiet-wait", type=float, default=30,
                        help="wait up to this long for the machine to settle before a case")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.cases.split(",") if k.strip()]
    if not kinds or set(kinds) - set(CASES):
        parser.error(f"--cases: comma-separated, of {', '.join(CASES)}")

    tag = uuid.uuid4().hex[:8]
    redis_db = _empty_redis_database()
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    upstream = Upstream(workdir / "logs") if "io" in kinds else None
    extra_env = {"BATCHOPS_QUOTA_OPS_PER_MINUTE": "0"}
    if upstream is not None:
        # The global limit of the upstream's requests in flight: room for every batch's.
        extra_env["BATCHOPS_UPSTREAMS"] = json.dumps({UPSTREAM: {
            "prefix": f"/{UPSTREAM}", "base_url": upstream.url,
            "max_concurrency": args.io_batches * args.io_concurrency}})
    topology = ScaledTopology(
        prefect_ports=(free_port(), free_port()), api_ports=(free_port(), free_port()),
        workers=1, prefect_database=f"batchops_prefect_bench_{tag}",
        store_database=f"batchops_bench_scale_{tag}",
        redis_url=f"redis://127.0.0.1:6379/{redis_db}", data_dir=workdir, extra_env=extra_env)
    system = ScaledSystem(topology)
    probe: FlowRunProbe | None = None
    import prefect

    report: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(), "git": git_state(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "prefect": prefect.__version__, "load_avg_at_start": os.getloadavg()},
        "args": vars(args), "topology": {
            "prefect_api_servers": len(topology.prefect_ports), "batchops_apis":
            len(topology.api_ports), "worker_limit": topology.worker_limit,
            "redis_db": redis_db, "logs": str(workdir / "logs"),
            "upstreams": json.loads(extra_env.get("BATCHOPS_UPSTREAMS", "{}"))},
        "cases": []}
    try:
        if upstream is not None:
            upstream.start()
        log(f"starting the scaled system (logs {workdir / 'logs'}) …")
        t0 = time.perf_counter()
        system.start()
        report["startup_seconds"] = round(time.perf_counter() - t0, 1)
        probe = FlowRunProbe(topology.prefect_api_urls, args.probe_interval)
        probe.start()
        wait_quiet(args.quiet_wait)
        idle_from = time.time()
        time.sleep(10)
        report["idle_flow_run_creation"] = latency(probe.between(idle_from, time.time()))
        order: list[int] = []
        for r in range(args.rounds):
            order += [1, 2] if r % 2 == 0 else [2, 1]
        for kind in kinds:
            for workers in order:
                report["cases"].append(run_case(system, probe, kind, workers, args, upstream))
        report["probe_errors"] = probe.errors
        report["ratio_2_over_1"] = {kind: ratios(_cases(report, kind)) for kind in kinds}
        report["targets"] = verdicts(report)
    finally:
        if probe is not None:
            probe.stop()
        system.stop()
        if upstream is not None:
            upstream.stop()
        redis.Redis(db=redis_db).flushdb()
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for name in (topology.prefect_database, topology.store_database):
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    report["finished_at"] = datetime.now(UTC).isoformat()
    lines = table(report)
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"scale-{stamp}.json"
    path.write_text(json.dumps({**report, "table_md": lines}, indent=2, default=str))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
