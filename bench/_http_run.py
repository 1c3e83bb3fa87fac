"""One batchops http-target measurement in a process of its own.

Run by ``bench.http_target`` as ``python -m bench._http_run --size N --upstream URL
--config JSON --out FILE`` with ``PREFECT_API_URL``, ``BATCHOPS_DATABASE_URL`` and
``BATCHOPS_UPSTREAMS`` (one upstream ``crm`` under ``/crm``) in the environment. It warms up
(a 1-item flow run, not measured), resets the upstream to the scenario's configuration, then
times ``register_batch`` + ``process_batch`` on ``N`` ``POST /crm/contacts`` operations and
writes a JSON report: seconds, the summary read back from the store, the limits' Prefect
calls (``batchops_upstream_limit_acquisitions``), the rate budget's coordination calls
(``batchops_upstream_rate_coordination_calls``), retries and the AIMD gauges' final values.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench._batchops_run import CpuMeter, _flow_once, py_spy_attached

UPSTREAM = "crm"


def contacts(size: int) -> list[dict[str, Any]]:
    """``size`` independent creates (no record in common: the planner orders no chunk)."""
    return [{"id": f"c{i}", "method": "POST", "path": "/crm/contacts",
             "body": {"name": f"Contact {i}"}} for i in range(size)]


def _metrics() -> dict[str, float]:
    """This process's http-target counters for the upstream (prometheus default registry)."""
    from prometheus_client import REGISTRY

    out: dict[str, float] = {}
    for metric in REGISTRY.collect():
        if not metric.name.startswith("batchops_upstream_"):
            continue
        for sample in metric.samples:
            if sample.labels.get("upstream") != UPSTREAM or sample.name.endswith("_created"):
                continue
            extra = [v for k, v in sorted(sample.labels.items()) if k != "upstream"]
            out[":".join([sample.name, *extra])] = sample.value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="the upstream's base URL")
    ap.add_argument("--config", required=True, help="UpstreamConfig JSON of the scenario")
    ap.add_argument("--server-pid", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--py-spy", default=None, help="py-spy executable: profile the measured run")
    ap.add_argument("--py-spy-out", type=Path, default=None, help="its raw output")
    args = ap.parse_args(argv)

    from batchops.devtools.upstream import UpstreamConfig, configure_upstream
    from batchops.runtime import get_runtime
    from batchops.schemas import ItemState
    from flows.process_batch import process_batch

    runtime = get_runtime()
    config = UpstreamConfig.model_validate_json(args.config)
    configure_upstream(args.upstream, UpstreamConfig(latency_ms=config.latency_ms))
    _flow_once(runtime, process_batch, contacts(1))  # warm-up: clients, limits, imports
    configure_upstream(args.upstream, config)

    before = _metrics()
    with py_spy_attached(args.py_spy, args.py_spy_out), CpuMeter(args.server_pid) as cpu:
        summary, batch_id, reg_s, flow_s = _flow_once(runtime, process_batch,
                                                      contacts(args.size))
    after = _metrics()
    counters = {k: round(v - before.get(k, 0.0), 3) for k, v in after.items()
                if "concurrency_limit" not in k and "effective_rate" not in k}
    states: Counter[str] = Counter()
    attempts = 0
    for item in runtime.store.results.of_batch(batch_id):
        states[item.state.value] += 1
        attempts += item.attempts
    out = {
        "size": args.size, "batch_id": batch_id, "register_seconds": round(reg_s, 4),
        "flow_seconds": round(flow_s, 4), "seconds": round(reg_s + flow_s, 4),
        "summary": summary.model_dump(), "recorded": dict(states), "attempts": attempts,
        "succeeded": states.get(ItemState.SUCCEEDED.value, 0),
        "counters": counters,
        "gcl_acquisitions": {kind: counters.get(
            f"batchops_upstream_limit_acquisitions_total:{kind}", 0.0)
            for kind in ("concurrency",)},
        "aimd_limit_final": after.get("batchops_upstream_concurrency_limit"),
        "effective_rate_final": after.get("batchops_upstream_effective_rate"),
        "coordination_calls": sum(
            v for k, v in counters.items()
            if k.startswith("batchops_upstream_rate_coordination_calls_total")),
        "concurrency": runtime.store.get_batch(batch_id).concurrency,
        "chunk_workers": runtime.settings.execution.chunk_workers,
        "chunk_size": runtime.settings.execution.chunk_size,
        "cpu_seconds": cpu.result,
    }
    out["verified"] = out["succeeded"] == args.size and summary.succeeded == args.size
    args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
