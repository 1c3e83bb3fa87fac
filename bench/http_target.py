"""Benchmark: batchops' http target against a hand-written asyncio + httpx + semaphore loop.

    python -m bench.http_target                       # 10,000 operations, three scenarios
    python -m bench.http_target --size 2000 --scenarios clean   # quick

Both sides send ``POST /contacts`` to the fault-injecting upstream
(``python -m batchops.devtools.upstream``, a process of its own on a free port) with an
upstream latency of 20 ms and 10 requests in flight: by Little's law the limit is
10 / 0.020 s = 500 operations a second. Scenarios:

* **clean** — no faults;
* **503s** — 5 % of requests answer 503 (``Retry-After: 0``) without executing;
* **429s** — the upstream accepts 100 requests in any second and answers 429 (``Retry-After``)
  beyond; batchops is told ``rate_limit_per_second = 100``. The limit is then 100 ops/s;
* **429s-60** — the upstream accepts only 60 a second while batchops is still told 100: its
  AIMD must find the real limit (the limit is 60 ops/s).

The rate-limited scenarios run ``--limited-size`` operations (4,000: 40 s at 100 rps). batchops
shares its rate budget through Redis (``BATCHOPS_REDIS_URL``, the machine's Redis at
127.0.0.1:6379), as a multi-worker deployment does.

Sides, in the same run, one after the other per scenario:

* **batchops** — ``register_batch`` + the ``process_batch`` flow end to end (store on
  PostgreSQL, database ``batchops_bench_http``; a Prefect server this bench starts), in a fresh
  process per scenario, warmed up by a 1-item flow (``bench._http_run``);
* **baseline** — one ``httpx.AsyncClient``, ``asyncio.Semaphore(10)`` around each request, and
  retries of 429/5xx/connection errors after ``Retry-After`` (or 50 ms doubling) outside it.

Reported per scenario: ops/s (items that finally succeeded, per second of the whole run: for
batchops from ``register_batch`` to the flow's end) and its fraction of the limit for each
side, their ratio, the fraction of the limit *once running* (succeeded items per second from
the first to the last request the upstream saw), the 429s in each second (they must fall, for
AIMD) and after the first second (the upstream's ``rate_limited_after_first_second``), items
that succeeded, keys the upstream executed more than once, peak requests in flight and in any
second at the upstream, CPU seconds per item, the upstream's own time per executed request
(arrival to answer: the 20 ms latency plus its overhead, so the reader sees whether the 20 ms
holds) and the round trip each side saw (concurrency * first→last request span / requests, by
Little's law), and for batchops the Prefect calls of the limits (global concurrency limit
acquisitions), the coordination calls of the rate budget (Redis leases) and the AIMD rate's
and concurrency's final values. Targets (issue 15): without faults, ≥ 0.95 times the
baseline's throughput and ≤ 1.15 times its CPU per item; at a 100 rps limit, ≥ 0.95 of it once
running, no 429 after the first second and every item succeeded; with the upstream at 60 rps
below a configured 100, ≥ 0.9 of 60 once running, the 429s falling and every item succeeded.
Results: ``bench/results/http_target-<timestamp>.json``, ``-latest.json`` and ``-latest.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench._api_procs import ManagedProcess, http_ok
from bench._prefect_server import PrefectServer, free_port
from bench.sql_target import ensure_database, git_state, log, snapshot_code, wait_quiet

RESULTS = Path(__file__).resolve().parent / "results"
DB_NAME = "batchops_bench_http"
PREFECT_DB_NAME = "batchops_bench_http_prefect"  # the Prefect server's own database
DB_URL = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{DB_NAME}"
FAULT_FREE_TARGET = 0.95  # of the baseline's throughput
CPU_TARGET = 1.15  # the baseline's CPU per item, at most this many times
RATE_TARGET = 0.95
ADAPTED_TARGET = 0.9
REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    error_rate: float = 0.0
    rps: int | None = None
    configured_rps: int | None = None  # batchops' rate_limit_per_second (default: rps)

    def upstream_config(self, latency_ms: float) -> dict[str, Any]:
        return {"latency_ms": latency_ms, "error_rate": self.error_rate, "seed": 12,
                "rate_limit_rps": self.rps, "retry_after_seconds": 1}

    def limit(self, concurrency: int, latency_ms: float) -> float:
        little = concurrency / (latency_ms / 1000)
        return min(little, self.rps) if self.rps else little


SCENARIOS = {s.name: s for s in (
    Scenario("clean", "no faults"),
    Scenario("503s", "5 % injected 503s", error_rate=0.05),
    Scenario("429s", "100 rps upstream limit (429s)", rps=100),
    Scenario("429s-60", "upstream at 60 rps, configured 100 (AIMD)", rps=60, configured_rps=100),
)}


# -- the hand-written baseline ---------------------------------------------------------------


async def _baseline(url: str, size: int, concurrency: int, retries: int = 8) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)
    run = f"base-{time.time_ns()}"
    outcome = {"succeeded": 0, "failed": 0, "attempts": 0}

    async with httpx.AsyncClient(base_url=url, timeout=30,
                                 limits=httpx.Limits(max_connections=100)) as client:
        async def one(i: int) -> None:
            for attempt in range(retries + 1):
                outcome["attempts"] += 1
                wait: float | None = None
                try:
                    async with sem:
                        resp = await client.post("/contacts", json={"name": f"Contact {i}"},
                                                 headers={"Idempotency-Key": f"{run}:{i}"})
                except httpx.TransportError:
                    resp = None
                if resp is not None and resp.status_code < 300:
                    outcome["succeeded"] += 1
                    return
                if resp is not None and resp.status_code != 429 and resp.status_code < 500:
                    break
                if resp is not None and "retry-after" in resp.headers:
                    wait = float(resp.headers["retry-after"])
                if attempt < retries:
                    await asyncio.sleep(wait if wait is not None
                                        else random.uniform(0, 0.05 * 2 ** attempt))
            outcome["failed"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(size)))
        seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 4), **outcome, "verified": outcome["succeeded"] == size}


def size_of(args: argparse.Namespace, scenario: Scenario) -> int:
    return args.limited_size if scenario.rps else args.size


# -- runs ------------------------------------------------------------------------------------


def upstream_stats(url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{url}/_upstream/stats", timeout=60).json()
    stats["executed_more_than_once"] = len(stats["executed_more_than_once"])
    return stats


def configure(url: str, config: dict[str, Any]) -> None:
    httpx.post(f"{url}/_upstream/reset", json=config, timeout=10).raise_for_status()


def run_batchops(args: argparse.Namespace, scenario: Scenario, *, code_dir: Path,
                 workdir: Path, env: dict[str, str], upstream: str,
                 server_pid: int | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"prefix": "/crm", "base_url": upstream,
                            "max_concurrency": args.concurrency}
    if scenario.rps:
        spec["rate_limit_per_second"] = scenario.configured_rps or scenario.rps
    out = workdir / f"batchops-{scenario.name}.json"
    log_path = workdir / f"batchops-{scenario.name}.log"
    cmd = [sys.executable, "-m", "bench._http_run", "--size", str(size_of(args, scenario)),
           "--upstream", upstream, "--out", str(out),
           "--config", json.dumps(scenario.upstream_config(args.latency_ms))]
    if server_pid:
        cmd += ["--server-pid", str(server_pid)]
    if args.py_spy:
        cmd += ["--py-spy", str(Path(args.py_spy).resolve()),
                "--py-spy-out", str(args.py_spy_dir / f"{scenario.name}.raw")]
    run_env = dict(env, BATCHOPS_UPSTREAMS=json.dumps({"crm": spec}),
                   BATCHOPS_DEFAULT_CONCURRENCY=str(args.concurrency),
                   BATCHOPS_REDIS_URL=REDIS_URL)
    with log_path.open("wb") as logf:
        proc = subprocess.run(cmd, cwd=code_dir, env=run_env, stdout=logf,
                              stderr=subprocess.STDOUT, check=False)
    if not out.exists():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"batchops run failed ({proc.returncode}); log {log_path}:\n{tail}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["upstream"] = upstream_stats(upstream)
    result["log"] = str(log_path)
    return result


def run_baseline(args: argparse.Namespace, scenario: Scenario, upstream: str) -> dict[str, Any]:
    configure(upstream, scenario.upstream_config(args.latency_ms))
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = asyncio.run(_baseline(upstream, size_of(args, scenario), args.concurrency))
    after = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = round(after.ru_utime + after.ru_stime
                                  - before.ru_utime - before.ru_stime, 2)
    result["upstream"] = upstream_stats(upstream)
    return result


# -- report ----------------------------------------------------------------------------------


def table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, r in report["results"].items():
        b, h, limit = r["batchops"], r["baseline"], r["limit_ops_per_s"]
        # Items that finally succeeded, per second of the whole run.
        b_rate, h_rate = b["succeeded"] / b["seconds"], h["succeeded"] / h["seconds"]
        bu, hu = b["upstream"], h["upstream"]
        b_span, h_span = bu["last_at"] - bu["first_at"], hu["last_at"] - hu["first_at"]
        rows.append({
            "scenario": SCENARIOS[name].label if name in SCENARIOS else name,
            "limit": limit, "batchops_ops_per_s": b_rate, "batchops_fraction": b_rate / limit,
            "baseline_ops_per_s": h_rate, "baseline_fraction": h_rate / limit,
            "ratio": b_rate / h_rate,
            "batchops_running_fraction": b["succeeded"] / b_span / limit if b_span else 0.0,
            "baseline_running_fraction": h["succeeded"] / h_span / limit if h_span else 0.0,
            "batchops_cpu_ms": 1000 * b.get("cpu_seconds", {}).get("this_process", 0)
            / r["size"],
            "baseline_cpu_ms": 1000 * h.get("cpu_seconds", 0) / r["size"],
            "batchops_429s": bu["by_outcome"].get("rate_limited", 0),
            "baseline_429s": hu["by_outcome"].get("rate_limited", 0),
            "batchops_429_by_second": bu.get("rate_limited_by_second", []),
            "coordination_calls": b.get("coordination_calls", 0.0),
            "batchops_429_after_1s": bu["rate_limited_after_first_second"],
            "baseline_429_after_1s": hu["rate_limited_after_first_second"],
            "batchops_succeeded": b["succeeded"], "baseline_succeeded": h["succeeded"],
            "batchops_duplicates": bu["executed_more_than_once"],
            "baseline_duplicates": hu["executed_more_than_once"],
            "batchops_upstream_ms": (bu.get("latency_ms") or {}).get("mean"),
            "baseline_upstream_ms": (hu.get("latency_ms") or {}).get("mean"),
            "size": r["size"],
        })
    return rows


def _verdict(target: str, value: Any, ok: bool | None) -> dict[str, Any]:
    verdict = "NOT MEASURED" if ok is None else "PASS" if ok else "FAIL"
    return {"target": target, "value": value, "verdict": verdict}


def _falling(by_second: list[int]) -> bool:
    """The 429s of the second half of the run are fewer than those of the first."""
    half = len(by_second) // 2
    return sum(by_second[half:]) < sum(by_second[:half]) or sum(by_second) == 0


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    by_name = dict(zip(report["results"], report["table"], strict=True))
    verdicts = []
    clean = by_name.get("clean")
    verdicts.append(_verdict(
        f"no faults: batchops ≥ {FAULT_FREE_TARGET} times the baseline's ops/s",
        None if clean is None else round(clean["ratio"], 3),
        None if clean is None else clean["ratio"] >= FAULT_FREE_TARGET))
    cpu = None if clean is None else clean["batchops_cpu_ms"] / clean["baseline_cpu_ms"]
    verdicts.append(_verdict(
        f"no faults: batchops CPU per item ≤ {CPU_TARGET} times the baseline's",
        None if cpu is None else round(cpu, 3), None if cpu is None else cpu <= CPU_TARGET))
    limited = by_name.get("429s")
    verdicts.append(_verdict(
        f"100 rps limit: ≥ {RATE_TARGET} of it once running, no 429 after the first second, "
        "every item succeeded",
        None if limited is None else (
            f"{limited['batchops_running_fraction']:.3f}, "
            f"{limited['batchops_429_after_1s']} 429s, "
            f"{limited['batchops_succeeded']}/{limited['size']} succeeded"),
        None if limited is None else (
            limited["batchops_running_fraction"] >= RATE_TARGET
            and limited["batchops_429_after_1s"] == 0
            and limited["batchops_succeeded"] == limited["size"])))
    adapted = by_name.get("429s-60")
    verdicts.append(_verdict(
        f"upstream at 60 rps, configured 100: ≥ {ADAPTED_TARGET} of 60 once running, the 429s "
        "falling, every item succeeded",
        None if adapted is None else (
            f"{adapted['batchops_running_fraction']:.3f}, {adapted['batchops_429s']} 429s "
            f"(per second: {_compact(adapted['batchops_429_by_second'])}), "
            f"{adapted['batchops_succeeded']}/{adapted['size']} succeeded"),
        None if adapted is None else (
            adapted["batchops_running_fraction"] >= ADAPTED_TARGET
            and _falling(adapted["batchops_429_by_second"])
            and adapted["batchops_succeeded"] == adapted["size"])))
    return verdicts


def _compact(by_second: list[int]) -> str:
    """Seconds with 429s, as ``second:count``."""
    return " ".join(f"{s}:{n}" for s, n in enumerate(by_second) if n) or "none"


def _latency(stats: dict[str, Any], concurrency: int) -> str:
    lat = stats.get("latency_ms")
    span = stats["last_at"] - stats["first_at"]
    seen = 1000 * concurrency * span / stats["requests"] if stats["requests"] else 0.0
    own = "?" if not lat else (f"{lat['mean']:.1f} ms mean (p50 {lat['p50']:.1f}, p95 "
                               f"{lat['p95']:.1f}, p99 {lat['p99']:.1f})")
    return f"upstream's time per executed request {own}; round trip seen ≈ {seen:.1f} ms"


def detail_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    concurrency = report["parameters"]["concurrency"]
    for name, r in report["results"].items():
        b, h = r["batchops"], r["baseline"]
        bu, hu = b["upstream"], h["upstream"]
        span = bu["last_at"] - bu["first_at"]
        gcl = b["gcl_acquisitions"]
        size = r["size"]
        cpu = b.get("cpu_seconds", {})
        lines.append(
            f"{name}: batchops {b['seconds']:.2f} s (register {b['register_seconds']:.2f}, flow "
            f"{b['flow_seconds']:.2f}; first→last upstream request {span:.2f} s = "
            f"{size / span if span else 0:,.0f} ops/s), {bu['requests']} requests, peak "
            f"{bu.get('peak_in_flight', '?')} in flight / {bu['peak_accepted_per_second']} in a "
            f"second; 429s per second: {_compact(bu.get('rate_limited_by_second', []))}; "
            f"Prefect limit calls: {gcl['concurrency']:.0f} concurrency acquisitions; rate "
            f"budget: {b.get('coordination_calls', 0):.0f} Redis leases "
            f"({b.get('coordination_calls', 0) / span if span else 0:.1f}/s), "
            f"{b['counters'].get('batchops_upstream_rate_tokens_dropped_total', 0):.0f} tokens "
            f"let go late; AIMD at the end: "
            f"rate {_num(b.get('effective_rate_final'))}/s, concurrency "
            f"{b['aimd_limit_final']}; CPU s: batchops {cpu.get('this_process', 0):.1f} "
            f"({1000 * cpu.get('this_process', 0) / size:.2f} ms/item), Prefect server "
            f"{cpu.get('prefect_server', 0):.1f}, PostgreSQL {cpu.get('postgres', 0):.1f}")
        lines.append(
            f"{name}: baseline {h['seconds']:.2f} s, {hu['requests']} requests, peak "
            f"{hu.get('peak_in_flight', '?')} in flight / {hu['peak_accepted_per_second']} in a "
            f"second; CPU s {h.get('cpu_seconds', 0):.1f} "
            f"({1000 * h.get('cpu_seconds', 0) / size:.2f} ms/item); 429s per second: "
            f"{_compact(hu.get('rate_limited_by_second', []))}")
        lines.append(f"{name}: batchops: {_latency(bu, concurrency)}; "
                     f"baseline: {_latency(hu, concurrency)}")
    return lines


def _num(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


HEAD = ("scenario", "items", "batchops ops/s", "of limit", "once running", "baseline ops/s",
        "of limit", "once running", "ratio", "CPU ms/item (b/base)", "429s (b/base)",
        "429s after 1 s (b/base)", "Redis leases", "succeeded (b/base)", "duplicates (b/base)",
        "upstream ms/request (b/base)")


def _cells(r: dict[str, Any]) -> list[str]:
    return [r["scenario"], f"{r['size']:,}", f"{r['batchops_ops_per_s']:,.0f}",
            f"{r['batchops_fraction']:.2f}", f"{r['batchops_running_fraction']:.2f}",
            f"{r['baseline_ops_per_s']:,.0f}", f"{r['baseline_fraction']:.2f}",
            f"{r['baseline_running_fraction']:.2f}", f"{r['ratio']:.2f}",
            f"{r['batchops_cpu_ms']:.2f} / {r['baseline_cpu_ms']:.2f}",
            f"{r['batchops_429s']:,} / {r['baseline_429s']:,}",
            f"{r['batchops_429_after_1s']} / {r['baseline_429_after_1s']}",
            f"{r['coordination_calls']:,.0f}",
            f"{r['batchops_succeeded']:,} / {r['baseline_succeeded']:,}",
            f"{r['batchops_duplicates']} / {r['baseline_duplicates']}",
            f"{_ms(r.get('batchops_upstream_ms'))} / {_ms(r.get('baseline_upstream_ms'))}"]


def _ms(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


def print_table(report: dict[str, Any]) -> None:
    rows = [list(HEAD)] + [_cells(r) for r in report["table"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEAD))]
    print()
    for n, row in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    print()
    for line in report["details"]:
        print(line)
    print()
    for v in report["targets"]:
        print(f"{v['verdict']:<12} {v['target']}  (value: {v['value']})")


def markdown(report: dict[str, Any]) -> str:
    p = report["parameters"]
    out = [f"# http target benchmark — {report['timestamp']}", "",
           f"{p['size']:,} operations, upstream latency {p['latency_ms']:g} ms, concurrency "
           f"{p['concurrency']}; limit = concurrency / latency (Little's law), or the upstream's "
           f"rate limit. Code measured: the {report['code']['measured']} at "
           f"`{report['code']['head'][:12]}`"
           + (f" with uncommitted changes to {', '.join(report['code']['dirty_core_files'])}"
              if report["code"]["measured"] == "worktree" and report["code"]["dirty_core_files"]
              else "") + ".", "",
           "| " + " | ".join(HEAD) + " |", "|---" + "|---:" * (len(HEAD) - 1) + "|"]
    out += ["| " + " | ".join(_cells(r)) + " |" for r in report["table"]]
    out += ["", "## Targets", "", "| target | value | verdict |", "|---|---|:-:|"]
    out += [f"| {v['target']} | {v['value']} | **{v['verdict']}** |" for v in report["targets"]]
    out += ["", "## Details", ""] + [f"- {line}" for line in report["details"]] + [""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=10_000)
    ap.add_argument("--limited-size", type=int, default=4_000,
                    help="operations of the rate-limited scenarios")
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated, of {', '.join(SCENARIOS)}")
    ap.add_argument("--code", choices=("worktree", "head"), default="worktree",
                    help="which code batchops runs: a copy of the work tree or the last commit")
    ap.add_argument("--keep-db", action="store_true")
    ap.add_argument("--settle", type=float, default=20.0,
                    help="wait up to this many seconds before each measurement for the machine "
                         "to be < 25%% busy")
    ap.add_argument("--name", default="http_target")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep the work directory (the runs' logs)")
    ap.add_argument("--py-spy", default=None,
                    help="py-spy executable: profile batchops' measured runs (raw, 100 Hz)")
    ap.add_argument("--py-spy-dir", type=Path, default=Path("/tmp/batchops-http-profiles"),
                    help="where the raw profiles go, one per scenario")
    args = ap.parse_args(argv)
    scenarios = [SCENARIOS[s.strip()] for s in args.scenarios.split(",") if s.strip()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.py_spy:
        args.py_spy_dir.mkdir(parents=True, exist_ok=True)

    workdir = Path(tempfile.mkdtemp(prefix="batchops-http-bench-"))
    log(f"work dir {workdir}")
    code = git_state()
    code["measured"] = args.code
    code_dir = snapshot_code(workdir / "code", args.code)
    ensure_database(fresh=not args.keep_db, name=DB_NAME)
    server = PrefectServer(workdir / "prefect-server", workdir / "prefect-server.log",
                           database=PREFECT_DB_NAME)
    log("starting prefect server …")
    server.start()
    log(f"prefect server healthy at {server.api_url} after {server.startup_seconds:.1f} s")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and not k.startswith("BATCHOPS_")}
    env.update(PREFECT_API_URL=server.api_url, PREFECT_HOME=str(workdir / "prefect-client"),
               PREFECT_LOCAL_STORAGE_PATH=str(workdir / "prefect-results"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
               BATCHOPS_DATABASE_URL=DB_URL, BATCHOPS_CONFIG_FILE="/nonexistent",
               BATCHOPS_DEMO="true")
    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    upstream_proc = ManagedProcess(
        "upstream", [sys.executable, "-m", "batchops.devtools.upstream", "--port", str(port)],
        cwd=code_dir, env=env, log_path=workdir / "upstream.log")
    results: dict[str, Any] = {}
    try:
        upstream_proc.start(http_ok(f"{upstream}/_upstream/stats"))
        for scenario in scenarios:
            limit = scenario.limit(args.concurrency, args.latency_ms)
            r: dict[str, Any] = {"size": size_of(args, scenario), "limit_ops_per_s": limit}
            wait_quiet(args.settle)
            log(f"{scenario.name}: batchops …")
            r["batchops"] = run_batchops(args, scenario, code_dir=code_dir, workdir=workdir,
                                         env=env, upstream=upstream,
                                         server_pid=server.proc.pid if server.proc else None)
            b = r["batchops"]
            log(f"  batchops {b['seconds']:.2f} s = {r['size'] / b['seconds']:,.0f} ops/s "
                f"({r['size'] / b['seconds'] / limit:.2f} of {limit:g}), "
                f"{b['succeeded']} succeeded")
            wait_quiet(args.settle)
            log(f"{scenario.name}: baseline …")
            r["baseline"] = run_baseline(args, scenario, upstream)
            h = r["baseline"]
            log(f"  baseline {h['seconds']:.2f} s = {r['size'] / h['seconds']:,.0f} ops/s "
                f"({r['size'] / h['seconds'] / limit:.2f}), {h['succeeded']} succeeded")
            r["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
            results[scenario.name] = r
    finally:
        upstream_proc.stop()
        log("stopping prefect server")
        server.stop()

    import prefect

    report: dict[str, Any] = {
        "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "parameters": {"size": args.size, "limited_size": args.limited_size,
                       "concurrency": args.concurrency,
                       "latency_ms": args.latency_ms},
        "code": code,
        "environment": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "prefect": prefect.__version__},
        "results": results,
    }
    report["table"] = table_rows(report)
    report["targets"] = evaluate_targets(report)
    report["details"] = detail_lines(report)
    print_table(report)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(report, indent=2, default=str)
    (RESULTS / f"{args.name}-{stamp}.json").write_text(text)
    (RESULTS / f"{args.name}-latest.json").write_text(text)
    (RESULTS / f"{args.name}-latest.md").write_text(markdown(report))
    log(f"wrote {RESULTS / f'{args.name}-{stamp}.json'}, {args.name}-latest.json/.md")
    if args.keep_work:
        log(f"work directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
