"""Batch files in and out: operations from JSON, JSONL or CSV; results as CSV or JSON.

Reading streams, so memory does not grow with the file: a JSON array is decoded one element at
a time, JSONL one line at a time, CSV in pandas chunks. Unreadable input raises
:class:`~batchops.errors.MalformedInput`, input that cannot become operations (a CSV without
the columns its resource needs, an unknown resource) :class:`~batchops.errors.BadRequest`;
checking the operations themselves is the validator's job.

A CSV import names every operation after its input line: the row on line 42 (the header is
line 1, so this is the spreadsheet's row 42) becomes the operation with id ``"line 42"``. The
id travels through validation errors and item results, and :func:`line_of` reads the number
back, so error tables and the results file point at the row to fix.

Result files are written page by page; every cell a spreadsheet would run as a formula is
escaped, also after a line break inside it, and every cell holding a CR or LF is quoted.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast, get_args
from urllib.parse import quote

from batchops.errors import BadRequest, MalformedInput
from batchops.routing import Router
from batchops.schemas import ItemResult, Method

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "RESULT_COLUMNS",
    "CsvImport",
    "InputFormat",
    "count_operations",
    "detect_format",
    "escape_formula",
    "input_format",
    "line_id",
    "line_of",
    "open_operations",
    "write_results_csv",
    "write_results_json",
]

RESULT_COLUMNS = ["row", "index", "id", "state", "status", "error_code", "error_message",
                  "result"]
# Spreadsheets run a cell starting with = + - @ tab or CR as a formula (CSV injection); a
# reader that splits rows on CR or LF starts a cell after each.
_FORMULA_AT_LINE_START = re.compile(r"(^|[\r\n])(?=[=+\-@\t\r])")
_CSV_SPECIAL = (",", '"', "\r", "\n")
_LINE_ID = re.compile(r"^line (\d+)$")
_RESOURCE_NAME = re.compile(r"^[A-Za-z0-9_.~-]+$")
_JSON_BLOCK = 1 << 16
# A JSON array element still undecoded after this much text is an error, not a big operation.
_MAX_JSON_ELEMENT = 16 << 20
_WHITESPACE = " \t\n\r"
_DECODER = json.JSONDecoder()


class InputFormat(StrEnum):
    JSON = "json"
    JSONL = "jsonl"
    CSV = "csv"


_SUFFIXES = {".json": InputFormat.JSON, ".jsonl": InputFormat.JSONL,
             ".ndjson": InputFormat.JSONL, ".csv": InputFormat.CSV}


def detect_format(path: Path) -> InputFormat:
    """The file's format, from its extension."""
    try:
        return _SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise BadRequest(f"{path.name}: cannot tell the format; name the file .json (an array "
                         "of operations), .jsonl (one operation per line) or .csv") from None


def line_id(line: int) -> str:
    """The operation id a CSV import gives the row on ``line``."""
    return f"line {line}"


def line_of(op_id: str | None) -> int | None:
    """The input line of a CSV-imported operation, from its id; ``None`` for other ids."""
    match = _LINE_ID.match(op_id) if op_id else None
    return int(match.group(1)) if match else None


# -- JSON and JSONL ----------------------------------------------------------------------------


class _JsonArrayReader:
    """Decodes the elements of a top-level JSON array one at a time from a text stream."""

    def __init__(self, fh: TextIO, name: str) -> None:
        self.fh = fh
        self.name = name
        self.buf = ""
        self.pos = 0
        self.line = 1  # line number of buf[0]
        self.eof = False

    def _read_more(self) -> bool:
        if self.eof:
            return False
        block = self.fh.read(_JSON_BLOCK)
        if not block:
            self.eof = True
            return False
        self.line += self.buf.count("\n", 0, self.pos)
        self.buf = self.buf[self.pos:] + block
        self.pos = 0
        return True

    def _error(self, message: str, pos: int | None = None) -> MalformedInput:
        pos = self.pos if pos is None else pos
        line = self.line + self.buf.count("\n", 0, pos)
        column = pos - self.buf.rfind("\n", 0, pos)
        return MalformedInput(f"{self.name}: invalid JSON at line {line} column {column}: "
                              f"{message}")

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end of the file)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._read_more():
                return ""

    def _value(self) -> Any:
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                if self.eof or len(self.buf) - self.pos > _MAX_JSON_ELEMENT:
                    raise self._error(exc.msg, exc.pos) from None
            else:
                # A value that ends the buffer may go on in the next block (a number).
                if end < len(self.buf) or self.eof:
                    self.pos = end
                    return value
            self._read_more()

    def document(self) -> Any:
        """The whole document, for files that are not an array."""
        rest = self.buf[self.pos:] + self.fh.read()
        try:
            return json.loads(rest)
        except json.JSONDecodeError as exc:
            self.buf, self.pos = rest, 0
            raise self._error(exc.msg, exc.pos) from None

    def elements(self) -> Iterator[Any]:
        if self.peek() != "[":
            raise self._error("expected '['")
        self.pos += 1
        if self.peek() == "]":
            self.pos += 1
        else:
            while True:
                yield self._value()
                after = self.peek()
                if after not in (",", "]"):
                    raise self._error("expected ',' or ']' after an operation")
                self.pos += 1
                if after == "]":
                    break
                self.peek()  # raw_decode does not skip whitespace itself
        if self.peek() != "":
            raise self._error("extra data after the array")


def _json_operations(fh: TextIO, name: str) -> Iterator[Any]:
    reader = _JsonArrayReader(fh, name)
    first = reader.peek()
    if first == "[":
        yield from reader.elements()
        return
    if first == "{":
        # The body of ``POST /batches``: ``{"operations": [...], ...}``, small by its limits.
        document = reader.document()
        operations = document.get("operations") if isinstance(document, dict) else None
        if isinstance(operations, list):
            yield from operations
            return
    raise MalformedInput(f"{name}: expected a JSON array of operations (or an object with "
                         "an \"operations\" array); for one operation per line use .jsonl")


def _jsonl_operations(fh: TextIO, name: str) -> Iterator[Any]:
    for number, text in enumerate(fh, start=1):
        if not text.strip():
            continue
        try:
            yield json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            raise MalformedInput(f"{name}: invalid JSON on line {number} column {exc.colno}: "
                                 f"{exc.msg}") from None


# -- CSV ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CsvImport:
    """How the rows of a CSV file become operations on one resource.

    ``POST`` makes each row the body of ``POST /{resource}`` (empty cells omitted, so column
    defaults and generated keys apply). The other methods address ``/{resource}/{key}`` with
    the row's ``key`` column; ``PUT`` sends the other columns (an empty cell is null: ``PUT``
    replaces the record), ``PATCH`` the non-empty ones (an empty cell leaves the field as it
    is), ``GET`` and ``DELETE`` none.
    """

    resource: str
    method: Method
    key: str | None  # the column that names the record; None for POST
    columns: frozenset[str] | None  # the resource's columns; None when unknown (a handler)
    required: frozenset[str]

    @classmethod
    def for_route(cls, router: Router, resource: str, method: str) -> CsvImport:
        """The import of ``method`` rows into ``resource``; ``BadRequest`` when none serves it."""
        if method.upper() not in get_args(Method):
            raise BadRequest(f"unknown method {method!r}; use one of "
                             f"{', '.join(get_args(Method))}")
        verb = cast(Method, method.upper())
        name = resource.strip("/")
        if not _RESOURCE_NAME.match(name):
            raise BadRequest(f"invalid resource name {resource!r}: one path segment, "
                             "like 'users'")
        res = router.resources.get(name)
        if res is not None:
            pk = res.primary_key
            required = set(res.required_columns) if verb in ("POST", "PUT") else set()
            if verb != "POST":
                required.add(pk)
            return cls(name, verb, None if verb == "POST" else pk, frozenset(res.spec.columns),
                       frozenset(required))
        probe = f"/{name}" if verb == "POST" else f"/{name}/1"
        match = router.resolve(verb, probe)
        if isinstance(match, str):
            known = ", ".join(sorted(router.resources)) or "none"
            raise BadRequest(f"unknown resource {name!r}: nothing serves {verb} {probe} "
                             f"({match}); tables: {known}")
        if len(match.params) > 1:
            raise BadRequest(f"{verb} /{name}/... takes {len(match.params)} path parameters; "
                             "a CSV import fills one")
        key = next(iter(match.params), None)
        return cls(name, verb, key, None, frozenset({key} if key else ()))

    @property
    def route(self) -> str:
        return f"{self.method} /{self.resource}" + (f"/{{{self.key}}}" if self.key else "")

    def check_header(self, header: list[str], name: str) -> None:
        missing = sorted(self.required - set(header))
        if missing:
            raise BadRequest(f"{name}: missing column(s) {', '.join(missing)} needed for "
                             f"{self.route}")
        if self.columns is not None and self.method not in ("GET", "DELETE"):
            unknown = [c for c in header if c not in self.columns]
            if unknown:
                raise BadRequest(f"{name}: {self.resource} has no column(s) "
                                 f"{', '.join(unknown)} (its columns: "
                                 f"{', '.join(sorted(self.columns))})")

    def operation(self, line: int, row: dict[str, str], name: str) -> dict[str, Any]:
        """The operation for the row on ``line``."""
        op: dict[str, Any] = {"id": line_id(line), "method": self.method}
        if self.key is None:
            op["path"] = f"/{self.resource}"
            op["body"] = {k: v for k, v in row.items() if v != ""}
            return op
        key = row[self.key]
        if key.strip() == "":
            raise MalformedInput(f"{name} line {line}: the {self.key} cell is empty; "
                                 f"{self.route} needs it")
        op["path"] = f"/{self.resource}/{quote(key, safe='')}"
        others = ((k, v) for k, v in row.items() if k != self.key)
        if self.method == "PUT":
            op["body"] = {k: (v if v != "" else None) for k, v in others}
        elif self.method == "PATCH":
            op["body"] = {k: v for k, v in others if v != ""}
        return op


def _unreadable(path: Path, name: str, exc: Exception) -> MalformedInput:
    """The error for a file pandas could not parse: the first row whose number of fields is
    not the header's, by its line, when there is one; else pandas' reason."""
    if not isinstance(exc, UnicodeDecodeError):
        try:
            with path.open(encoding="utf-8-sig", newline="") as fh:
                reader = csv.reader(fh)
                header = next(reader, [])
                line = reader.line_num + 1  # where the next row starts
                for row in reader:
                    if len(row) > len(header):
                        return MalformedInput(
                            f"{name} line {line}: {len(row)} fields, but the header has "
                            f"{len(header)}")
                    line = reader.line_num + 1
        except (csv.Error, UnicodeDecodeError, OSError):
            pass
    return MalformedInput(f"{name}: not a readable CSV file: {exc}")


def _next_chunk(reader: Any, path: Path, name: str) -> pd.DataFrame | None:
    import pandas as pd

    try:
        with warnings.catch_warnings():
            # pandas warns, and drops data, when a first row has more cells than the header.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            chunk: pd.DataFrame = next(reader)
            return chunk
    except StopIteration:
        return None
    except (pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError) as exc:
        raise _unreadable(path, name, exc) from None


@contextmanager
def _csv_chunks(path: Path, spec: CsvImport, chunk_rows: int,
                name: str) -> Iterator[tuple[list[str], Iterator[pd.DataFrame]]]:
    """The file's header as written and its rows in pandas chunks; the header is checked.
    (pandas is imported here, by CSV imports only: it costs a JSON run ~0.3 s of start-up.)"""
    import pandas as pd

    try:
        reader = pd.read_csv(path, chunksize=chunk_rows, dtype=str, keep_default_na=False,
                             na_filter=False, skip_blank_lines=False, index_col=False,
                             encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise MalformedInput(f"{name}: the file is empty (expected a header row)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise _unreadable(path, name, exc) from None
    with reader:
        first = _next_chunk(reader, path, name)  # a header-only file gives an empty first chunk
        raw_header = [str(c) for c in first.columns] if first is not None else []
        spec.check_header([c.strip() for c in raw_header], name)

        def chunks() -> Iterator[pd.DataFrame]:
            chunk = first
            while chunk is not None:
                yield chunk
                chunk = _next_chunk(reader, path, name)

        yield raw_header, chunks()


@contextmanager
def _csv_operations(path: Path, spec: CsvImport, chunk_rows: int,
                    name: str) -> Iterator[Iterator[dict[str, Any]]]:
    with _csv_chunks(path, spec, chunk_rows, name) as (raw_header, chunks):
        header = [c.strip() for c in raw_header]

        def rows() -> Iterator[dict[str, Any]]:
            # Count physical lines, so a quoted cell spanning lines or a blank line does not
            # shift the line numbers of the rows after it.
            line = 1 + sum(c.count("\n") for c in raw_header)
            for chunk in chunks:
                for values in chunk.itertuples(index=False, name=None):
                    line += 1
                    cells = [str(v) for v in values]
                    if any(cells):
                        yield spec.operation(line, dict(zip(header, cells, strict=True)), name)
                    line += sum(c.count("\n") for c in cells)

        yield rows()


def input_format(path: Path, *, csv: bool) -> InputFormat:
    """Check that ``path`` is a file of a known format, given as CSV exactly when ``csv``."""
    if not path.is_file():
        raise BadRequest(f"{path}: no such file")
    fmt = detect_format(path)
    if fmt is InputFormat.CSV and not csv:
        raise BadRequest(f"{path.name}: a CSV file needs a resource and a method "
                         "(--resource users --method POST)")
    if fmt is not InputFormat.CSV and csv:
        raise BadRequest(f"{path.name}: a resource and a method apply to CSV files only; "
                         "JSON operations carry their own method and path")
    return fmt


@contextmanager
def open_operations(path: Path, *, csv: CsvImport | None = None, chunk_rows: int = 10_000,
                    name: str | None = None) -> Iterator[Iterator[Any]]:
    """The operations in ``path``, read lazily; the file is checked and open inside the block.

    Args:
        path: a ``.json`` file (an array of operations, or a ``POST /batches`` body), a
            ``.jsonl`` file (one operation per line) or a ``.csv`` file.
        csv: how CSV rows become operations (required for CSV, refused otherwise).
        chunk_rows: CSV rows pandas reads at a time.
        name: what error messages call the file (default its name; a server's spooled
            upload is not named after its temporary file).
    """
    fmt = input_format(path, csv=csv is not None)
    if csv is not None:
        with _csv_operations(path, csv, chunk_rows, name or path.name) as rows:
            yield rows
        return
    try:
        fh = path.open(encoding="utf-8-sig")
    except OSError as exc:
        raise BadRequest(f"{path}: cannot read the file: {exc.strerror}") from None
    read = _jsonl_operations if fmt is InputFormat.JSONL else _json_operations
    with fh:
        try:
            yield read(fh, path.name)
        except UnicodeDecodeError as exc:  # decoding happens as the operations are read
            raise MalformedInput(f"{path.name}: not UTF-8 text: {exc}") from None


def count_operations(path: Path, *, csv: CsvImport | None = None, stop_after: int,
                     chunk_rows: int = 10_000, name: str | None = None) -> int:
    """The operations in ``path`` (as :func:`open_operations` reads them), counting no further
    than ``stop_after + 1``: a file over a limit is known to be so without reading it all.

    CSV rows are counted a pandas chunk at a time (the rows with a non-empty cell, as
    :func:`open_operations` makes operations of), not turned into operations.

    Raises what :func:`open_operations` raises for a file it cannot read.
    """
    if csv is None:
        with open_operations(path) as operations:
            return sum(1 for _ in islice(operations, stop_after + 1))
    input_format(path, csv=True)
    count = 0
    with _csv_chunks(path, csv, chunk_rows, name or path.name) as (_, chunks):
        for chunk in chunks:
            count += int((chunk != "").any(axis=1).sum())
            if count > stop_after:
                return stop_after + 1
    return count


# -- results -----------------------------------------------------------------------------------


def escape_formula(value: str) -> str:
    """``value`` made inert for spreadsheets: an apostrophe before a formula start, at the
    start of the value and of every line in it (a reader may split rows on a bare CR)."""
    return _FORMULA_AT_LINE_START.sub(r"\1'", value)


def _pages(results: Iterable[ItemResult], size: int) -> Iterator[list[ItemResult]]:
    iterator = iter(results)
    while page := list(islice(iterator, size)):
        yield page


def _result_json(value: Any) -> str:
    return "" if value is None else json.dumps(value, ensure_ascii=False, default=str)


def _csv_cell(value: str) -> str:
    """A CSV field (RFC 4180): quoted when it holds a comma, a quote, a CR or an LF. Python's
    ``csv`` quotes only the line terminator's characters, so a bare CR would go out as is."""
    if any(ch in value for ch in _CSV_SPECIAL):
        return '"' + value.replace('"', '""') + '"'
    return value


def _result_row(r: ItemResult) -> str:
    row = line_of(r.id)
    text = [r.id or "", r.state.value, r.error.code if r.error else "",
            r.error.message if r.error else "", _result_json(r.result)]
    op_id, state, code, message, result = (_csv_cell(escape_formula(t)) for t in text)
    return ",".join(("" if row is None else str(row), str(r.index), op_id, state,
                     str(r.status), code, message, result)) + "\n"


def write_results_csv(results: Iterable[ItemResult], out: TextIO, *,
                      page_size: int = 1000) -> int:
    """Write ``results`` as CSV (:data:`RESULT_COLUMNS`) page by page; the number of rows."""
    out.write(",".join(RESULT_COLUMNS) + "\n")
    count = 0
    for page in _pages(results, page_size):
        out.write("".join(_result_row(r) for r in page))
        count += len(page)
    return count


def write_results_json(results: Iterable[ItemResult], out: TextIO) -> int:
    """Write ``results`` as a JSON array, one item per line; the number of items."""
    count = 0
    out.write("[")
    for result in results:
        item = {"row": line_of(result.id), **result.model_dump(mode="json")}
        out.write(("\n" if count == 0 else ",\n") + json.dumps(item, ensure_ascii=False))
        count += 1
    out.write("\n]\n" if count else "]\n")
    return count
