"""Benchmark: batchops' sql target on PostgreSQL against hand-written baselines.

    python -m bench.sql_target                      # 1,000, 10,000 and 100,000 rows
    python -m bench.sql_target --sizes 1000,10000   # quick run
    python -m bench.sql_target --profile py-spy     # + a profiled run at the largest size

For each size, ``POST /users`` inserts ``{id, email, name}`` where every 100th row reuses an
earlier row's email (1 % unique violations spread through the batch), measured as:

* **batchops** — ``register_batch(..., max_operations=big)`` + ``process_batch(batch_id=...)``
  end to end, against a running Prefect server this bench starts (``prefect server start`` on
  a free port, on a PostgreSQL database of its own, ``batchops_bench_prefect_sql``, dropped and
  created anew) and stops at the end; each run in a
  fresh process (warmed up with one 1-item flow first) so its peak RSS is its own;
* **(a)** one INSERT + COMMIT per row (psycopg2), catching the unique violation;
* **(b)** asyncio + multi-row ``INSERT … ON CONFLICT DO NOTHING RETURNING`` in pages of 500
  on 4 connections, conflicts re-tried per row in savepoints;
* **(c)** ``COPY`` of the non-duplicate rows: the machine's ceiling.

batchops writes to its own database ``batchops_bench`` (dropped and created anew, or reused
with ``--keep-db``); ``users`` is emptied
before every run. Results: ``bench/results/sql_target-<timestamp>.json``, ``-latest.json``
and ``-latest.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from batchops.tables import metadata as store_metadata
from bench import _baselines as baselines
from bench._data import DUP_MODES, make_dataset
from bench._prefect_server import PrefectServer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
DB_NAME = "batchops_bench"
PREFECT_DB_NAME = "batchops_bench_prefect_sql"  # the Prefect server's own database
DB_URL = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{DB_NAME}"
DSN = f"host=127.0.0.1 port=5432 user=postgres dbname={DB_NAME}"
# every table of the store (a batch's chunks, results, claims, checkpoints, records)
STORE_TABLES = tuple(t.name for t in store_metadata.sorted_tables)

# (size, metric, threshold) from the issue: ratios are batchops items/s over the baseline's.
TARGETS = [
    (100_000, "vs_a", 15.0),
    (100_000, "vs_b", 0.7),
    (10_000, "vs_a", 4.0),
    (10_000, "vs_b", 0.4),
]
MEMORY_TARGET = (100_000, 500.0)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- database ---------------------------------------------------------------------------


def ensure_database(fresh: bool, name: str = DB_NAME) -> None:
    """Create a bench's own database if missing; ``fresh``: drop and create it anew (the core's
    schema may have changed under the same migration number since the last run)."""
    conn = psycopg2.connect(dbname="postgres", **PG)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            if fresh:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def sql(statement: str, *, autocommit: bool = True) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(DSN)
    conn.autocommit = autocommit
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            rows = cur.fetchall() if cur.description else []
        if not autocommit:
            conn.commit()
        return rows
    finally:
        conn.close()


def existing_tables() -> set[str]:
    return {r[0] for r in sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def reset_store() -> None:
    names = [t for t in STORE_TABLES if t in existing_tables()]
    if names:
        sql(f"TRUNCATE {', '.join(names)} CASCADE")


def prepare_run() -> None:
    """Every measured run starts from an empty ``users`` and a fresh checkpoint."""
    if "users" in existing_tables():
        sql("TRUNCATE users")
    sql("CHECKPOINT")


def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of the machine's CPU time that was busy over ``interval`` seconds."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(interval)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(max_wait: float, threshold: float = 0.25) -> None:
    """Wait (at most ``max_wait`` s) for other work on this machine to calm down."""
    deadline = time.monotonic() + max_wait
    told = False
    while max_wait > 0 and time.monotonic() < deadline:
        busy = cpu_busy()
        if busy < threshold:
            return
        if not told:
            log(f"  machine {100 * busy:.0f}% busy — waiting up to {max_wait:.0f} s for it to "
                "settle")
            told = True
        time.sleep(2.0)


def users_count() -> int:
    return int(sql("SELECT count(*) FROM users")[0][0])


# -- runs -------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, env: dict[str, str],
                 server_pid: int | None, code_dir: Path) -> None:
        self.code_dir = code_dir
        self.args = args
        self.workdir = workdir
        self.env = env
        self.server_pid = server_pid

    def batchops(self, size: int, *, chunk_size: int | None = None, fixed: bool = False,
                 profile: str | None = None) -> dict[str, Any]:
        prepare_run()
        tag = f"{size}-{chunk_size or 'default'}{'-' + profile if profile else ''}"
        out = self.workdir / f"batchops-{tag}.json"
        log_path = self.workdir / f"batchops-{tag}.log"
        cmd = [sys.executable, "-m", "bench._batchops_run", "--size", str(size),
               "--dup-mode", self.args.dup_mode, "--out", str(out)]
        if self.server_pid:
            cmd += ["--server-pid", str(self.server_pid)]
        if chunk_size:
            cmd += ["--chunk-size", str(chunk_size)]
        if fixed:
            cmd += ["--fixed"]
        if not profile and self.args.repeat > 1:
            cmd += ["--repeat", str(self.args.repeat)]
        if profile == "cprofile":
            cmd += ["--cprofile", str(RESULTS / f"{self.args.name}-profile-latest.txt")]
        elif profile == "py-spy":
            cmd += ["--py-spy", self.args.py_spy, "--py-spy-out",
                    str(self.workdir / "py-spy.txt")]
        wait_quiet(self.args.settle)
        load = os.getloadavg()[0]
        with log_path.open("wb") as logf:
            proc = subprocess.run(cmd, cwd=self.code_dir, env=self.env, stdout=logf,
                                  stderr=subprocess.STDOUT, check=False)
        if not out.exists():
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"batchops run failed ({proc.returncode}); log {log_path}:\n"
                               f"{tail}")
        result: dict[str, Any] = json.loads(out.read_text())
        if profile == "py-spy":
            result["py_spy"] = summarize_py_spy(self.workdir / "py-spy.txt",
                                                RESULTS / f"{self.args.name}-profile-latest.txt")
        result["log"] = str(log_path)
        result["loadavg_1m_before"] = round(load, 2)
        return result

    def repeated(self, measure: Any, size: int) -> dict[str, Any]:
        """``measure(size)`` ``--repeat`` times; the median run, with every run's seconds."""
        runs = []
        for _ in range(self.args.repeat):
            wait_quiet(self.args.settle)
            load = os.getloadavg()[0]
            run = measure(size)
            run["loadavg_1m_before"] = round(load, 2)
            runs.append(run)
        ranked = sorted(runs, key=lambda r: r["seconds"])
        result: dict[str, Any] = dict(ranked[(len(ranked) - 1) // 2])
        result["runs_seconds"] = [round(r["seconds"], 4) for r in runs]
        result["verified"] = all(r["verified"] for r in runs)
        return result

    def sequential(self, size: int) -> dict[str, Any]:
        ds = make_dataset(size, self.args.dup_mode)
        sample = min(size, self.args.seq_sample)
        prepare_run()
        run = baselines.sequential(DSN, ds.rows[:sample])
        expected_failed = sum(1 for i in range(sample) if (i % 100) == 99)
        ok = run.failed == expected_failed and users_count() == sample - expected_failed \
            and set(run.failure_codes) <= {"23505"}
        seconds = run.seconds * size / sample
        return {"seconds": seconds, "measured_rows": sample, "measured_seconds": run.seconds,
                "extrapolated": sample < size, "succeeded": run.succeeded,
                "failed": run.failed, "verified": ok}

    def paged(self, size: int) -> dict[str, Any]:
        ds = make_dataset(size, self.args.dup_mode)
        prepare_run()
        run = baselines.paged(DSN, ds.rows, page_size=500, concurrency=self.args.b_connections)
        ok = run.failed == ds.duplicates and users_count() == ds.successes \
            and set(run.failure_codes) <= {"23505"}
        return {"seconds": run.seconds, "succeeded": run.succeeded, "failed": run.failed,
                "verified": ok}

    def copy(self, size: int) -> dict[str, Any]:
        ds = make_dataset(size, self.args.dup_mode)
        prepare_run()
        run = baselines.copy_ceiling(DSN, ds.unique_rows())
        ok = users_count() == ds.successes
        return {"seconds": run.seconds, "rows_copied": run.rows, "verified": ok}


def summarize_py_spy(raw: Path, report: Path, top: int = 40) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    if not raw.exists():
        return {"error": "py-spy wrote nothing"}
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        if frames and frames[0].startswith(("process ", "thread ")):
            frames = frames[1:]
        total += n
        if frames:
            self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    lines = [f"py-spy record (on-CPU samples, all threads), {total} samples\n",
             "=== inclusive (function or anything it calls) ==="]
    lines += [f"{100 * c / total:6.1f}%  {f}" for f, c in incl.most_common(top)]
    lines += ["", "=== self ==="]
    lines += [f"{100 * c / total:6.1f}%  {f}" for f, c in self_c.most_common(top)]
    report.write_text("\n".join(lines) + "\n")
    shutil.copy(raw, report.with_suffix(".raw.txt"))
    return {"samples": total, "report": str(report),
            "top_self": [[f, round(100 * c / total, 1)] for f, c in self_c.most_common(15)],
            "top_inclusive": [[f, round(100 * c / total, 1)] for f, c in incl.most_common(25)]}


# -- report -----------------------------------------------------------------------------


CODE_DIRS = ("batchops", "flows", "tasks", "migrations", "api", "cli", "deployments")


def snapshot_code(dest: Path, source: str) -> Path:
    """A frozen copy of the code the batchops runs import (the work tree may change under a
    long run): ``worktree`` copies the files as they are now, ``head`` exports the last commit.
    ``bench/`` always comes from the work tree."""
    dest.mkdir(parents=True)
    skip = shutil.ignore_patterns("__pycache__", "results", ".data", "*.pyc")
    if source == "head":
        archive = subprocess.run(["git", "archive", "HEAD", "--", *CODE_DIRS], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    else:
        for name in CODE_DIRS:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, dest / name, ignore=skip)
    shutil.copytree(ROOT / "bench", dest / "bench", ignore=skip)
    return dest


def git_state() -> dict[str, Any]:
    """Which code was measured: HEAD and a hash of uncommitted changes to the core."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()

    diff = git("diff", "HEAD", "--", "batchops", "flows", "tasks")
    return {"head": git("rev-parse", "HEAD"),
            "dirty_core_files": git("diff", "HEAD", "--name-only", "--", "batchops", "flows",
                                    "tasks").split(),
            "core_diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None}


def rate(rows: int, seconds: float) -> float:
    return rows / seconds if seconds > 0 else float("inf")


def build_rows(results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for size, r in sorted(results.items()):
        b = rate(size, r["batchops"]["seconds"])
        rates = {k: rate(size, r[k]["seconds"]) for k in ("a", "b", "c")}
        for key, label in (("batchops", "batchops"), ("a", "(a) per-row commit"),
                           ("b", "(b) asyncio multi-row"), ("c", "(c) COPY ceiling")):
            m = r[key]
            speed = b if key == "batchops" else rates[key]
            row = {"rows": size, "method": label, "seconds": m["seconds"],
                   "items_per_s": speed, "verified": m["verified"],
                   "note": ""}
            if key == "batchops":
                row.update(vs_a=b / rates["a"], vs_b=b / rates["b"], vs_c=b / rates["c"])
            if key == "a":
                row["note"] = (f"{1000 * m['measured_seconds'] / m['measured_rows']:.2f} ms "
                               "per row (commit latency)")
                if m.get("extrapolated"):
                    row["note"] += (f"; extrapolated from a {m['measured_rows']:,}-row sample "
                                    f"({m['measured_seconds']:.2f} s)")
            if key == "c":
                row["note"] = f"{m['rows_copied']:,} non-duplicate rows, no conflict handling"
            table.append(row)
    return table


def evaluate_targets(results: dict[int, dict[str, Any]],
                     rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_size = {r["rows"]: r for r in rows if r["method"] == "batchops"}
    verdicts = []
    for size, metric, threshold in TARGETS:
        name = f"{size:,} items: batchops ≥ {threshold:g}x {'(a)' if metric == 'vs_a' else '(b)'}"
        if size not in by_size:
            verdicts.append({"target": name, "value": None, "verdict": "NOT MEASURED"})
            continue
        value = by_size[size][metric]
        verdicts.append({"target": name, "value": round(value, 2),
                         "verdict": "PASS" if value >= threshold else "FAIL"})
    size, limit = MEMORY_TARGET
    name = f"{size:,} items: peak RSS of the batchops process < {limit:g} MB"
    if size in results:
        value = results[size]["batchops"]["hwm_mb_after_run"]
        verdicts.append({"target": name, "value": value,
                         "verdict": "PASS" if value < limit else "FAIL"})
    else:
        verdicts.append({"target": name, "value": None, "verdict": "NOT MEASURED"})
    return verdicts


def fmt_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def markdown(report: dict[str, Any]) -> str:
    out = [f"# sql target benchmark — {report['timestamp']}", "",
           f"PostgreSQL {report['environment']['postgres']}, {report['environment']['cpus']} "
           f"CPUs, Python {report['environment']['python']}, Prefect "
           f"{report['environment']['prefect']}; duplicates: every 100th row "
           f"(`{report['dup_mode']}` mode). Ratios are batchops items/s ÷ the method's items/s.",
           "", f"Code measured: a copy of the {report['code']['measured']} at "
           f"`{report['code']['head'][:12]}`"
           + (f" with uncommitted changes to {', '.join(report['code']['dirty_core_files'])}"
              if report["code"]["measured"] == "worktree" and report["code"]["dirty_core_files"]
              else "") + ".",
           "", "| rows | method | seconds | items/s | batchops/(a) | batchops/(b) | batchops/(c) "
           "| ok | note |", "|---:|---|---:|---:|---:|---:|---:|:-:|---|"]
    for r in report["table"]:
        out.append(f"| {r['rows']:,} | {r['method']} | {r['seconds']:.3f} | "
                   f"{r['items_per_s']:,.0f} | {fmt_ratio(r.get('vs_a'))} | "
                   f"{fmt_ratio(r.get('vs_b'))} | {fmt_ratio(r.get('vs_c'))} | "
                   f"{'✓' if r['verified'] else '✗'} | {r['note']} |")
    out += ["", "## Targets", "", "| target | value | verdict |", "|---|---:|:-:|"]
    for v in report["targets"]:
        out.append(f"| {v['target']} | {'' if v['value'] is None else v['value']} | "
                   f"**{v['verdict']}** |")
    out += ["", "## Fixed and per-chunk cost", ""]
    out += [f"- {line}" for line in report["costs_text"]]
    out += ["", "## batchops run details", "",
            "| rows | register s | flow s | chunks | in-chunk busy s | outside chunks s | "
            "chunk exec sum s | peak RSS MB | RSS before data MB |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size, r in sorted(report["results"].items(), key=lambda kv: int(kv[0])):
        b = r["batchops"]
        out.append(f"| {int(size):,} | {b['register_seconds']:.3f} | {b['flow_seconds']:.3f} | "
                   f"{b['chunks']} | {b['chunk_exec_busy_seconds']:.3f} | "
                   f"{b['flow_seconds'] - b['chunk_exec_busy_seconds']:.3f} | "
                   f"{b['chunk_exec_sum_seconds']:.3f} | {b['hwm_mb_after_run']:.0f} | "
                   f"{b['rss_mb_before_data']:.0f} |")
    largest = max(report["results"], key=int)
    out += ["", f"Breakdown at {int(largest):,} rows (thread-seconds summed over chunks; chunks "
            "run in parallel):", "", "| step | calls | seconds |", "|---|---:|---:|"]
    for name, v in report["results"][largest]["batchops"]["breakdown"].items():
        out.append(f"| {name} | {v['calls']} | {v['seconds']:.3f} |")
    out += ["", "Peak memory is the RSS high-water mark (`resource.getrusage(RUSAGE_SELF)."
            "ru_maxrss`) of the process that ran the batchops measurement, which also holds the "
            "operations list it passes to `register_batch`.", ""]
    return "\n".join(out)


def print_table(report: dict[str, Any]) -> None:
    head = (f"{'rows':>8}  {'method':<22} {'seconds':>9} {'items/s':>10} {'b/(a)':>8} "
            f"{'b/(b)':>7} {'b/(c)':>7} ok  note")
    print("\n" + head + "\n" + "-" * len(head))
    for r in report["table"]:
        print(f"{r['rows']:>8,}  {r['method']:<22} {r['seconds']:>9.3f} "
              f"{r['items_per_s']:>10,.0f} {fmt_ratio(r.get('vs_a')):>8} "
              f"{fmt_ratio(r.get('vs_b')):>7} {fmt_ratio(r.get('vs_c')):>7} "
              f"{'ok' if r['verified'] else 'BAD'}  {r['note']}")
    print()
    for line in report["costs_text"]:
        print(line)
    print()
    for v in report["targets"]:
        print(f"{v['verdict']:<12} {v['target']}  (value: {v['value']})")


def cost_lines(report: dict[str, Any]) -> list[str]:
    c = report["costs"]
    lines = []
    fixed = c.get("fixed", {})
    for n in (0, 1):
        if f"{n}_item_seconds" in fixed:
            lines.append(f"fixed cost, {n}-item batch (register + flow, median of "
                         f"{len(fixed[f'{n}_item_runs'])}): {fixed[f'{n}_item_seconds']:.3f} s")
        elif f"{n}_item_error" in fixed:
            lines.append(f"{n}-item batch not supported: {fixed[f'{n}_item_error']}")
    loads = [m.get("loadavg_1m_before", 0.0) for r in report["results"].values()
             for m in r.values() if isinstance(m, dict)]
    if loads and max(loads) > 0.75 * (os.cpu_count() or 1):
        lines.append(f"WARNING: other work was running on this machine (1-min load average up to "
                     f"{max(loads):.1f} on {os.cpu_count()} CPUs before a measurement); figures "
                     "are noisier than on an idle machine")
    pc = c.get("per_chunk")
    if pc:
        lines.append(
            f"per chunk (difference method, {pc['rows']:,} rows): {pc['chunks_small']} chunks of "
            f"{pc['chunk_size_small']} took {pc['seconds_small']:.3f} s vs {pc['chunks_default']}"
            f" chunks of {pc['chunk_size_default']} {pc['seconds_default']:.3f} s → "
            f"{1000 * pc['seconds_per_extra_chunk']:.1f} ms wall per extra chunk "
            f"(with {report['chunk_workers']} chunks in parallel)")
    for size, r in sorted(report["results"].items(), key=lambda kv: int(kv[0])):
        b = r["batchops"]
        outside = b["flow_seconds"] - b["chunk_exec_busy_seconds"]
        per = outside / b["chunks"] if b["chunks"] else 0.0
        lines.append(
            f"{int(size):,} rows: flow {b['flow_seconds']:.3f} s = "
            f"{b['chunk_exec_busy_seconds']:.3f} s with ≥1 chunk executing (execute_chunk: DB "
            f"work + record) + {outside:.3f} s outside any chunk ({1000 * per:.1f} ms per chunk "
            f"over {b['chunks']} chunks); register {b['register_seconds']:.3f} s; peak RSS "
            f"{b['hwm_mb_after_run']:.0f} MB")
        cpu = b.get("cpu_seconds")
        if cpu:
            lines.append(
                f"{int(size):,} rows: CPU seconds during the {cpu['wall']:.2f} s run — batchops "
                f"process {cpu['this_process']:.2f}, Prefect server "
                f"{cpu.get('prefect_server', float('nan')):.2f}, PostgreSQL "
                f"{cpu['postgres']:.2f} (machine: {os.cpu_count()} CPUs)")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000",
                    help="comma-separated batch sizes (default 1000,10000,100000)")
    ap.add_argument("--dup-mode", choices=DUP_MODES, default="near",
                    help="near: the reused email is 50 rows back (same chunk); far: about half "
                         "way back (an earlier chunk, so chunks depend on each other)")
    ap.add_argument("--seq-sample", type=int, default=10_000,
                    help="(a) measures at most this many rows and extrapolates")
    ap.add_argument("--b-connections", type=int, default=4,
                    help="connections (pages in flight) of baseline (b)")
    ap.add_argument("--per-chunk-rows", type=int, default=10_000,
                    help="rows of the per-chunk-cost comparison (chunks of 500 vs 100)")
    ap.add_argument("--no-per-chunk", action="store_true")
    ap.add_argument("--name", default="sql_target",
                    help="results file prefix (default sql_target: bench/results/sql_target-*)")
    ap.add_argument("--code", choices=("worktree", "head"), default="worktree",
                    help="which code batchops runs: a copy of the work tree taken at the start "
                         "(default) or the last commit")
    ap.add_argument("--keep-db", action="store_true",
                    help=f"reuse the database {DB_NAME} as it is (default: drop and create it)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure every method this many times and keep the median run")
    ap.add_argument("--settle", type=float, default=30.0,
                    help="wait up to this many seconds before each measurement for the machine "
                         "to be < 25%% busy (other processes skew the figures)")
    ap.add_argument("--profile", choices=("none", "cprofile", "py-spy"), default="none",
                    help="an extra, profiled batchops run at the largest size")
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy",
                    help="the py-spy executable for --profile py-spy")
    args = ap.parse_args(argv)
    sizes = sorted({int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()})
    RESULTS.mkdir(parents=True, exist_ok=True)

    workdir = Path(tempfile.mkdtemp(prefix="batchops-bench-"))
    log(f"work dir {workdir}")
    code = git_state()
    code["measured"] = args.code
    code_dir = snapshot_code(workdir / "code", args.code)
    log(f"measuring a frozen copy of the {args.code} code in {code_dir}")
    ensure_database(fresh=not args.keep_db)
    server = PrefectServer(workdir / "prefect-server", workdir / "prefect-server.log",
                           database=PREFECT_DB_NAME)
    log("starting prefect server …")
    server.start()
    log(f"prefect server healthy at {server.api_url} after {server.startup_seconds:.1f} s")
    os.environ["PREFECT_API_URL"] = server.api_url
    env = dict(os.environ)
    env.update(PREFECT_API_URL=server.api_url, PREFECT_HOME=str(workdir / "prefect-client"),
               PREFECT_LOCAL_STORAGE_PATH=str(workdir / "prefect-results"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               BATCHOPS_DATABASE_URL=DB_URL, BATCHOPS_CONFIG_FILE="/nonexistent",
               BATCHOPS_DEMO="true")
    bench = Bench(args, workdir, env, server.proc.pid if server.proc else None, code_dir)
    results: dict[int, dict[str, Any]] = {}
    costs: dict[str, Any] = {}
    try:
        reset_store()
        for i, size in enumerate(sizes):
            log(f"{size:,} rows: batchops …")
            r: dict[str, Any] = {"batchops": bench.batchops(size, fixed=(i == 0))}
            b = r["batchops"]
            if i == 0:
                costs["fixed"] = b.get("fixed", {})
            log(f"  batchops {b['seconds']:.3f} s (register {b['register_seconds']:.3f}, flow "
                f"{b['flow_seconds']:.3f}), verified={b['verified']} {b['problems'] or ''}")
            log(f"{size:,} rows: (a) per-row commits …")
            r["a"] = bench.repeated(bench.sequential, size)
            extrapolated = " (extrapolated)" if r["a"]["extrapolated"] else ""
            log(f"  (a) {r['a']['seconds']:.3f} s{extrapolated}")
            log(f"{size:,} rows: (b) asyncio multi-row …")
            r["b"] = bench.repeated(bench.paged, size)
            log(f"  (b) {r['b']['seconds']:.3f} s")
            log(f"{size:,} rows: (c) COPY …")
            r["c"] = bench.repeated(bench.copy, size)
            log(f"  (c) {r['c']['seconds']:.3f} s")
            r["prefect_server_memory"] = server.memory_mb()
            results[size] = r
        if not args.no_per_chunk:
            n = args.per_chunk_rows
            log(f"per-chunk cost: {n:,} rows in chunks of 100 …")
            small = bench.batchops(n, chunk_size=100)
            default = results[n]["batchops"] if n in results else bench.batchops(n)
            extra = small["chunks"] - default["chunks"]
            costs["per_chunk"] = {
                "rows": n, "chunk_size_small": 100, "chunks_small": small["chunks"],
                "seconds_small": small["seconds"], "chunk_size_default": default["chunk_size"],
                "chunks_default": default["chunks"], "seconds_default": default["seconds"],
                "seconds_per_extra_chunk": (small["seconds"] - default["seconds"]) / extra
                if extra else None, "verified": small["verified"] and default["verified"],
            }
        if args.profile != "none":
            log(f"profiled batchops run ({args.profile}) at {sizes[-1]:,} rows …")
            prof = bench.batchops(sizes[-1], profile=args.profile)
            costs["profiled_run"] = {k: prof.get(k) for k in (
                "seconds", "register_seconds", "flow_seconds", "verified", "py_spy")}
            costs["profiled_run"]["report"] = str(RESULTS / f"{args.name}-profile-latest.txt")
        server_memory = server.memory_mb()
    finally:
        log("stopping prefect server")
        server.stop()

    table = build_rows(results)
    pg_version = sql("SHOW server_version")[0][0]
    import prefect

    report: dict[str, Any] = {
        "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dup_mode": args.dup_mode,
        "code": code,
        "chunk_workers": next(iter(results.values()))["batchops"]["chunk_workers"],
        "environment": {"postgres": pg_version, "cpus": os.cpu_count(),
                        "python": platform.python_version(), "prefect": prefect.__version__,
                        "prefect_server_startup_seconds": round(server.startup_seconds, 2),
                        "prefect_server_memory": server_memory,
                        "peak_memory_method": "resource.getrusage(RUSAGE_SELF).ru_maxrss of "
                                              "the process running the batchops measurement"},
        "table": table,
        "results": {str(k): v for k, v in results.items()},
        "costs": costs,
    }
    report["targets"] = evaluate_targets(results, table)
    report["costs_text"] = cost_lines(report)
    report["verified"] = all(r["verified"] for r in table) and all(
        v.get("verified", True) for v in costs.values() if isinstance(v, dict))
    print_table(report)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(report, indent=2, default=str)
    name = args.name
    (RESULTS / f"{name}-{stamp}.json").write_text(text)
    (RESULTS / f"{name}-latest.json").write_text(text)
    (RESULTS / f"{name}-latest.md").write_text(markdown(report))
    log(f"wrote {RESULTS / f'{name}-{stamp}.json'}, {name}-latest.json/.md")
    if not report["verified"]:
        log("CORRECTNESS CHECK FAILED — see 'verified' and 'problems' in the JSON")
        return 2
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
