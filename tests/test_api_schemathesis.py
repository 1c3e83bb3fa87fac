"""Schemathesis against the OpenAPI document of a real server: no request gets a 5xx.

The server runs as in ``test_api`` (uvicorn, the Prefect test server, PostgreSQL, a runner
serving the deployment, so that generated async batches can start). Every operation of the
document gets valid and invalid requests generated from it.
"""

from __future__ import annotations

from collections.abc import Callable

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
