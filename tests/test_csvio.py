"""Batch files in and out: JSON, JSONL and CSV readers, results CSV/JSON writers."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from batchops.csvio import (
    RESULT_COLUMNS,
    CsvImport,
    escape_formula,
    line_of,
    open_operations,
    write_results_csv,
    write_results_json,
)
from batchops.errors import BadRequest, MalformedInput
from batchops.handlers import load_handler_modules, registry
from batchops.resources import build_resources
from batchops.routing import Router
from batchops.schemas import ItemErrorBody, ItemResult, ItemState
from batchops.settings import Settings


@pytest.fixture(scope="module")
def router() -> Router:
    """The default route table: demo sql resources and the demo ``/emails`` handler."""
    settings = Settings(demo=True)
    load_handler_modules(settings.handler_modules)
    return Router(build_resources(settings.resources), registry.all())


def read(path: Path, csv_import: CsvImport | None = None, **kwargs: Any) -> list[Any]:
    with open_operations(path, csv=csv_import, **kwargs) as operations:
        return list(operations)


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


# -- CSV -----------------------------------------------------------------------------------------


def test_csv_rows_are_named_after_their_physical_input_lines(router: Router,
                                                             tmp_path: Path) -> None:
    text = ("\ufeffemail , name\n"            # line 1: BOM and a padded header name
            "a@example.com,Ann\n"            # 2
            "\n"                             # 3: blank, skipped
            'b@example.com,"Bob\nBobson"\n'  # 4-5: a quoted cell across two lines
            "c@example.com,\n"               # 6
            ",\n"                            # 7: every cell empty, skipped
            "d@example.com,Dee\n")           # 8
    path = write(tmp_path, "users.csv", text)
    spec = CsvImport.for_route(router, "users", "post")

    for chunk_rows in (1, 2, 1000):  # line numbers carry across pandas chunks
        ops = read(path, spec, chunk_rows=chunk_rows)
        assert [(op["id"], op["body"]) for op in ops] == [
            ("line 2", {"email": "a@example.com", "name": "Ann"}),
            ("line 4", {"email": "b@example.com", "name": "Bob\nBobson"}),
            ("line 6", {"email": "c@example.com"}),  # an empty cell is left out of a POST
            ("line 8", {"email": "d@example.com", "name": "Dee"}),
        ]
    assert {(op["method"], op["path"]) for op in ops} == {("POST", "/users")}
    assert [line_of(op["id"]) for op in ops] == [2, 4, 6, 8]
    assert line_of("op-7") is None and line_of(None) is None


def test_csv_item_methods_address_the_record_in_the_key_column(router: Router,
                                                               tmp_path: Path) -> None:
    path = write(tmp_path, "users.csv", "id,email,name\n7,a@example.com,\n8/9,,Bo\n")

    put = read(path, CsvImport.for_route(router, "users", "PUT"))
    patch = read(path, CsvImport.for_route(router, "/users/", "patch"))
    delete = read(path, CsvImport.for_route(router, "users", "DELETE"))

    assert [(op["path"], op["body"]) for op in put] == [
        ("/users/7", {"email": "a@example.com", "name": None}),  # PUT replaces: empty is null
        ("/users/8%2F9", {"email": None, "name": "Bo"}),
    ]
    assert [op["body"] for op in patch] == [{"email": "a@example.com"}, {"name": "Bo"}]
    assert [(op["method"], op["path"], "body" in op) for op in delete] == [
        ("DELETE", "/users/7", False), ("DELETE", "/users/8%2F9", False)]


def test_csv_for_a_python_handler(router: Router, tmp_path: Path) -> None:
    path = write(tmp_path, "emails.csv", "to,name\nann@example.com,Ann\n")
    ops = read(path, CsvImport.for_route(router, "emails", "POST"))
    assert ops == [{"id": "line 2", "method": "POST", "path": "/emails",
                    "body": {"to": "ann@example.com", "name": "Ann"}}]


@pytest.mark.parametrize(("resource", "method", "header", "message"), [
    ("users", "POST", "name", "missing column(s) email needed for POST /users"),
    ("users", "PUT", "email,name", "missing column(s) id needed for PUT /users/{id}"),
    ("users", "PATCH", "id,nickname", "users has no column(s) nickname"),
    ("userz", "POST", "email", "unknown resource 'userz'"),
    ("emails", "DELETE", "id", "unknown resource 'emails'"),
    ("users", "FETCH", "email", "unknown method 'FETCH'"),
    ("users/1", "POST", "email", "invalid resource name"),
])
def test_csv_that_cannot_become_operations_is_refused_up_front(
        router: Router, tmp_path: Path, resource: str, method: str, header: str,
        message: str) -> None:
    path = write(tmp_path, "in.csv", header + "\n")
    with pytest.raises(BadRequest) as caught:
        read(path, CsvImport.for_route(router, resource, method))
    assert message in caught.value.message


def test_csv_delete_ignores_columns_other_than_the_key(router: Router, tmp_path: Path) -> None:
    path = write(tmp_path, "export.csv", "id,email,nickname\n3,x@example.com,x\n")
    assert read(path, CsvImport.for_route(router, "users", "DELETE")) == [
        {"id": "line 2", "method": "DELETE", "path": "/users/3"}]


@pytest.mark.parametrize(("text", "message"), [
    ("", "the file is empty"),
    ("id,email\n1,a@example.com\n2,b@example.com,extra\n",
     "in.csv line 3: 3 fields, but the header has 2"),
    ("id,email\n1,a@example.com,extra\n", "in.csv line 2: 3 fields, but the header has 2"),
    (b"id,email\n1,\xff\xfe@example.com\n", "not a readable CSV file"),
    ("id,email\n1,a@example.com\n ,b@example.com\n",
     "in.csv line 3: the id cell is empty; PATCH /users/{id} needs it"),
])
def test_unreadable_csv_is_malformed_input(router: Router, tmp_path: Path, text: str | bytes,
                                           message: str) -> None:
    path = write(tmp_path, "in.csv", text)
    with pytest.raises(MalformedInput) as caught:
        read(path, CsvImport.for_route(router, "users", "PATCH"))
    assert message in caught.value.message


def test_file_format_comes_from_the_extension(router: Router, tmp_path: Path) -> None:
    spec = CsvImport.for_route(router, "users", "POST")
    with pytest.raises(BadRequest, match="cannot tell the format"):
        read(write(tmp_path, "ops.txt", "[]"))
    with pytest.raises(BadRequest, match="needs a resource and a method"):
        read(write(tmp_path, "users.csv", "email\n"))
    with pytest.raises(BadRequest, match="CSV files only"):
        read(write(tmp_path, "ops.json", "[]"), spec)
    with pytest.raises(BadRequest, match="no such file"):
        read(tmp_path / "missing.csv", spec)


# -- JSON and JSONL ------------------------------------------------------------------------------


def test_json_array_is_streamed_element_by_element(tmp_path: Path) -> None:
    # ~600 kB: elements and numbers straddle the reader's 64 kB blocks.
    ops = [{"id": f"op{i}", "method": "POST", "path": "/users",
            "body": {"email": f"user{i}@example.com", "note": "x" * (i % 300)}}
           for i in range(3000)]
    pretty = write(tmp_path, "ops.json", json.dumps(ops, indent=2))
    numbers = write(tmp_path, "numbers.json", json.dumps(list(range(0, 10**7, 97))))

    assert read(pretty) == ops
    assert read(numbers) == list(range(0, 10**7, 97))
    assert read(write(tmp_path, "empty.json", " [ ] \n")) == []


def test_json_object_with_operations_is_a_batch_body(tmp_path: Path) -> None:
    body = {"operations": [{"method": "DELETE", "path": "/users/1"}], "concurrency": 2}
    assert read(write(tmp_path, "body.json", json.dumps(body))) == body["operations"]


@pytest.mark.parametrize(("text", "message"), [
    ('[{"method": "GET"}\n {"method": "GET"}]', "line 2 column 2: expected ',' or ']'"),
    ('[{"method": "GET"},\n]', "line 2 column 1: Expecting value"),
    ('[{"method": "GET"}', "expected ',' or ']'"),
    ('[{"method": "GE', "line 1 column 13: Unterminated string"),
    ('[{"method": "GET"}] []', "extra data after the array"),
    ('{"method": "GET"}', "expected a JSON array of operations"),
    ('{"operations": [}', "invalid JSON at line 1 column 17"),
    ('"text"', "expected a JSON array"),
    ("", "expected a JSON array"),
])
def test_malformed_json_says_where(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(MalformedInput) as caught:
        read(write(tmp_path, "ops.json", text))
    assert message in caught.value.message


def test_jsonl_reads_one_operation_per_line(tmp_path: Path) -> None:
    text = '{"method": "GET", "path": "/users/1"}\n\n  \n{"method": "GET", "path": "/users/2"}'
    assert [op["path"] for op in read(write(tmp_path, "ops.jsonl", text))] == [
        "/users/1", "/users/2"]
    bad = write(tmp_path, "bad.ndjson", '{"method": "GET"}\n\n{"method": GET}\n')
    with pytest.raises(MalformedInput, match=r"bad\.ndjson: invalid JSON on line 3 column 12"):
        read(bad)
    with pytest.raises(MalformedInput, match="not UTF-8"):
        read(write(tmp_path, "latin.jsonl", b'{"method": "GET", "path": "/caf\xe9"}\n'))


# -- results -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "escaped"), [
    ("=1+2", "'=1+2"), ("+1", "'+1"), ("-1", "'-1"), ("@SUM(A1)", "'@SUM(A1)"),
    ("\tx", "'\tx"), ("\rx", "'\rx"), ("plain", "plain"), ("", ""), ("a=b", "a=b"),
    ("a\r=1+2", "a\r'=1+2"), ("a\n-1\r\n@x", "a\n'-1\r\n'@x"), ("a\nb", "a\nb"),
    ("\n\r=x", "\n'\r'=x"),
])
def test_escape_formula(value: str, escaped: str) -> None:
    assert escape_formula(value) == escaped


def _results() -> list[ItemResult]:
    return [
        ItemResult(id="line 2", index=0, status=201, state=ItemState.SUCCEEDED,
                   result={"id": 1, "name": "=HYPERLINK(\"x\")"}),
        ItemResult(id="=cmd|' /C calc'!A0", index=1, status=409, state=ItemState.FAILED,
                   error=ItemErrorBody(code="unique_violation", message="-dup")),
        ItemResult(id=None, index=2, status=204, state=ItemState.SUCCEEDED),
        ItemResult(id="@x", index=3, status=200, state=ItemState.SUCCEEDED, result=-5),
        ItemResult(id="line 9", index=4, status=200, state=ItemState.SUCCEEDED, result="+x"),
    ]


def test_results_csv_has_rows_and_escapes_formulas(tmp_path: Path) -> None:
    out = io.StringIO()
    assert write_results_csv(_results(), out, page_size=2) == 5

    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert list(rows[0]) == RESULT_COLUMNS
    assert out.getvalue().count("row,index") == 1  # one header for every page
    assert [(r["row"], r["index"], r["id"]) for r in rows] == [
        ("2", "0", "line 2"), ("", "1", "'=cmd|' /C calc'!A0"), ("", "2", ""),
        ("", "3", "'@x"), ("9", "4", "line 9")]
    assert json.loads(rows[0]["result"]) == {"id": 1, "name": "=HYPERLINK(\"x\")"}
    assert (rows[1]["state"], rows[1]["status"], rows[1]["error_code"],
            rows[1]["error_message"], rows[1]["result"]) == (
        "failed", "409", "unique_violation", "'-dup", "")
    assert (rows[3]["result"], rows[4]["result"]) == ("'-5", '"+x"')


def test_results_csv_quotes_every_cell_holding_a_cr_or_an_lf() -> None:
    out = io.StringIO()
    write_results_csv([ItemResult(id="a\r=1+2", index=0, status=422, state=ItemState.FAILED,
                                  error=ItemErrorBody(code="x", message="bad\n-1"))], out)

    assert out.getvalue().endswith(',0,"a\r\'=1+2",failed,422,x,"bad\n\'-1",\n')
    [parsed] = list(csv.DictReader(io.StringIO(out.getvalue(), newline="")))
    assert (parsed["id"], parsed["error_message"]) == ("a\r'=1+2", "bad\n'-1")


def test_results_csv_of_no_items_is_a_header() -> None:
    out = io.StringIO()
    assert write_results_csv([], out) == 0
    assert out.getvalue() == ",".join(RESULT_COLUMNS) + "\n"


def test_results_json_round_trips() -> None:
    out = io.StringIO()
    assert write_results_json(_results(), out) == 5
    items = json.loads(out.getvalue())
    assert [(i["row"], i["index"], i["id"]) for i in items] == [
        (2, 0, "line 2"), (None, 1, "=cmd|' /C calc'!A0"), (None, 2, None), (None, 3, "@x"),
        (9, 4, "line 9")]
    assert items[1]["error"] == {"code": "unique_violation", "message": "-dup"}
    empty = io.StringIO()
    write_results_json([], empty)
    assert json.loads(empty.getvalue()) == []
