"""Benchmark: the scaled topology with 1 worker and with 2 workers, in one run.

    python -m bench.scale               # 20 batches x 1,000 items; 1, 2, 2, 1 workers
    python -m bench.scale --rounds 1    # 1 then 2 workers
    python -m bench.scale --batches 4 --items 200 --rounds 1   # quick

Starts :class:`deployments.scaled.ScaledSystem` (2 Prefect API servers and the services
process on PostgreSQL with prefect-redis, 2 batchops APIs, a batchops work pool) on databases,
ports and a Redis database of its own, with one worker; a second worker is started (and
stopped) between cases. Each case empties the store's tables, then submits ``--batches``
async batches of ``--items`` ``POST /users`` operations (unique emails) at once through both
APIs (``Prefer: respond-async``, 202), polls their statuses until all are final, and reports:

* items/s from the first ``POST`` to the last batch's ``finished_at``;
* ``POST /batches`` answer times (validation, registration of 1,000 items and the flow run's
  creation through the Prefect API);
* the Prefect server's own flow-run creation latency: a probe thread calls
  ``create_flow_run_from_deployment`` every ``--probe-interval`` s (alternating between the
  two servers) on a deployment of a work pool no worker polls, before the cases (idle) and
  throughout each case;
* CPU seconds used by each part of the system (and the whole machine) during the case.

Results: a table on stdout and ``bench/results/scale-<timestamp>.json``. Everything started is
stopped, and the databases and the Redis database emptied, at the end; the processes' logs stay
in the temporary directory named in the JSON (``topology.logs``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import redis
import sqlalchemy as sa

from bench._api_analysis import percentile
from bench._batchops_run import _cpu_seconds, _postgres_pids
from bench._prefect_server import free_port, process_tree
from bench.sql_target import git_state, log, wait_quiet
from deployments.scaled import ScaledSystem, ScaledTopology, claim_empty_redis_database

RESULTS = Path(__file__).resolve().parent / "results"
PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
FINAL = {"completed", "failed", "cancelled"}
PROBE_POOL = "bench-scale-probe"  # no worker polls it: probe runs stay Scheduled


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
    flow-run processes), PostgreSQL and Redis (all of the machine's), and the machine."""

    PARTS = ("prefect-api", "prefect-services", "worker", "api", "postgres", "redis")

    def __init__(self, system: ScaledSystem) -> None:
        self.parts: dict[str, float] = dict.fromkeys(self.PARTS, 0.0)
        for child in system.processes.children:
            if child.running:
                part = next(p for p in self.PARTS if child.name.startswith(p))
                self.parts[part] += _cpu_seconds(process_tree(child.proc.pid))
        self.parts["postgres"] = _cpu_seconds(_postgres_pids())
        self.parts["redis"] = _cpu_seconds(_redis_pids())
        self.machine = _machine_busy_seconds()
        self.at = time.monotonic()

    def since(self, before: CpuSample) -> dict[str, float]:
        out = {p: round(self.parts[p] - before.parts[p], 1) for p in self.PARTS}
        out["machine"] = round(self.machine - before.machine, 1)
        # the machine's CPU not used by the parts above: other work sharing the machine
        out["other"] = round(out["machine"] - sum(out[p] for p in self.PARTS), 1)
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


def _set_workers(system: ScaledSystem, workers: int) -> None:
    """Start or stop workers 2..n so that ``workers`` run (worker-1 always runs)."""
    for index in range(2, system.topology.workers + 2):
        running = [c for c in system.processes.children
                   if c.name == f"worker-{index}" and c.running]
        if index <= workers and not running:
            system.start_worker(index)
        elif index > workers:
            for child in running:
                child.stop(timeout=60)


def _batch_bodies(tag: str, batches: int, items: int) -> list[bytes]:
    return [json.dumps({"operations": [
        {"method": "POST", "path": "/users",
         "body": {"email": f"{tag}-{b}-{i}@example.com", "name": f"User {b}-{i}"}}
        for i in range(items)]}).encode() for b in range(batches)]


def _post(client: httpx.Client, url: str, body: bytes) -> tuple[str, float]:
    t0 = time.perf_counter()
    answer = client.post(f"{url}/batches", content=body, headers={
        "Content-Type": "application/json", "Prefer": "respond-async"})
    elapsed = time.perf_counter() - t0
    if answer.status_code != 202:
        raise RuntimeError(f"POST /batches answered {answer.status_code}: {answer.text[:300]}")
    return str(answer.json()["batch_id"]), elapsed


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


def _worker_names(api_url: str, batch_ids: list[str]) -> dict[str, int]:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with SyncPrefectClient(api_url) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[f"batch-{b}" for b in batch_ids])), limit=200)
    counts: dict[str, int] = {}
    for run in runs:
        name = str(run.labels.get("prefect.worker.name"))
        counts[name] = counts.get(name, 0) + 1
    return counts


def run_case(system: ScaledSystem, probe: FlowRunProbe, workers: int, batches: int,
             items: int, timeout: float, quiet_wait: float) -> dict[str, Any]:
    t = system.topology
    _set_workers(system, workers)
    _truncate_store(t.store_url)
    tag = uuid.uuid4().hex[:8]
    bodies = _batch_bodies(tag, batches, items)
    time.sleep(5)  # workers polling (every 2 s) before the first batch arrives
    wait_quiet(quiet_wait)
    log(f"case: {workers} worker(s), {batches} x {items} items")
    cpu_before = CpuSample(system)
    with httpx.Client(timeout=120) as client:
        started = time.time()
        with ThreadPoolExecutor(batches) as pool:
            posted = list(pool.map(lambda i: _post(client, t.api_urls[i % len(t.api_urls)],
                                                   bodies[i]), range(batches)))
        batch_ids = [b for b, _ in posted]
        statuses = _poll(client, t.api_urls, batch_ids, timeout)
    cpu = CpuSample(system).since(cpu_before)
    finished = max(datetime.fromisoformat(s["finished_at"]).timestamp()
                   for s in statuses.values())
    seconds = finished - started
    succeeded = sum(int(s["succeeded"]) for s in statuses.values())
    engine = sa.create_engine(t.store_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*) FROM users WHERE email LIKE :p"),
                            {"p": f"{tag}-%"}).scalar_one()
    engine.dispose()
    case = {
        "workers": workers, "batches": batches, "items": batches * items,
        "statuses": sorted({s["status"] for s in statuses.values()}),
        "succeeded": succeeded, "rows_created": rows,
        "seconds": round(seconds, 2), "items_per_s": round(batches * items / seconds, 1),
        "post_batches": latency([s for _, s in posted]),
        "flow_run_creation": latency(probe.between(started, finished)),
        "flow_runs_per_worker": _worker_names(t.prefect_api_urls[0], batch_ids),
        "cpu_seconds": cpu,
    }
    log(f"  {case['items_per_s']} items/s ({seconds:.1f} s), POST p95 "
        f"{case['post_batches']['p95_ms']} ms, flow-run creation p95 "
        f"{case['flow_run_creation']['p95_ms']} ms, runs per worker "
        f"{case['flow_runs_per_worker']}")
    return case


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f}" if isinstance(value, float) else str(value)


def system_cpu(case: dict[str, Any]) -> float:
    """CPU seconds used by the system under test (every part but the machine's other work)."""
    return float(sum(case["cpu_seconds"][p] for p in CpuSample.PARTS))


def _mean_by_workers(report: dict[str, Any], value: Any) -> dict[int, float]:
    out = {}
    for workers in (1, 2):
        values = [value(c) for c in report["cases"] if c["workers"] == workers]
        out[workers] = sum(values) / len(values)
    return out


def ratios(report: dict[str, Any]) -> dict[str, float]:
    """2-worker / 1-worker: items/s, and items per CPU second of the system."""
    rate = _mean_by_workers(report, lambda c: c["items_per_s"])
    per_cpu = _mean_by_workers(report, lambda c: c["items"] / system_cpu(c))
    return {"items_per_s": round(rate[2] / rate[1], 3),
            "items_per_system_cpu_s": round(per_cpu[2] / per_cpu[1], 3)}


def table(report: dict[str, Any]) -> list[str]:
    """The report as a markdown table (one line per case, then the ratios)."""
    cores = report["machine"]["cpus"]
    lines = ["| workers | items | seconds | items/s | POST /batches p50 / p95 ms | "
             "flow-run creation p50 / p95 ms (n) | machine busy | CPU s: system / other work "
             "| cores the system got | items per system CPU s | CPU s: flow runs+workers / "
             "Prefect APIs+services / batchops APIs / PostgreSQL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    idle = report["idle_flow_run_creation"]
    lines.append(f"| idle | - | - | - | - | {_fmt(idle['p50_ms'])} / {_fmt(idle['p95_ms'])} "
                 f"({idle['n']}) | - | - | - | - | - |")
    for c in report["cases"]:
        cpu, post, fr = c["cpu_seconds"], c["post_batches"], c["flow_run_creation"]
        used = system_cpu(c)
        lines.append(
            f"| {c['workers']} | {c['items']:,} | {c['seconds']:.1f} | {c['items_per_s']:,.0f} "
            f"| {_fmt(post['p50_ms'])} / {_fmt(post['p95_ms'])} "
            f"| {_fmt(fr['p50_ms'])} / {_fmt(fr['p95_ms'])} ({fr['n']}) "
            f"| {100 * cpu['machine'] / (cpu['wall'] * cores):.0f} % "
            f"| {used:.0f} / {cpu['other']:.0f} | {used / cpu['wall']:.2f} of {cores} "
            f"| {c['items'] / used:.0f} "
            f"| {cpu['worker']:.0f} / {cpu['prefect-api'] + cpu['prefect-services']:.0f} / "
            f"{cpu['api']:.0f} / {cpu['postgres']:.0f} |")
    r = ratios(report)
    lines.append("")
    lines.append(f"2-worker / 1-worker: items/s **{r['items_per_s']:.2f}**, items per CPU second "
                 f"of the system **{r['items_per_system_cpu_s']:.2f}**")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2,
                        help="1: 1 then 2 workers; 2: 1, 2, 2, 1 (drift cancels out); …")
    parser.add_argument("--probe-interval", type=float, default=0.25)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--quiet-wait", type=float, default=30,
                        help="wait up to this long for the machine to settle before a case")
    args = parser.parse_args(argv)

    tag = uuid.uuid4().hex[:8]
    redis_db = _empty_redis_database()
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    topology = ScaledTopology(
        prefect_ports=(free_port(), free_port()), api_ports=(free_port(), free_port()),
        workers=1, prefect_database=f"batchops_prefect_bench_{tag}",
        store_database=f"batchops_bench_scale_{tag}",
        redis_url=f"redis://127.0.0.1:6379/{redis_db}", data_dir=workdir,
        extra_env={"BATCHOPS_QUOTA_OPS_PER_MINUTE": "0"})
    system = ScaledSystem(topology)
    probe: FlowRunProbe | None = None
    report: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(), "git": git_state(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_at_start": os.getloadavg()},
        "args": vars(args), "topology": {
            "prefect_api_servers": len(topology.prefect_ports), "batchops_apis":
            len(topology.api_ports), "worker_limit": topology.worker_limit,
            "redis_db": redis_db, "logs": str(workdir / "logs")},
        "cases": []}
    try:
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
        for workers in order:
            report["cases"].append(run_case(system, probe, workers, args.batches, args.items,
                                            args.timeout, args.quiet_wait))
        report["probe_errors"] = probe.errors
        report["ratio_2_over_1"] = ratios(report)
    finally:
        if probe is not None:
            probe.stop()
        system.stop()
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
