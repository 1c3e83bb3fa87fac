"""Schemathesis against the OpenAPI document of a real server, and hypothesis with hostile
values in ``POST /batches`` (integers past every column's range, lone surrogates, huge
strings): no request gets a 5xx.

The server runs as in ``test_api`` (uvicorn, the Prefect test server, PostgreSQL, a runner
serving the deployment, so that generated async batches can start). Every operation of the
document gets valid and invalid requests generated from it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.test_api import deployment_runner, start_api  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("prefect_server")

EXAMPLES_PER_OPERATION = 40


def test_no_generated_request_gets_a_server_error(
        deployment_runner: str,  # noqa: F811
        start_api: Callable[..., httpx.Client],  # noqa: F811
) -> None:
    api = start_api(database_url=deployment_runner, quota_ops_per_minute=0,
                    sync_wait_seconds=2)
    schema = schemathesis.openapi.from_url(f"{api.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /batches", "GET /batches/{batch_id}/status", "GET /batches/{batch_id}/results"}

    for operation in operations:
        cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                          operation.as_strategy(GenerationMode.NEGATIVE))

        @given(case=cases)
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def no_server_error(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=[not_a_server_error])

        no_server_error()


# -- hostile values in POST /batches ------------------------------------------------------------

HOSTILE_EXAMPLES = 30
# Integers past every column's range (32- and 64-bit), and their neighbours inside it.
EDGE_INTEGERS = [2**31 - 1, 2**31, -(2**31) - 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30,
                 -(10**30)]
hostile_integers = st.sampled_from(EDGE_INTEGERS) | st.integers(-(2**70), 2**70)
# Lone UTF-16 surrogates reach the API as JSON escapes (json.dumps writes "\ud800").
lone_surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                          min_size=1, max_size=2).map(lambda s: f"a{s}b")
hostile_texts = (st.text(max_size=12) | lone_surrogates | st.just("x" * 100_000)
                 | st.sampled_from(["=1+2", "a\r=1+2", "\u0661", " 1", "+1", "01", "-0", ""]))
hostile_values = st.one_of(st.none(), st.booleans(), hostile_integers, st.floats(), hostile_texts,
                           st.lists(st.integers(), max_size=2),
                           st.dictionaries(hostile_texts, st.integers(), max_size=2))
columns = st.sampled_from(["id", "email", "name", "status", "total", "price"]) | hostile_texts
paths = st.builds(lambda resource, key, item: f"/{resource}/{key}" if item else f"/{resource}",
                  st.sampled_from(["users", "orders", "products"]),
                  hostile_integers.map(str) | hostile_texts, st.booleans())
operations = st.fixed_dictionaries(
    {"method": st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]), "path": paths},
    optional={"id": hostile_texts | hostile_integers,
              "body": st.dictionaries(columns, hostile_values, max_size=4),
              "idempotency_key": hostile_texts})
batches = st.fixed_dictionaries(
    {"operations": st.lists(operations, max_size=3)},
    optional={"mode": st.sampled_from(["sync", "auto"]), "concurrency": hostile_integers,
              "deadline_seconds": hostile_integers | st.floats()})


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
def test_hostile_batches_get_a_documented_answer_and_never_a_server_error(
        start_api: Callable[..., httpx.Client],  # noqa: F811
        database_url: str) -> None:
    api = start_api(database_url=database_url, quota_ops_per_minute=0, sync_wait_seconds=5)

    @given(batch=batches)
    @settings(max_examples=HOSTILE_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def documented_answer(batch: dict[str, Any]) -> None:
        answer = api.post("/batches", content=json.dumps(batch),
                          headers={"Content-Type": "application/json"})
        assert answer.status_code < 500, answer.text[:2000]
        body = answer.json()
        if answer.status_code >= 400:
            assert body["error"]["code"] and body["error"]["message"], body
            assert len(answer.content) < 200_000  # a huge value is not echoed whole
        elif answer.status_code in (200, 207):
            assert len(body["results"]) == len(batch["operations"]), body
            assert body["status"] in ("completed", "failed", "cancelled"), body
            # A value the validator let through never aborts a chunk (500 chunk_failed).
            assert all(item["status"] < 500 for item in body["results"]), body
        else:
            assert answer.status_code == 202, answer.text

    documented_answer()
