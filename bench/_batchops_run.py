"""One batchops measurement in a process of its own (so its RSS high-water mark is its own).

Run by ``bench.sql_target`` as ``python -m bench._batchops_run --size N --out FILE ...`` with
``PREFECT_API_URL``, ``BATCHOPS_DATABASE_URL`` and ``BATCHOPS_CONFIG_FILE`` already in the
environment. It warms up (one 1-item flow run, not measured), optionally measures the fixed
cost of 0- and 1-item batches, then times ``register_batch`` + ``process_batch`` on the data
set, checks the outcome against the expectation, and writes a JSON report.

The breakdown comes from thin timing wrappers put around core functions in this process only
(nothing in the core is changed): chunk execution, loading a chunk's operations, the sql
target's statements, recording results, and the flow's artifact calls.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import json
import os
import pstats
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench._data import Dataset, make_dataset


def _cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds of ``pids`` and their reaped children (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime + stime, and cutime + cstime: the CPU of children that exited and were
        # reaped (PostgreSQL backends of connections closed during the run)
        total += sum(int(f) for f in fields[11:15])
    return total / tick


def _postgres_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in ("postgres", "postmaster"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids



@contextmanager
def py_spy_attached(py_spy: str | None, out: Path | None) -> Iterator[None]:
    """``py-spy record`` (raw, 100 Hz, non-blocking) of this process while the block runs."""
    if not py_spy or not out:
        yield
        return
    spy = subprocess.Popen([py_spy, "record", "--pid", str(os.getpid()), "--rate", "100",
                            "--format", "raw", "--nonblocking", "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2.0)  # let it attach
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output and exits
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


class CpuMeter:
    """CPU seconds used while running: this process, the Prefect server, PostgreSQL."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid

    def _sample(self) -> dict[str, float]:
        from bench._prefect_server import process_tree

        usage = resource.getrusage(resource.RUSAGE_SELF)
        out = {"this_process": usage.ru_utime + usage.ru_stime,
               "postgres": _cpu_seconds(_postgres_pids())}
        if self.server_pid:
            out["prefect_server"] = _cpu_seconds(process_tree(self.server_pid))
        return out

    def __enter__(self) -> CpuMeter:
        self.wall = time.perf_counter()
        self.before = self._sample()
        return self

    def __exit__(self, *_: Any) -> None:
        after = self._sample()
        self.result = {k: round(after[k] - v, 2) for k, v in self.before.items()}
        self.result["wall"] = round(time.perf_counter() - self.wall, 2)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _hwm_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


class Timers:
    """Seconds and calls per name (thread-safe enough: appends and dict updates under the GIL)."""

    def __init__(self) -> None:
        self.enabled = False
        self.totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        self.chunks: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        if not self.enabled:
            return
        with self._lock:
            entry = self.totals[name]
            entry[0] += 1
            entry[1] += seconds

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if asyncio.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    ended = time.perf_counter()
                    self.add(name, ended - started)
                    if name == "chunk.execute_chunk" and self.enabled:
                        self.chunks.append((started, ended))
            return awrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - started)
        return wrapper

    def reset(self) -> None:
        self.totals.clear()
        self.chunks.clear()

    def report(self) -> dict[str, dict[str, float]]:
        return {name: {"calls": int(calls), "seconds": round(secs, 4)}
                for name, (calls, secs) in sorted(self.totals.items())}


TIMERS = Timers()


def instrument() -> None:
    """Timing wrappers around the core's steps (this process only)."""
    import batchops.batch_steps as batches_mod
    import flows.process_batch as flow_mod
    import tasks.chunks as chunks_mod
    from batchops.chunk_records import ChunkRecords
    from batchops.idempotency import IdempotencyStore
    from batchops.planning import ChunkPlanner
    from batchops.results import ResultPages
    from batchops.targets.sql import SqlTarget
    from batchops.validation import OperationValidator

    chunks_mod.execute_chunk = TIMERS.wrap("chunk.execute_chunk", chunks_mod.execute_chunk)
    for cls, names in ((ChunkRecords, ("operations", "open", "record", "insert", "plan")),
                       (IdempotencyStore, ("lookup", "save")),
                       (ResultPages, ("of_batch",)),
                       (SqlTarget, ("execute_on",)),
                       (OperationValidator, ("check",)),
                       (ChunkPlanner, ("_close",))):
        for name in names:
            if hasattr(cls, name):  # the core changes; wrap what is there
                setattr(cls, name, TIMERS.wrap(f"{cls.__name__}.{name}", getattr(cls, name)))
    for mod, prefix, names in (
            (flow_mod, "flow", ("create_progress_artifact", "update_progress_artifact")),
            (batches_mod, "finish", ("create_table_artifact", "create_markdown_artifact",
                                     "table_rows"))):
        for name in names:
            if hasattr(mod, name):
                setattr(mod, name, TIMERS.wrap(f"{prefix}.{name}", getattr(mod, name)))


class ThreadProfiles:
    """cProfile in every thread: the main one now, each new thread when it starts."""

    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []

    def _hook(self, *_: Any) -> None:
        p = cProfile.Profile()
        self.profiles.append(p)
        p.enable()  # replaces this hook for the thread

    def start(self) -> None:
        threading.setprofile(self._hook)
        self._hook()

    def stop(self, path: Path, top: int = 45) -> None:
        threading.setprofile(None)  # type: ignore[arg-type]
        stats: pstats.Stats | None = None
        for p in self.profiles:
            try:
                p.create_stats()
            except Exception:  # a profile that never ran
                continue
            if stats is None:
                stats = pstats.Stats(p)
            else:
                stats.add(p)
        if stats is None:
            return
        stats.dump_stats(str(path.with_suffix(".pstats")))
        with path.open("w") as out:
            stats.stream = out  # type: ignore[attr-defined]
            out.write(f"cProfile over {len(self.profiles)} threads (summed thread time)\n\n")
            out.write("=== by cumulative time ===\n")
            stats.sort_stats("cumulative").print_stats(top)
            out.write("\n=== by internal (self) time ===\n")
            stats.sort_stats("tottime").print_stats(top)


def _flow_once(runtime: Any, process_batch: Any, operations: list[dict[str, Any]],
               chunk_size: int | None = None) -> tuple[Any, str, float, float]:
    from batchops.registration import register_batch

    started = time.perf_counter()
    batch_id, _ = register_batch(runtime, operations, max_operations=10_000_000,
                                 chunk_size=chunk_size, source="bench")
    registered = time.perf_counter()
    summary = process_batch(batch_id=batch_id)
    return summary, batch_id, registered - started, time.perf_counter() - registered


def _truncate_users(runtime: Any) -> None:
    with runtime.store.engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE users")


def _busy_union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def _verify(runtime: Any, ds: Dataset, batch_id: str, summary: Any) -> list[str]:
    """The users table and the recorded items (read back through the store) against the
    expectation."""
    from batchops.schemas import ItemState

    with runtime.store.engine.connect() as conn:
        users = conn.exec_driver_sql("SELECT count(*) FROM users").scalar_one()
    recorded = 0
    failed: list[tuple[int, str | None]] = []
    for item in runtime.store.results.of_batch(batch_id):
        recorded += 1
        if item.state is ItemState.FAILED:
            failed.append((item.index, item.error.code if item.error else None))
    problems = []
    if users != ds.successes:
        problems.append(f"users has {users} rows, expected {ds.successes}")
    if summary.total != ds.size or summary.failed != ds.duplicates \
            or summary.succeeded != ds.successes:
        problems.append(f"summary {summary.model_dump()} != total {ds.size}, succeeded "
                        f"{ds.successes}, failed {ds.duplicates}")
    if recorded != ds.size:
        problems.append(f"{recorded} items recorded, expected {ds.size}")
    if [i for i, _ in failed] != ds.dup_indexes:
        problems.append("the failed items are not exactly the duplicate-email rows")
    codes = {c for _, c in failed}
    if failed and codes != {"unique_violation"}:
        problems.append(f"failure codes {sorted(map(str, codes))}, expected unique_violation")
    return problems


def _measured_run(runtime: Any, process_batch: Any, ds: Dataset,
                  operations: list[dict[str, Any]], args: argparse.Namespace,
                  profiles: ThreadProfiles | None) -> dict[str, Any]:
    with py_spy_attached(args.py_spy, args.py_spy_out):
        TIMERS.reset()
        TIMERS.enabled = True
        if profiles is not None:
            profiles.start()
        with CpuMeter(args.server_pid) as cpu:
            summary, batch_id, reg_s, flow_s = _flow_once(runtime, process_batch, operations,
                                                          args.chunk_size)
        if profiles is not None:
            profiles.stop(args.cprofile)
        TIMERS.enabled = False
    chunk_seconds = [e - s for s, e in TIMERS.chunks]
    problems = _verify(runtime, ds, batch_id, summary)
    return {
        "batch_id": batch_id, "register_seconds": round(reg_s, 4),
        "flow_seconds": round(flow_s, 4), "seconds": round(reg_s + flow_s, 4),
        "cpu_seconds": cpu.result, "chunks": len(TIMERS.chunks),
        "chunk_exec_sum_seconds": round(sum(chunk_seconds), 4),
        "chunk_exec_busy_seconds": round(_busy_union(TIMERS.chunks), 4),
        "chunk_exec_median_seconds": round(statistics.median(chunk_seconds), 4)
        if chunk_seconds else None,
        "breakdown": TIMERS.report(), "summary": summary.model_dump(),
        "verified": not problems, "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--dup-mode", default="near")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--fixed", action="store_true", help="also measure 0- and 1-item batches")
    ap.add_argument("--fixed-repeat", type=int, default=3)
    ap.add_argument("--cprofile", type=Path, default=None, help="write a cProfile report here")
    ap.add_argument("--py-spy", default=None, help="py-spy executable: sample the measured run")
    ap.add_argument("--py-spy-out", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="measured runs (the median is kept)")
    ap.add_argument("--server-pid", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    profiles = ThreadProfiles() if args.cprofile else None
    t_import = time.perf_counter()
    from batchops.runtime import get_runtime
    from flows.process_batch import process_batch

    runtime = get_runtime()
    instrument()
    out: dict[str, Any] = {"size": args.size, "dup_mode": args.dup_mode,
                           "chunk_size": args.chunk_size or runtime.settings.execution.chunk_size,
                           "chunk_workers": runtime.settings.execution.chunk_workers,
                           "default_concurrency": runtime.settings.execution.default_concurrency,
                           "import_and_runtime_seconds": round(time.perf_counter() - t_import, 3),
                           "code_path": str(Path(sys.modules["batchops"].__file__ or "").parent)}

    # Warm-up: the first flow run in a process pays for client setup, imports, caches.
    warm = make_dataset(1, args.dup_mode)
    _truncate_users(runtime)
    t = time.perf_counter()
    _flow_once(runtime, process_batch, warm.operations())
    out["warmup_seconds"] = round(time.perf_counter() - t, 3)

    if args.fixed:
        fixed: dict[str, Any] = {}
        for n in (0, 1):
            runs = []
            for _ in range(args.fixed_repeat):
                _truncate_users(runtime)
                ops = make_dataset(n, args.dup_mode).operations()
                try:
                    _, _, reg, flow = _flow_once(runtime, process_batch, ops)
                except Exception as exc:  # 0-item batches may be refused
                    fixed[f"{n}_item_error"] = f"{type(exc).__name__}: {exc}"
                    break
                runs.append(reg + flow)
            if runs:
                fixed[f"{n}_item_seconds"] = round(statistics.median(runs), 4)
                fixed[f"{n}_item_runs"] = [round(r, 4) for r in runs]
        out["fixed"] = fixed

    ds = make_dataset(args.size, args.dup_mode)
    _truncate_users(runtime)
    out["rss_mb_before_data"] = round(_rss_mb(), 1)
    out["hwm_mb_before_data"] = round(_hwm_mb(), 1)
    operations = ds.operations()
    out["rss_mb_with_data"] = round(_rss_mb(), 1)

    runs = []
    for attempt in range(args.repeat):
        if attempt:
            _truncate_users(runtime)
            with runtime.store.engine.connect() as conn:
                conn.exec_driver_sql("CHECKPOINT")
        runs.append(_measured_run(runtime, process_batch, ds, operations, args,
                                  profiles if attempt == 0 else None))
    # The median run (by seconds) speaks for the repeats; every run is kept.
    ranked = sorted(runs, key=lambda r: r["seconds"])
    out.update(ranked[(len(ranked) - 1) // 2])
    out["runs"] = [{k: r[k] for k in ("seconds", "register_seconds", "flow_seconds",
                                      "verified", "cpu_seconds")} for r in runs]
    out["hwm_mb_after_run"] = round(_hwm_mb(), 1)
    out["rss_mb_after_run"] = round(_rss_mb(), 1)
    problems = [p for r in runs for p in r["problems"]]
    out["verified"] = not problems
    out["problems"] = problems
    args.out.write_text(json.dumps(out, indent=2))
    return 0 if not problems else 3


if __name__ == "__main__":
    sys.exit(main())
