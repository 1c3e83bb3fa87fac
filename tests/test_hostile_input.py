"""Hostile values at the API: every one a clear 4xx with a stable code, and nothing run or
stored. A real uvicorn server (as ``batchops api`` serves it), the Prefect test server, and
the store on SQLite and on PostgreSQL."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from batchops.runtime import get_runtime
from batchops.schemas import BatchState
from tests.test_api import assert_error, start_api, table_rows, user  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("prefect_server")

StartApi = Callable[..., httpx.Client]
INT32 = "from -2147483648 to 2147483647"
IMPORT_USERS = {"resource": "users", "method": "POST"}
CSV_BODY = {"Content-Type": "text/csv"}
JSON_BODY = {"Content-Type": "application/json"}


@pytest.fixture
def api(start_api: StartApi, database_url: str) -> httpx.Client:  # noqa: F811
    return start_api(database_url=database_url)


def nothing_stored() -> bool:
    runtime = get_runtime()
    return (table_rows(runtime, "batches") == [] and table_rows(runtime, "users") == []
            and table_rows(runtime, "orders") == [])


def between_valid_users(op: dict[str, Any]) -> dict[str, Any]:
    """A sync batch of ``op`` between two valid inserts, which must not run either."""
    return {"mode": "sync", "operations": [user(1), op, user(2)]}


# -- item 2: integers out of the column's range -------------------------------------------------


@pytest.mark.parametrize("op", [
    {"method": "PUT", "path": "/orders/18446744073709551616", "body": {"status": "x"}},
    {"method": "GET", "path": "/orders/99999999999999999999999"},
    {"method": "DELETE", "path": "/orders/-99999999999999999999999"},
    {"method": "PATCH", "path": "/orders/2147483648", "body": {"status": "x"}},
    {"method": "POST", "path": "/orders", "body": {"id": 10**30, "status": "x"}},
    {"method": "POST", "path": "/orders", "body": {"id": 2**63, "status": "x"}},
    {"method": "POST", "path": "/orders", "body": {"id": -(2**31) - 1, "status": "x"}},
], ids=["put-2**64", "get-10**23", "delete-minus-10**23", "patch-2**31", "body-10**30",
        "body-2**63", "body-below-int32"])
def test_an_integer_out_of_the_columns_range_is_a_422_naming_the_range_and_nothing_runs(
        api: httpx.Client, op: dict[str, Any]) -> None:
    answer = api.post("/batches", json=between_valid_users({"id": "bad", **op}))

    error = assert_error(answer, 422, "validation_failed")
    [problem] = error["errors"]
    assert (problem["index"], problem["id"]) == (1, "bad")
    assert problem["field"] in ("path", "body.id")
    assert "out of range" in problem["message"] and INT32 in problem["message"]
    assert nothing_stored()


def test_the_largest_and_smallest_32_bit_ids_run(api: httpx.Client) -> None:
    answer = api.post("/batches", json={"mode": "sync", "operations": [
        {"method": "PUT", "path": f"/orders/{key}", "body": {"status": "x"}}
        for key in (2**31 - 1, -(2**31))]})

    assert answer.status_code == 200, answer.text
    assert [r["id"] for r in table_rows(get_runtime(), "orders")] == [-(2**31), 2**31 - 1]


def test_a_csv_import_with_an_id_out_of_range_is_a_422_with_its_line_and_stores_nothing(
        api: httpx.Client) -> None:
    body = "id,email,name\n1,a@example.com,A\n999999999999999999999,b@example.com,B\n"

    answer = api.post("/batches/import", params=IMPORT_USERS, content=body, headers=CSV_BODY)

    error = assert_error(answer, 422, "validation_failed")
    [problem] = error["errors"]
    assert (problem["id"], problem["field"]) == ("line 3", "body.id")
    assert INT32 in problem["message"]
    assert nothing_stored()


# -- item 8: numeric values stored exactly, or refused --------------------------------------


@pytest.mark.parametrize("total", [10**30, "1000000000000000000000000000000.5"])
def test_a_numeric_value_is_stored_exactly_or_refused_with_a_422(
        api: httpx.Client, database_url: str, total: Any) -> None:
    answer = api.post("/batches", json={"mode": "sync", "operations": [
        {"id": "big", "method": "PUT", "path": "/orders/1", "body": {"total": total}}]})

    if database_url.startswith("sqlite"):
        # SQLite keeps a numeric column's values as floats: 10**30 would change.
        error = assert_error(answer, 422, "validation_failed")
        [problem] = error["errors"]
        assert (problem["id"], problem["field"]) == ("big", "body.total")
        assert "cannot be stored exactly" in problem["message"]
        assert nothing_stored()
        return
    assert answer.status_code == 200, answer.text
    with get_runtime().store.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT total::text FROM orders WHERE id = 1")).scalar()
    assert stored == str(total)


# -- item 3: CSV results, formulas after line breaks ------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_results_csv_quotes_cells_with_cr_or_lf_and_escapes_formulas_after_each_break(
        api: httpx.Client) -> None:
    ids = ["a\r=1+2", "b\n+SUM(A1)", "c\r\n@x", "-1"]
    answer = api.post("/batches", json={"mode": "sync", "operations": [
        user(i, op_id=op_id) for i, op_id in enumerate(ids, start=1)]})
    assert answer.status_code == 200, answer.text

    download = api.get(f"/batches/{answer.json()['batch_id']}/results",
                       params={"format": "csv"})

    assert download.status_code == 200
    text = download.text
    assert "\"a\r'=1+2\"" in text  # quoted, and escaped after the bare CR
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [r["id"] for r in rows] == ["a\r'=1+2", "b\n'+SUM(A1)", "c\r\n'@x", "'-1"]
    # A reader that splits rows on any CR or LF still finds no cell starting a formula.
    for line in re.split(r"[\r\n]", text):
        for cell in line.split(","):
            assert not cell.lstrip('"').startswith(("=", "+", "-", "@", "\t")), line


# -- item 5: lone surrogates ----------------------------------------------------------------


@pytest.mark.parametrize(("raw", "field"), [
    ('{"id": "op1", "method": "POST", "path": "/users", '
     '"body": {"id": 1, "email": "a\\ud800@example.com"}}', "operations.0.body.email"),
    ('{"id": "\\ud800", "method": "POST", "path": "/users", '
     '"body": {"id": 1, "email": "a@example.com"}}', "operations.0.id"),
    ('{"id": "op1", "method": "POST", "path": "/users", '
     '"body": {"id": 1, "email": "a@example.com", "\\udc00name": "x"}}',
     "operations.0.body (a key)"),
], ids=["body-string", "op-id", "column-name"])
def test_a_lone_surrogate_is_a_422_invalid_text_and_the_connection_answers_on(
        api: httpx.Client, raw: str, field: str) -> None:
    answer = api.post("/batches", content='{"mode": "sync", "operations": [' + raw + "]}",
                      headers=JSON_BODY)

    error = assert_error(answer, 422, "invalid_text")
    assert [e["field"] for e in error["errors"]] == [field]
    assert nothing_stored()
    # The same keep-alive connection answers the next request.
    assert api.get("/healthz").status_code == 200
    # A surrogate pair (an emoji written as JSON escapes) is text.
    fine = api.post("/batches", content='{"mode": "sync", "operations": [{"method": "POST", '
                    '"path": "/users", "body": {"id": 1, "email": "\\ud83d\\ude00@x"}}]}',
                    headers=JSON_BODY)
    assert fine.status_code == 200, fine.text


# -- item 6: query parameters out of range ----------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("path", "params"), [
    ("results", {}), ("results", {"format": "csv"}), ("events", {})])
def test_an_after_index_out_of_range_is_a_422(api: httpx.Client, path: str,
                                              params: dict[str, str]) -> None:
    batch_id = api.post("/batches", json={"operations": [user(1)]}).json()["batch_id"]

    for after in (10**30, 2**63, 2**31):
        answer = api.get(f"/batches/{batch_id}/{path}", params={**params, "after": after})
        error = assert_error(answer, 422, "validation_failed")
        assert [e["field"] for e in error["errors"]] == ["query.after"]
    assert api.get(f"/batches/{batch_id}/{path}",
                   params={**params, "after": 2**31 - 1}).status_code == 200


# -- item 11: canonical ids, empty batches, CSV messages, long ids -----------------------------


@pytest.mark.parametrize("key", [" 1", "+1", "\u0661", "01", "1 ", "%201", "-0", "1.0"])
def test_an_integer_id_in_a_path_must_be_canonical(api: httpx.Client, key: str) -> None:
    answer = api.post("/batches", json=between_valid_users(
        {"id": "odd", "method": "GET", "path": f"/users/{key}"}))

    error = assert_error(answer, 422, "validation_failed")
    [problem] = error["errors"]
    assert (problem["index"], problem["field"]) == (1, "path")
    assert "canonical" in problem["message"]
    assert nothing_stored()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_empty_batch_and_a_header_only_csv_are_the_same_422(api: httpx.Client) -> None:
    empty = api.post("/batches", json={"operations": []})
    header_only = api.post("/batches/import", params=IMPORT_USERS,
                           content="id,email,name\n", headers=CSV_BODY)
    blank_rows = api.post("/batches/import", params=IMPORT_USERS,
                          content="id,email,name\n,,\n\n", headers=CSV_BODY)

    for answer in (empty, header_only, blank_rows):
        error = assert_error(answer, 422, "empty_batch")
        assert [e["field"] for e in error["errors"]] == ["operations"]
    assert nothing_stored()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_csv_import_errors_name_the_upload_not_a_temporary_file(api: httpx.Client) -> None:
    for body in ("id,name\n1,A\n", 'id,email,name\n1,"unterminated\n', "\xff\xfe,x\n"):
        answer = api.post("/batches/import", params=IMPORT_USERS,
                          content=body.encode("latin-1"), headers=CSV_BODY)
        assert answer.status_code == 400, answer.text
        message = answer.json()["error"]["message"]
        assert message.startswith("the uploaded CSV"), message
        assert "tmp" not in message and ".csv" not in message
    assert nothing_stored()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("body", "line"), [
    ("id,email,name\n1,a@example.com,A,extra\n2,b@example.com,B\n", 2),
    ("id,email,name\n1,a@example.com,A\n2,b@example.com,B\n3,c@x,C,extra,more\n", 4),
    ('id,email,name\n1,a@example.com,"two\nlines"\n2,b@example.com,B,extra\n', 4),
], ids=["first-row", "later-row", "after-a-quoted-line-break"])
def test_a_csv_row_with_too_many_fields_is_named_by_its_line(
        api: httpx.Client, body: str, line: int) -> None:
    answer = api.post("/batches/import", params=IMPORT_USERS, content=body, headers=CSV_BODY)

    error = assert_error(answer, 400, "malformed_input")
    assert f"line {line}:" in error["message"]
    assert "but the header has 3" in error["message"]
    assert nothing_stored()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_422_for_a_huge_id_does_not_repeat_it(api: httpx.Client) -> None:
    huge = "x" * 100_000

    for op in ({"id": huge, "method": "GET", "path": "/users/1"},
               {"id": "op", "method": "GET", "path": "/users/" + "9" * 2000}):
        answer = api.post("/batches", json={"operations": [op]})
        assert_error(answer, 422, "validation_failed")
        assert len(answer.content) < 2_000, answer.text[:300]
    assert nothing_stored()


# -- cancel of a finished batch ---------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cancel_of_a_completed_or_failed_batch_is_409_batch_finished_and_changes_nothing(
        api: httpx.Client) -> None:
    completed = api.post("/batches", json={"operations": [user(1)]}).json()["batch_id"]
    failed = api.post("/batches", json={"operations": [user(2)]}).json()["batch_id"]
    get_runtime().lifecycle.finish(failed, BatchState.FAILED, "for the test")

    for batch_id, status in ((completed, "completed"), (failed, "failed")):
        before = api.get(f"/batches/{batch_id}/status").json()
        error = assert_error(api.post(f"/batches/{batch_id}/cancel"), 409, "batch_finished")
        assert status in error["message"]
        assert api.get(f"/batches/{batch_id}/status").json() == before
    assert len(table_rows(get_runtime(), "users")) == 2



def test_a_lone_surrogate_under_a_huge_key_is_named_without_echoing_the_key(
        start_api: Callable[..., httpx.Client]) -> None:  # noqa: F811
    api = start_api()
    key = "x" * 100_000
    raw = ('{"operations": [{"id": "a", "method": "POST", "path": "/users", "body": {"'
           + key + '": {"name": "a\\ud800b"}}}]}')

    answer = api.post("/batches", content=raw, headers={"Content-Type": "application/json"})

    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "invalid_text"
    assert len(answer.content) < 2_000
    assert "(100000 characters)" in answer.json()["error"]["message"]
