"""Flow runs of a deployment started through :mod:`batchops.orchestration`, on the session's
Prefect test server: the deployment's id is remembered, and looked up again when the
deployment was deleted or re-created since."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from uuid import UUID

import pytest

from batchops import orchestration


@pytest.fixture
def deployment_name(prefect_server: None) -> Iterator[str]:
    """``flow/deployment`` of a fresh deployment (no work pool: nothing runs it)."""
    from prefect import get_client

    flow_name, name = "batchops-orchestration-test", f"d-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(flow_name)
        client.create_deployment(flow_id=flow_id, name=name)
    yield f"{flow_name}/{name}"
    with get_client(sync_client=True) as client:
        for deployment in client.read_deployments():
            if deployment.name == name:
                client.delete_deployment(deployment.id)


def _recreate(full_name: str) -> UUID:
    """Delete the deployment and create one of the same name; the new one's id."""
    from prefect import get_client

    flow_name, name = full_name.split("/")
    with get_client(sync_client=True) as client:
        old = client.read_deployment_by_name(full_name)
        client.delete_deployment(old.id)
        new_id: UUID = client.create_deployment(
            flow_id=client.create_flow_from_name(flow_name), name=name)
    assert new_id != old.id
    return new_id


def test_a_run_is_scheduled_for_the_deployment_and_its_key_gives_it_back(
        deployment_name: str) -> None:
    first = orchestration.start_deployment_run(
        deployment_name, {"batch_id": "b1"}, name="batch-b1", idempotency_key="k-b1")
    again = orchestration.start_deployment_run(
        deployment_name, {"batch_id": "b1"}, name="batch-b1", idempotency_key="k-b1")

    assert again.id == first.id
    assert first.name == "batch-b1"
    assert first.parameters == {"batch_id": "b1"}
    assert first.state is not None and first.state.is_scheduled()


def test_runs_go_to_the_re_created_deployment_after_the_old_one_is_deleted(
        deployment_name: str) -> None:
    before = orchestration.start_deployment_run(
        deployment_name, {}, name="batch-before", idempotency_key=uuid.uuid4().hex)
    new_id = _recreate(deployment_name)

    after = orchestration.start_deployment_run(
        deployment_name, {}, name="batch-after", idempotency_key=uuid.uuid4().hex)

    assert before.deployment_id != new_id
    assert after.deployment_id == new_id


def test_a_missing_deployment_is_reported_as_not_found(prefect_server: None) -> None:
    from prefect.exceptions import ObjectNotFound

    with pytest.raises(ObjectNotFound):
        orchestration.start_deployment_run(
            "batchops-orchestration-test/none-such", {}, name="x",
            idempotency_key=uuid.uuid4().hex)
