"""Dead letters: items that ran out of retries, listed, filtered and replayed as new batches.

Against the fault-injecting upstream, on SQLite and PostgreSQL; the API and the deployment
end to end (real uvicorn, the Prefect test server, a runner subprocess).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from batchops.checkpoints import CheckpointWriter
from batchops.dead_letters import (
    DeadLetter,
    DeadLetterFilter,
    DeadLetterReplay,
    DeadLetters,
    replay_dead_letters,
)
from batchops.devtools.upstream import UpstreamConfig, UpstreamState, running_upstream
from batchops.errors import DeadLetterNotFound, DeadLetterReplayed, EmptyReplayFilter
from batchops.registration import register_batch
from batchops.runtime import Runtime
from batchops.schemas import AttemptError, BatchState, ItemErrorBody, ItemResult, ItemState
from batchops.tables import item_checkpoints
from flows.process_batch import process_batch
from tests.conftest import _truncate_pg
from tests.runner import serving_deployments
from tests.test_api import (  # noqa: F401  (fixtures)
    assert_error,
    poll_until_finished,
    start_api,
)
from tests.test_cli import cli, flow_env, prefect_env  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("prefect_server")

DOWN = UpstreamConfig(error_rate=1.0, error_status=503, fail_paths={"/bad": 422, "/flaky": 500})


@pytest.fixture
def upstream() -> Iterator[tuple[str, UpstreamState]]:
    with running_upstream(DOWN) as (url, state):
        yield url, state


def upstreams(url: str) -> str:
    """Two upstreams (``crm``, ``erp``) on the one fault-injecting server, 3 attempts each."""
    spec = {"base_url": url, "retries": 2, "backoff_seconds": 0.01, "max_backoff_seconds": 0.05}
    return json.dumps({"crm": {"prefix": "/crm", **spec}, "erp": {"prefix": "/erp", **spec}})


@pytest.fixture
def rt(configure: Any, database_url: str, upstream: tuple[str, UpstreamState]) -> Runtime:
    runtime: Runtime = configure(database_url=database_url, upstreams=upstreams(upstream[0]))
    return runtime


def contact(i: int, prefix: str = "/crm", **extra: Any) -> dict[str, Any]:
    return {"id": f"c{i}", "method": "POST", "path": f"{prefix}/contacts",
            "body": {"name": f"Contact {i}"}, **extra}


def run(runtime: Runtime, ops: list[dict[str, Any]], scope: str = "default") -> str:
    batch_id, _ = register_batch(runtime, ops, scope=scope)
    process_batch(batch_id=batch_id)
    return batch_id


def find(runtime: Runtime, scope: str = "default", **fields: Any) -> list[DeadLetter]:
    replayed = fields.pop("replayed", None)
    return DeadLetters(runtime.store).find(scope, DeadLetterFilter(**fields), replayed=replayed)


def test_items_that_run_out_of_retries_become_dead_letters_with_every_attempt(
        rt: Runtime, upstream: tuple[str, UpstreamState]) -> None:
    _, state = upstream
    batch_id = run(rt, [
        contact(1, idempotency_key="k-1", headers={"X-Request-Id": "r1"}),
        contact(2),
        {"id": "bad", "method": "POST", "path": "/crm/bad", "body": {"x": 1}},
    ])

    results = list(rt.store.results.of_batch(batch_id))
    assert [(r.state, r.status) for r in results] == [
        (ItemState.FAILED, 503), (ItemState.FAILED, 503), (ItemState.FAILED, 422)]
    # The 422 was not worth retrying: an ordinary failed item, not a dead letter.
    first, second = find(rt)
    assert (first.batch_id, first.item_index, first.item_id) == (batch_id, 0, "c1")
    assert (first.target, first.resource, first.method, first.path) == (
        "http", "crm", "POST", "/crm/contacts")
    assert first.body == {"name": "Contact 1"} and first.headers == {"X-Request-Id": "r1"}
    assert (first.status, first.code, first.attempts) == (503, "unavailable", 3)
    assert "3 attempts" in first.message
    assert [(e.attempt, e.status, e.code) for e in first.attempt_errors] == [
        (1, 503, "unavailable"), (2, 503, "unavailable"), (3, 503, "unavailable")]
    times = [e.at for e in first.attempt_errors]
    assert times == sorted(times)
    assert (first.first_failed_at, first.last_failed_at) == (times[0], times[-1])
    assert first.created_at >= first.last_failed_at
    assert first.idempotency_key == "k-1"
    # The key the upstream saw for an item without one: stable, so a replay reuses it.
    assert second.idempotency_key == f"{batch_id}:1"
    assert sorted({r.key for r in state.requests if r.path == "/contacts"}) == sorted(
        ["k-1", f"{batch_id}:1"])
    assert first.replayed_batch_id is None and first.replayed_at is None


def test_dead_letters_filter_by_batch_target_resource_code_and_status(rt: Runtime) -> None:
    one = run(rt, [contact(1), contact(2, "/erp")])
    two = run(rt, [{"id": "f", "method": "PUT", "path": "/crm/flaky/1", "body": {}},
                   contact(3)])
    run(rt, [contact(4)], scope="someone-else")

    def ids(**fields: Any) -> list[tuple[str, str | None]]:
        return [(d.batch_id, d.item_id) for d in find(rt, **fields)]

    assert ids() == [(one, "c1"), (one, "c2"), (two, "f"), (two, "c3")]
    assert ids(batch_id=two) == [(two, "f"), (two, "c3")]
    assert ids(target="http") == ids()
    assert ids(target="sql") == []
    assert ids(resource="erp") == [(one, "c2")]
    assert ids(code="http_500") == [(two, "f")]
    assert ids(status=503, batch_id=two) == [(two, "c3")]
    assert ids(replayed=True) == []
    # Scoped per API key like batches.
    assert [d.item_id for d in find(rt, "someone-else")] == ["c4"]
    page = DeadLetters(rt.store).find("default", after=find(rt)[1].id, limit=1)
    assert [(d.batch_id, d.item_id) for d in page] == [(two, "f")]


def test_an_item_that_ran_out_of_retries_before_a_crash_still_becomes_a_dead_letter(
        rt: Runtime, upstream: tuple[str, UpstreamState]) -> None:
    """A run checkpointed c1's last failure and died before it recorded the chunk; the run that
    resumes answers c1 from its checkpoint (no request) and records its dead letter."""
    _, state = upstream
    batch_id, _ = register_batch(rt, [contact(1), contact(2)])
    [(ref, _)] = rt.store.chunks.plan(batch_id)
    op1 = rt.store.chunks.operations(batch_id, ref.chunk_index)[0]
    at = datetime.now(UTC)
    errors = [AttemptError(attempt=n, at=at, status=503, code="upstream_unavailable",
                           message="503 from upstream") for n in (1, 2, 3)]
    with CheckpointWriter(rt, batch_id, 0, "default") as writer:
        writer.put(op1, ItemResult(
            id="c1", index=0, status=503, state=ItemState.FAILED, attempts=3,
            attempt_errors=errors, error=ItemErrorBody(code="upstream_unavailable",
                                                       message="gave up after 3 attempts")))
    state.config = UpstreamConfig()  # healthy now: c2 succeeds

    process_batch(batch_id=batch_id)

    assert [r.key for r in state.requests] == [f"{batch_id}:1"]  # c1 was not sent again
    results = {r.id: r for r in rt.store.results.of_batch(batch_id)}
    assert (results["c1"].state, results["c1"].attempts) == (ItemState.FAILED, 3)
    assert results["c2"].state is ItemState.SUCCEEDED
    [dead] = find(rt, batch_id=batch_id)
    assert (dead.item_id, dead.code, dead.attempts) == ("c1", "upstream_unavailable", 3)
    assert [e.attempt for e in dead.attempt_errors] == [1, 2, 3]
    with rt.store.read() as conn:  # the chunk is recorded: its checkpoints are gone
        assert rt.store.checkpoints.of_items(conn, batch_id, 0, [0, 1]) == {}


def test_a_retry_keeps_what_a_chunk_that_could_not_finish_had_checkpointed(
        rt: Runtime, upstream: tuple[str, UpstreamState]) -> None:
    """The chunk's run answered c1 (201) and c2 (503 three times), checkpointed both, and the
    chunk then failed before it was recorded. ``POST /retry`` starts a new generation: c1 keeps
    its checkpointed success (no second request), c2 runs again, and no checkpoint is left."""
    _, state = upstream
    batch_id, _ = register_batch(rt, [contact(1), contact(2)])
    [(ref, _)] = rt.store.chunks.plan(batch_id)
    op1, op2 = rt.store.chunks.operations(batch_id, ref.chunk_index)
    rt.lifecycle.start(batch_id, None)
    with CheckpointWriter(rt, batch_id, 0, "default") as writer:
        writer.put(op1, ItemResult(id="c1", index=0, status=201, state=ItemState.SUCCEEDED,
                                   result={"id": "first-run"}))
        writer.put(op2, ItemResult(id="c2", index=1, status=503, state=ItemState.FAILED,
                                   attempts=3, error=ItemErrorBody(
                                       code="upstream_unavailable", message="gave up")))
    rt.lifecycle.finish(batch_id, BatchState.FAILED, "chunk 0: OperationalError")
    state.config = UpstreamConfig()  # healthy now

    assert rt.lifecycle.retry(batch_id) == 2
    process_batch(batch_id=batch_id)

    assert [r.key for r in state.requests] == [f"{batch_id}:1"]  # only c2 was sent
    results = {r.id: r for r in rt.store.results.of_batch(batch_id)}
    assert (results["c1"].status, results["c1"].result) == (201, {"id": "first-run"})
    assert (results["c2"].state, results["c2"].status) == (ItemState.SUCCEEDED, 201)
    status = rt.store.status(batch_id)
    assert (status.status, status.succeeded, status.failed) == (BatchState.COMPLETED, 2, 0)
    with rt.store.read() as conn:
        left = conn.execute(sa.select(sa.func.count()).select_from(item_checkpoints).where(
            item_checkpoints.c.batch_id == batch_id)).scalar_one()
    assert left == 0


def test_replay_by_ids_and_by_filter_runs_a_new_batch_and_marks_them_replayed(
        rt: Runtime, upstream: tuple[str, UpstreamState]) -> None:
    _, state = upstream
    first = run(rt, [contact(1, idempotency_key="k-1"), contact(2), contact(3, "/erp")])
    c1, c2, c3 = find(rt)
    state.config = UpstreamConfig()  # healthy again

    by_ids = replay_dead_letters(rt, "default", DeadLetterReplay(ids=[c1.id]))
    assert by_ids.replayed == 1 and by_ids.batch_id is not None
    process_batch(batch_id=by_ids.batch_id)

    [item] = rt.store.results.of_batch(by_ids.batch_id)
    assert (item.id, item.state, item.status) == ("c1", ItemState.SUCCEEDED, 201)
    assert rt.store.status(by_ids.batch_id).status == "completed"
    replayed = DeadLetters(rt.store).get("default", c1.id)
    assert replayed.replayed_batch_id == by_ids.batch_id and replayed.replayed_at is not None
    # Not replayed twice by accident; on purpose it is, and the key keeps the upstream from
    # applying it twice.
    with pytest.raises(DeadLetterReplayed) as refused:
        replay_dead_letters(rt, "default", DeadLetterReplay(ids=[c1.id]))
    assert refused.value.replayed == {c1.id: by_ids.batch_id}
    again = replay_dead_letters(rt, "default",
                                DeadLetterReplay(ids=[c1.id], include_replayed=True))
    assert again.batch_id is not None
    process_batch(batch_id=again.batch_id)
    assert state.executions["k-1"] == 1
    assert DeadLetters(rt.store).get("default", c1.id).replayed_batch_id == again.batch_id

    # By filter: the batch's dead letters not replayed yet (c2, c3), with their first keys.
    by_filter = replay_dead_letters(
        rt, "default", DeadLetterReplay.model_validate({"filter": {"batchId": first}}))
    assert by_filter.replayed == 2 and by_filter.batch_id is not None
    process_batch(batch_id=by_filter.batch_id)
    results = list(rt.store.results.of_batch(by_filter.batch_id))
    assert [(r.id, r.state) for r in results] == [("c2", ItemState.SUCCEEDED),
                                                  ("c3", ItemState.SUCCEEDED)]
    assert state.executions[f"{first}:1"] == 1 and state.executions[f"{first}:2"] == 1
    assert [d.replayed_batch_id for d in find(rt, batch_id=first)] == [
        again.batch_id, by_filter.batch_id, by_filter.batch_id]
    assert [d.id for d in find(rt, replayed=True)] == [c1.id, c2.id, c3.id]
    # Nothing left to replay: no batch.
    nothing = replay_dead_letters(rt, "default", DeadLetterReplay(all=True))
    assert (nothing.batch_id, nothing.replayed) == (None, 0)


def test_replay_refuses_an_empty_selection_and_unknown_ids(rt: Runtime) -> None:
    run(rt, [contact(1)])
    [dead] = find(rt)
    for empty in ({}, {"filter": {}}, {"ids": []}):
        with pytest.raises(EmptyReplayFilter):
            replay_dead_letters(rt, "default", DeadLetterReplay.model_validate(empty))
    with pytest.raises(DeadLetterNotFound) as unknown:
        replay_dead_letters(rt, "default", DeadLetterReplay(ids=[dead.id, 999_999]))
    assert unknown.value.ids == [999_999]
    with pytest.raises(DeadLetterNotFound):  # another key's dead letter does not exist
        replay_dead_letters(rt, "someone-else", DeadLetterReplay(ids=[dead.id]))
    assert find(rt)[0].replayed_batch_id is None  # nothing was marked


def test_a_retried_batch_that_now_succeeds_leaves_no_dead_letters(
        rt: Runtime, upstream: tuple[str, UpstreamState]) -> None:
    _, state = upstream
    batch_id = run(rt, [contact(1), contact(2)])
    assert len(find(rt, batch_id=batch_id)) == 2
    state.config = UpstreamConfig(fail_paths={"/contacts": 503})  # every attempt fails
    rt.lifecycle.retry(batch_id)
    process_batch(batch_id=batch_id)
    again = find(rt, batch_id=batch_id)
    assert [d.item_index for d in again] == [0, 1]  # one dead letter per item, the latest
    assert all(d.code == "http_503" for d in again)

    state.config = UpstreamConfig()
    rt.lifecycle.retry(batch_id)
    process_batch(batch_id=batch_id)
    assert rt.store.status(batch_id).succeeded == 2
    assert find(rt, batch_id=batch_id) == []


# -- the API and the deployment, end to end ----------------------------------------------------


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[tuple[str, UpstreamState]]:
    """One upstream for the module: the runner subprocess is configured with its URL."""
    with running_upstream(DOWN) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def replay_runner(prefect_server: None, pg_database: str,
                  shared_upstream: tuple[str, UpstreamState],
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A runner serving process-batch and replay-dead-letters on the session's PostgreSQL."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "BATCHOPS_DATABASE_URL": pg_database, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "BATCHOPS_UPSTREAMS": upstreams(shared_upstream[0])}
    log_path = tmp_path_factory.mktemp("replay-runner") / "runner.log"
    with serving_deployments(env, ("process-batch/process-batch",
                                   "replay-dead-letters/replay-dead-letters"), log_path):
        yield pg_database


@pytest.fixture
def down(replay_runner: str, shared_upstream: tuple[str, UpstreamState]) -> UpstreamState:
    """The shared upstream failing again, the PostgreSQL database emptied."""
    _truncate_pg(replay_runner)
    shared_upstream[1].reset(DOWN)
    return shared_upstream[1]


def test_api_lists_filters_and_replays_dead_letters(
        replay_runner: str, shared_upstream: tuple[str, UpstreamState], down: UpstreamState,
        start_api: Callable[..., httpx.Client]) -> None:  # noqa: F811
    api = start_api(database_url=replay_runner, upstreams=upstreams(shared_upstream[0]))
    # The sync answers are this test's starting point, not its subject: it waits up to the
    # cap (one CI run on a loaded 2-core machine passed the default 10 s and answered 202).
    sync = {"Prefer": "wait=60"}
    first = api.post("/batches", headers=sync, json={"operations": [
        contact(1), contact(2), {"id": "bad", "method": "POST", "path": "/crm/bad", "body": {}}]})
    assert first.status_code == 207, first.text
    second = api.post("/batches", headers=sync, json={"operations": [contact(3, "/erp")]})
    assert second.status_code == 207, second.text
    one, two = first.json()["batch_id"], second.json()["batch_id"]

    def listed(**params: Any) -> list[tuple[str, str]]:
        answer = api.get("/dead-letters", params=params)
        assert answer.status_code == 200, answer.text
        return [(d["batch_id"], d["item_id"]) for d in answer.json()["items"]]

    page = api.get("/dead-letters").json()
    assert [(d["batch_id"], d["item_id"]) for d in page["items"]] == [
        (one, "c1"), (one, "c2"), (two, "c3")]
    c1, c2, c3 = (d["id"] for d in page["items"])
    dead = page["items"][0]
    assert (dead["method"], dead["path"], dead["body"]) == (
        "POST", "/crm/contacts", {"name": "Contact 1"})
    assert (dead["status"], dead["code"], dead["attempts"]) == (503, "unavailable", 3)
    assert [e["attempt"] for e in dead["attempt_errors"]] == [1, 2, 3]
    assert listed(batch_id=two) == [(two, "c3")]
    assert listed(target="http") == listed() and listed(target="sql") == []
    assert listed(code="unavailable") == listed() and listed(code="http_422") == []
    assert listed(resource="erp") == [(two, "c3")]
    paged = api.get("/dead-letters", params={"limit": 2}).json()
    assert paged["next_after"] == c2
    assert listed(after=c2) == [(two, "c3")]
    assert api.get(f"/dead-letters/{c3}").json()["resource"] == "erp"
    assert_error(api.get("/dead-letters/999999"), 404, "dead_letter_not_found")

    # Refused: an empty selection, unknown ids, two selections at once, malformed ids.
    assert_error(api.post("/dead-letters/replay", json={}), 422, "empty_replay_filter")
    assert_error(api.post("/dead-letters/replay", json={"filter": {}}), 422,
                 "empty_replay_filter")
    unknown = assert_error(api.post("/dead-letters/replay", json={"ids": [c1, 999999]}), 404,
                           "dead_letter_not_found")
    assert unknown["ids"] == [999999]
    assert_error(api.post("/dead-letters/replay", json={"ids": [c1], "all": True}), 422,
                 "validation_failed")
    assert_error(api.post("/dead-letters/replay", json={"ids": ["one"]}), 422,
                 "validation_failed")
    assert listed(replayed=True) == []

    down.config = UpstreamConfig()  # healthy again
    by_ids = api.post("/dead-letters/replay", json={"ids": [c1]})
    assert by_ids.status_code == 202, by_ids.text
    assert by_ids.json()["replayed"] == 1
    final = poll_until_finished(api, by_ids.json()["status_url"])[-1]
    assert (final["status"], final["succeeded"], final["failed"]) == ("completed", 1, 0)
    by_filter = api.post("/dead-letters/replay", json={"filter": {"batchId": one}})
    assert by_filter.status_code == 202, by_filter.text
    assert by_filter.json()["replayed"] == 1  # c2: c1 was replayed already
    final = poll_until_finished(api, by_filter.json()["status_url"])[-1]
    assert (final["status"], final["succeeded"]) == ("completed", 1)
    items = api.get(f"/batches/{by_filter.json()['batch_id']}/results").json()["items"]
    assert [(i["id"], i["status"]) for i in items] == [("c2", 201)]

    replayed = api.get("/dead-letters", params={"replayed": True}).json()["items"]
    assert [(d["id"], d["replayed_batch_id"]) for d in replayed] == [
        (c1, by_ids.json()["batch_id"]), (c2, by_filter.json()["batch_id"])]
    again = assert_error(api.post("/dead-letters/replay", json={"ids": [c1]}), 409,
                         "dead_letter_replayed")
    assert again["ids"] == [c1]
    nothing = api.post("/dead-letters/replay", json={"filter": {"batch_id": one}})
    assert (nothing.status_code, nothing.json()["replayed"]) == (200, 0)
    assert down.executions[f"{one}:0"] == 1 and down.executions[f"{one}:1"] == 1


def test_the_replay_deployment_runs_dead_letters_as_a_new_batch(
        replay_runner: str, shared_upstream: tuple[str, UpstreamState], down: UpstreamState,
        configure: Any) -> None:
    from prefect.deployments import run_deployment

    runtime: Runtime = configure(database_url=replay_runner,
                                 upstreams=upstreams(shared_upstream[0]))
    failed = run(runtime, [contact(1), contact(2, "/erp"), contact(3, "/erp")])
    assert len(find(runtime, batch_id=failed)) == 3
    down.config = UpstreamConfig()

    def replay(**parameters: Any) -> None:
        flow_run = run_deployment("replay-dead-letters/replay-dead-letters",
                                  parameters=parameters, timeout=180)
        assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state

    replay(filter={"resource": "erp"})
    erp = find(runtime, resource="erp")
    [new_batch] = {d.replayed_batch_id for d in erp}
    assert new_batch is not None
    assert runtime.store.status(new_batch).status == "completed"
    assert [(r.id, r.state) for r in runtime.store.results.of_batch(new_batch)] == [
        ("c2", ItemState.SUCCEEDED), ("c3", ItemState.SUCCEEDED)]
    # A second run finds nothing left to replay (no new batch); the crm one is still waiting.
    replay(filter={"resource": "erp"})
    assert {d.replayed_batch_id for d in find(runtime, resource="erp")} == {new_batch}
    assert [d.item_id for d in find(runtime, replayed=False)] == ["c1"]
    assert down.executions[f"{failed}:1"] == 1 and f"{failed}:0" not in down.executions


def test_cli_lists_and_replays_dead_letters(
        configure: Any, tmp_path: Any, upstream: tuple[str, UpstreamState],
        flow_env: None) -> None:  # noqa: F811
    url, state = upstream
    runtime: Runtime = configure(database_url=f"sqlite:///{tmp_path / 'cli.db'}",
                                 upstreams=upstreams(url))
    batch_id = run(runtime, [contact(1), contact(2)])

    listed = cli("dead-letters", "list", "--batch-id", batch_id, "--json")
    dead = [json.loads(line) for line in listed.output.splitlines()]
    assert [(d["item_id"], d["attempts"], d["code"]) for d in dead] == [
        ("c1", 3, "unavailable"), ("c2", 3, "unavailable")]
    refused = cli("dead-letters", "replay")
    assert refused.exit_code == 2 and "empty selection" in refused.output

    state.config = UpstreamConfig()
    replayed = cli("dead-letters", "replay", str(dead[0]["id"]))
    assert replayed.exit_code == 0, replayed.output
    rest = cli("dead-letters", "replay", "--batch-id", batch_id)
    assert rest.exit_code == 0, rest.output
    assert cli("dead-letters", "list", "--not-replayed", "--json").output == ""
    assert "No dead letters" in cli("dead-letters", "replay", "--all").output
