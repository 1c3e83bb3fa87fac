"""The HTTP edge of the API: content types, Host and Origin, quota refusals, header sizes, list
settings. A real uvicorn server (as ``batchops api`` serves it), the Prefect test server, a
SQLite store; every refusal is checked for what it leaves behind: nothing."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchops.runtime import get_runtime
from tests.test_api import assert_error, start_api, table_rows, user  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("prefect_server")

StartApi = Callable[..., httpx.Client]
BATCH = json.dumps({"operations": [user(1)]})


def nothing_stored() -> bool:
    runtime = get_runtime()
    return table_rows(runtime, "batches") == [] and table_rows(runtime, "users") == []


def csv_rows(count: int, start: int = 1) -> str:
    return "".join(f"{i},user{i}@example.com,User {i}\n" for i in range(start, start + count))


@pytest.fixture
def sqlite_api(start_api: StartApi, tmp_path: Path) -> Callable[..., httpx.Client]:  # noqa: F811
    def start(**settings: Any) -> httpx.Client:
        return start_api(database_url=f"sqlite:///{tmp_path / 'store.db'}", **settings)

    return start


# -- item 11: list settings --------------------------------------------------------------------


def test_api_keys_may_be_a_comma_separated_list(
        sqlite_api: Callable[..., httpx.Client]) -> None:
    first, second = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"
    api = sqlite_api(api_keys=f"{first}, {second}")

    for key in (first, second):
        answer = api.post("/batches", json={"operations": [user(1 if key == first else 2)]},
                          headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text
    assert_error(api.post("/batches", json={"operations": [user(3)]},
                          headers={"Authorization": f"Bearer {first},{second}"}),
                 401, "unauthorized")
