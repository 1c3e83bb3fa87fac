"""Settings by concern: every field keeps one flat ``BATCHOPS_*`` name, from the environment,
``.env`` and ``batchops.toml``; the demo is off unless asked for; bad values are named."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from batchops.errors import ConfigurationError
from batchops.settings import GROUPS, Settings, env_name, get_settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No ``BATCHOPS_*`` variable set, the working directory an empty folder."""
    import os

    for key in list(os.environ):
        if key.startswith("BATCHOPS_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_the_production_defaults_expose_no_demo_tables_or_handlers(clean_env: Path) -> None:
    settings = get_settings()
    assert settings.demo is False
    assert settings.resources == {}
    assert settings.handler_modules == []


def test_the_demo_switch_adds_the_demo_tables_beside_the_configured_ones(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHOPS_DEMO", "true")
    monkeypatch.setenv("BATCHOPS_RESOURCES", '{"users": {"table": "people", "columns": '
                                             '{"id": {"type": "integer"}}}}')
    settings = get_settings()
    assert set(settings.resources) == {"users", "orders", "products", "outbox"}
    assert settings.resources["users"].table == "people"  # the configured one wins
    assert settings.handler_modules == ["batchops.demo.handlers"]


def test_flat_environment_names_set_the_grouped_fields(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHOPS_API_PORT", "8123")
    monkeypatch.setenv("BATCHOPS_API_KEYS", "k1, k2")
    monkeypatch.setenv("BATCHOPS_CHUNK_SIZE", "50")
    monkeypatch.setenv("BATCHOPS_STALE_AFTER_SECONDS", "7.5")
    monkeypatch.setenv("BATCHOPS_CALLBACK_SECRET", "s3cret")
    monkeypatch.setenv("BATCHOPS_CALLBACK_ALLOWED_HOSTS", '["Hooks.Example.com."]')
    monkeypatch.setenv("BATCHOPS_SYNC_CRON", "0 3 * * *")
    settings = get_settings()
    assert settings.api.port == 8123
    assert [k.get_secret_value() for k in settings.api.keys] == ["k1", "k2"]
    assert settings.execution.chunk_size == 50
    assert settings.recovery.stale_after_seconds == 7.5
    assert settings.callbacks.secret is not None
    assert settings.callbacks.secret.get_secret_value() == "s3cret"
    assert settings.callbacks.allowed_hosts == ["hooks.example.com"]
    assert settings.bulk_sync.cron == "0 3 * * *"


def test_every_field_has_exactly_one_environment_name(clean_env: Path) -> None:
    names = [env_name(name) for name in Settings.model_fields if name not in GROUPS]
    names += [env_name(name, group) for group, model in GROUPS.items()
              for name in model.model_fields]
    assert len(names) == len(set(names))
    assert "BATCHOPS_API_PORT" in names and "BATCHOPS_CALLBACK_RETRIES" in names


def test_the_toml_file_takes_flat_names_and_group_tables_and_the_environment_wins(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / "batchops.toml").write_text(
        'api_port = 8001\nmax_recoveries = 9\n\n[execution]\nchunk_workers = 3\n'
        'chunk_seconds = 0.5\n\n[callbacks]\nretries = 2\n')
    monkeypatch.setenv("BATCHOPS_CHUNK_SECONDS", "4")
    settings = get_settings()
    assert settings.api.port == 8001
    assert settings.recovery.max_recoveries == 9
    assert settings.execution.chunk_workers == 3
    assert settings.execution.chunk_seconds == 4.0  # the environment wins over the file
    assert settings.callbacks.retries == 2


def test_a_bad_grouped_value_is_named_by_its_environment_variable(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHOPS_API_PORT", "eighty")
    monkeypatch.setenv("BATCHOPS_CHUNK_RETRIES", "-1")
    with pytest.raises(ConfigurationError) as caught:
        get_settings()
    message = str(caught.value)
    assert "invalid setting BATCHOPS_API_PORT:" in message
    assert "invalid setting BATCHOPS_CHUNK_RETRIES:" in message
    assert "eighty" not in message


def test_an_unknown_key_in_a_group_table_is_refused(clean_env: Path) -> None:
    (clean_env / "batchops.toml").write_text("[api]\nprot = 8001\n")
    with pytest.raises(ConfigurationError, match=r"invalid setting \[api\] prot: Extra inputs"):
        get_settings()


def test_callback_hosts_without_a_secret_are_refused(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHOPS_CALLBACK_ALLOWED_HOSTS", "hooks.example.com")
    with pytest.raises(ConfigurationError, match="callback_allowed_hosts needs callback_secret"):
        get_settings()


def test_every_setting_is_read_by_the_code() -> None:
    """A field nothing reads is a promise the service does not keep."""
    root = Path(__file__).resolve().parent.parent
    code = "\n".join(path.read_text() for folder in ("batchops", "api", "cli", "flows", "tasks",
                                                        "deployments")
                     for path in (root / folder).rglob("*.py")
                     if path.name != "settings.py" or folder != "batchops")
    unread = [name for name in Settings.model_fields
              if name not in GROUPS and f".{name}" not in code]
    unread += [f"{group}.{name}" for group, model in GROUPS.items()
               for name in model.model_fields
               if f".{group}.{name}" not in code and f"{group}.{name}" not in code]
    assert unread == []
