"""Settings: pydantic-settings models by concern, ``BATCHOPS_`` prefix, read once via
``get_settings()``.

``Settings`` holds the stores, the targets and the demo switch at the top and the rest in groups
(``settings.api``, ``.execution``, ``.recovery``, ``.callbacks``, ``.bulk_sync``). Every field
has one flat environment variable: ``BATCHOPS_API_PORT`` is ``settings.api.port``,
``BATCHOPS_CALLBACK_SECRET`` is ``settings.callbacks.secret``.

Sources, highest priority first: init arguments, environment (``BATCHOPS_*``; nested values as
JSON, e.g. ``BATCHOPS_RESOURCES='{...}'``; lists of names as JSON or comma-separated,
``BATCHOPS_API_KEYS=k1,k2``), a ``.env`` file, then ``batchops.toml`` in the working directory
(or the file named by ``BATCHOPS_CONFIG_FILE``), whose keys are the flat names
(``api_port = 8001``) or a group's table (``[api]`` ``port = 8001``). A setting that does not
validate makes :func:`get_settings` raise one :class:`~batchops.errors.ConfigurationError`
naming it.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from batchops.errors import ConfigurationError

__all__ = ["GROUPS", "ApiSettings", "BulkSyncSettings", "CallbackSettings", "ColumnSpec",
           "ExecutionSettings", "RecoverySettings", "ResourceSpec", "Settings", "SyncSpec",
           "UpstreamSpec", "env_name", "get_settings"]

ColumnType = Literal["integer", "bigint", "text", "numeric", "float", "boolean", "timestamp",
                     "date", "json"]

MAX_CHUNK_SIZE = 100_000  # items in one chunk task run, at most


def _json_or_comma_list(value: Any) -> Any:
    """A list given as text (the environment): a JSON list, or values separated by commas."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a valid JSON list ({exc.msg}); or write a,b,c") from None
    return [part.strip() for part in text.split(",") if part.strip()]


# A list setting: a JSON list or ``a,b,c`` in the environment, a list in batchops.toml.
NameList = Annotated[list[str], NoDecode, BeforeValidator(_json_or_comma_list)]
SecretList = Annotated[list[SecretStr], NoDecode, BeforeValidator(_json_or_comma_list)]


class ColumnSpec(BaseModel):
    """One column of a declared table."""

    type: ColumnType = "text"
    nullable: bool = True
    unique: bool = False
    precision: int | None = Field(None, ge=1, le=1000,
                                  description="numeric: total digits (none: the database's)")
    scale: int | None = Field(None, ge=0, le=1000,
                              description="numeric: digits after the point (with precision)")

    @model_validator(mode="after")
    def _scale_within_precision(self) -> ColumnSpec:
        if self.scale is not None and (self.precision is None or self.scale > self.precision):
            raise ValueError("scale needs a precision at least as large")
        if self.precision is not None and self.type != "numeric":
            raise ValueError("precision and scale apply to numeric columns")
        return self


class ResourceSpec(BaseModel):
    """A table exposed as a REST resource: ``/{name}`` and ``/{name}/{primary key}``."""

    table: str | None = None
    primary_key: str = "id"
    columns: dict[str, ColumnSpec]
    database_url: str | None = None  # None: the store's database
    create: bool = False  # create the table if missing (demo resources)

    @model_validator(mode="after")
    def _primary_key_is_a_column(self) -> ResourceSpec:
        if self.primary_key not in self.columns:
            raise ValueError(f"primary_key {self.primary_key!r} is not among the columns")
        return self


class SyncSpec(BaseModel):
    """A bulk sync: rows changed since its watermark, applied to ``resource`` as batches.

    The source is either a table (``table`` in ``source_url``, default the store's database),
    read in the order of ``cursor`` (an ``updated_at``-like column) then ``primary_key``, or a
    directory of CSV files (``csv_dir``), read in the order of their modification times, whose
    headers name the resource's columns. A table's columns go to the resource's columns of the
    same name, or as ``columns`` maps them (source column → resource column).
    """

    resource: str
    method: Literal["PUT", "PATCH", "POST"] = "PUT"
    table: str | None = None
    source_url: str | None = None  # None: the store's database
    primary_key: str = "id"
    cursor: str = "updated_at"
    columns: dict[str, str] | None = None
    csv_dir: Path | None = None
    batch_rows: int = Field(100_000, ge=1, description="rows per batch; more rows, more batches")
    concurrency: int | None = Field(None, ge=1, le=1000)

    @model_validator(mode="after")
    def _one_source(self) -> SyncSpec:
        if (self.table is None) == (self.csv_dir is None):
            raise ValueError("a sync reads either a table or a csv_dir (exactly one of them)")
        return self


class UpstreamSpec(BaseModel):
    """An upstream REST API: operations under ``prefix`` are forwarded to ``base_url``.

    ``/crm/contacts/7`` with prefix ``/crm`` and base_url ``http://127.0.0.1:9000`` goes to
    ``http://127.0.0.1:9000/contacts/7`` (``strip_prefix``) or ``.../crm/contacts/7``.
    Limits hold for every batch and every worker: at most ``max_concurrency`` requests in
    flight (Prefect global concurrency limits) and ``rate_limit_per_second`` requests a second
    (a GCRA budget, in Redis when ``redis_url`` is set; see :mod:`batchops.targets.rate`).
    """

    prefix: str = Field(pattern=r"^/[A-Za-z0-9_~.-]+(?:/[A-Za-z0-9_~.-]+)*$")
    base_url: str = Field(pattern=r"^https?://")
    strip_prefix: bool = True
    forward_headers: list[str] = Field(
        default_factory=lambda: ["content-type", "accept", "x-request-id"],
        description="operation headers forwarded upstream (case-insensitive allowlist)")
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="fixed headers sent with every request (e.g. auth)")
    max_concurrency: int = Field(10, ge=1, le=1000)
    rate_limit_per_second: float | None = Field(
        None, gt=0, description="requests a second for all workers together (a GCRA budget in "
        "Redis when redis_url is set, else in each process)")
    rate_limit_headroom: float = Field(
        0.03, ge=0, lt=0.5, description="fraction of rate_limit_per_second left unused: "
        "requests reach the upstream with some jitter, and its window counts arrivals")
    rate_lease_seconds: float = Field(
        0.15, gt=0, le=5, description="a worker leases this many seconds of its rate from the "
        "shared budget at a time (one coordination call each)")
    adaptive: bool = Field(True, description="on 429/Retry-After halve the rate (with a rate "
                           "limit) or the concurrency, then grow back (AIMD)")
    connect_timeout: float = Field(5.0, gt=0)
    timeout: float = Field(30.0, gt=0, description="read/write/pool timeout per request")
    max_connections: int = Field(100, ge=1)
    retries: int = Field(5, ge=0, description="attempts after the first, per item")
    backoff_seconds: float = Field(0.5, ge=0, description="first retry's mean delay")
    max_backoff_seconds: float = Field(30.0, ge=0)
    max_retry_after_seconds: float = Field(60.0, ge=0, description="cap on Retry-After")

    @property
    def header_allowlist(self) -> frozenset[str]:
        return frozenset(h.lower() for h in self.forward_headers)


class _Group(BaseModel):
    """Settings of one concern: ``settings.<group>.<field>``, each read from its own
    ``BATCHOPS_*`` variable (the field's alias when it has one, else its name)."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)


class ApiSettings(_Group):
    """The HTTP API: where it listens, who may call it, how much a request may hold, and when a
    batch is answered synchronously."""

    host: str = Field("127.0.0.1", validation_alias="api_host",
                      description="address the API listens on")
    port: int = Field(8000, ge=0, le=65535, validation_alias="api_port",
                      description="port the API listens on")
    keys: SecretList = Field(
        [], validation_alias="api_keys",
        description="API keys (or 'sha256:<hex>' of one): a JSON list or k1,k2")
    allowed_hosts: Annotated[list[str] | None, NoDecode,
                             BeforeValidator(_json_or_comma_list)] = Field(
        None, description="Host header values the API answers (names or addresses, any port; "
        "'*.example.com', '*'); unset: loopback names without API keys, any host with them")
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="a request's line and headers, together; a larger "
        "head is refused before it is read on")
    max_operations: int = Field(1000, ge=1, description="per request to POST /batches")
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1, description="per request body")
    max_import_rows: int = Field(1_000_000, ge=1, description="per CSV/file import")
    max_import_bytes: int = Field(200 * 1024 * 1024, ge=1, description="per CSV upload")
    quota_ops_per_minute: int = Field(
        60_000, ge=0, description="operations per API key per minute; 0: no quota")
    sync_threshold: int = Field(
        100, ge=0, description="mode auto: batches of up to this many operations are "
        "answered synchronously (200/207)")
    sync_wait_seconds: float = Field(
        10, ge=0, description="how long a synchronous batch is waited for before the answer "
        "is 202")
    max_sync_wait_seconds: float = Field(60, ge=0, description="cap on Prefer: wait=N")
    sync_workers: int = Field(8, ge=1, le=256,
                              description="synchronous batches running at once in one API")
    process_batch_deployment: str = Field(
        "process-batch/process-batch", description="the deployment an async batch's flow run "
        "is created from")

    @field_validator("allowed_hosts")
    @classmethod
    def _normalize_allowed_hosts(cls, hosts: list[str] | None) -> list[str] | None:
        if hosts is None:
            return None
        names = [h.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
                 for h in hosts if h.strip()]
        return names or None  # empty: the default


class ExecutionSettings(_Group):
    """How a batch runs: its chunks (task runs), their parallelism, retries and checkpoints."""

    chunk_size: int | None = Field(
        None, ge=1, le=MAX_CHUNK_SIZE, description="items per chunk task run, fixed; unset: "
        "chunks are sized by work (chunk_seconds, max_chunk_items)")
    chunk_seconds: float = Field(
        2.0, gt=0, description="estimated work in one chunk task run (a task run costs the "
        "Prefect server tens of milliseconds, so a batch gets few of them)")
    max_chunk_items: int = Field(
        10_000, ge=1, le=MAX_CHUNK_SIZE, description="items in one chunk task run, at most "
        "(database statements take pages of at most 500 rows either way)")
    default_concurrency: int = Field(
        10, ge=1, le=1000, description="items of one chunk in flight at once, unless the "
        "batch says otherwise")
    chunk_workers: int = Field(4, ge=1, le=64, description="chunk task runs in parallel")
    chunk_retries: int = Field(2, ge=0, description="retries of a chunk task run that failed")
    chunk_retry_backoff_seconds: float = Field(
        1.0, ge=0, description="delay before a chunk task run's retry")
    heartbeat_seconds: float = Field(5, gt=0, description="a running chunk's heartbeat period")
    checkpoint_linger_seconds: float = Field(
        0.05, ge=0, le=1, description="a chunk's checkpoint writer gathers item results this "
        "long after the first before it commits them (0: commit what has queued up at once)")
    result_cache_hours: float = Field(
        24, gt=0, description="how long a completed chunk's cached result lets a re-run of its "
        "batch skip it")
    artifact_max_rows: int = Field(
        1000, ge=1, description="rows of the item table artifact (failures first beyond it)")


class RecoverySettings(_Group):
    """What happens to work whose process went away, and how long records are kept."""

    stale_after_seconds: float = Field(
        60, gt=0, description="a processing batch silent this long is re-run by the reaper; "
        "an idempotency key claimed by it may be taken over")
    slot_wait_seconds: float = Field(
        30, gt=0, description="a batch that has waited this long for an upstream's "
        "concurrency slots gives back the slots no live run holds (see batchops.limit_leases), "
        "logs who holds the rest, and waits again")
    max_recoveries: int = Field(
        5, ge=0, description="times the reaper re-runs one batch before marking it failed")
    reaper_cron: str = Field(
        "0 * * * *", description="schedule of the reaper deployment's backstop sweep (a "
        "crashed process-batch run starts it at once; batchops workers sweep at their "
        "heartbeat)")
    idempotency_retention_hours: float = Field(
        24, gt=0, description="how long an Idempotency-Key (of a request or an operation) "
        "answers with its first result")


class CallbackSettings(_Group):
    """Completion callbacks: a signed summary POSTed to a batch's callback_url when it
    finishes. Refused unless the host is on the allowlist (empty: no callbacks at all)."""

    secret: SecretStr | None = Field(
        None, validation_alias="callback_secret",
        description="HMAC-SHA256 key of the Batchops-Signature header")
    allowed_hosts: NameList = Field(
        [], validation_alias="callback_allowed_hosts",
        description="hosts callbacks may go to: exact, '*.example.com' or '*' (any host)")
    allow_private: bool = Field(
        False, validation_alias="callback_allow_private",
        description="allow loopback, private and link-local callback addresses")
    timeout_seconds: float = Field(10, gt=0, validation_alias="callback_timeout_seconds",
                                   description="per delivery attempt")
    retries: int = Field(5, ge=0, le=20, validation_alias="callback_retries",
                         description="attempts after the first")
    backoff_seconds: float = Field(
        2.0, ge=0, validation_alias="callback_backoff_seconds",
        description="first retry delay; doubles each retry (with jitter)")

    @field_validator("allowed_hosts")
    @classmethod
    def _normalize_hosts(cls, hosts: list[str]) -> list[str]:
        return [h.strip().lower().rstrip(".") for h in hosts if h.strip()]

    @model_validator(mode="after")
    def _callbacks_are_signed(self) -> CallbackSettings:
        if self.allowed_hosts and self.secret is None:
            raise ValueError("callback_allowed_hosts needs callback_secret: callbacks are "
                             "always signed")
        return self


class BulkSyncSettings(_Group):
    """Bulk syncs: the bulk-sync deployment runs them, all of them on its schedule."""

    syncs: dict[str, SyncSpec] = Field(default_factory=dict,
                                       description="name → a source and a resource")
    cron: str = Field("*/15 * * * *", validation_alias="sync_cron",
                      description="schedule of the bulk-sync deployment")
    schedule_active: bool = Field(
        False, validation_alias="sync_schedule_active",
        description="the bulk-sync schedule is paused unless this is set")


# The groups, by their attribute on Settings (and their table in batchops.toml).
GROUPS: dict[str, type[_Group]] = {
    "api": ApiSettings,
    "execution": ExecutionSettings,
    "recovery": RecoverySettings,
    "callbacks": CallbackSettings,
    "bulk_sync": BulkSyncSettings,
}


def env_name(field_name: str, group: str | None = None) -> str:
    """``BATCHOPS_<NAME>`` of a top-level setting, or of a field of a group."""
    if group is None:
        return f"BATCHOPS_{field_name.upper()}"
    field = GROUPS[group].model_fields[field_name]
    alias = field.validation_alias if isinstance(field.validation_alias, str) else None
    return f"BATCHOPS_{(alias or field_name).upper()}"


class Settings(BaseSettings):
    """Every batchops setting. The stores, the targets and the demo at the top; the rest by
    concern (``settings.api``, ``.execution``, ``.recovery``, ``.callbacks``, ``.bulk_sync``).
    Every field, grouped or not, has one flat environment variable (``BATCHOPS_API_PORT`` is
    ``settings.api.port``)."""

    model_config = SettingsConfigDict(env_prefix="BATCHOPS_", extra="ignore")

    database_url: str = Field("sqlite:///.data/batchops.db",
                              description="the batch store (and the sql target's tables)")
    redis_url: str | None = Field(
        None, description="Redis for live status, shared rate limits and quotas; unset: "
        "each process on its own")
    prefect_ui_url: str = Field("http://127.0.0.1:4200",
                                description="the Prefect UI that links point at")
    resources: dict[str, ResourceSpec] = Field(
        default_factory=dict, description="sql target: name → a table exposed as /{name}")
    upstreams: dict[str, UpstreamSpec] = Field(
        default_factory=dict, description="http targets: name → upstream API")
    handler_modules: NameList = Field(
        [], description="python targets: modules whose @handler functions are loaded")
    demo: bool = Field(
        False, description="add the demo tables (users, orders, products, outbox) and the "
        "demo handlers to the configured ones; `make up` and the checkout's batchops.toml "
        "set it")

    api: ApiSettings = Field(default_factory=ApiSettings)
    execution: ExecutionSettings = Field(default_factory=ExecutionSettings)
    recovery: RecoverySettings = Field(default_factory=RecoverySettings)
    callbacks: CallbackSettings = Field(default_factory=CallbackSettings)
    bulk_sync: BulkSyncSettings = Field(default_factory=BulkSyncSettings)

    @model_validator(mode="after")
    def _add_demo(self) -> Settings:
        if self.demo:
            from batchops.demo.resources import DEMO_HANDLER_MODULE, demo_resources

            self.resources = {**demo_resources(), **self.resources}
            if DEMO_HANDLER_MODULE not in self.handler_modules:
                self.handler_modules = [*self.handler_modules, DEMO_HANDLER_MODULE]
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The one place the environment is read directly: which TOML file to use.
        toml_file = Path(os.environ.get("BATCHOPS_CONFIG_FILE", "batchops.toml"))
        flat = _flat_settings()
        return (
            _Grouped(settings_cls, init_settings),
            _Grouped(settings_cls, EnvSettingsSource(flat, env_prefix="BATCHOPS_")),
            _Grouped(settings_cls, DotEnvSettingsSource(flat, env_file=".env",
                                                        env_prefix="BATCHOPS_")),
            _Grouped(settings_cls, TomlConfigSettingsSource(settings_cls, toml_file=toml_file)),
        )


def _flat_names() -> dict[str, tuple[str | None, str]]:
    """Every setting's flat name → (its group or None, its field name)."""
    names: dict[str, tuple[str | None, str]] = {
        name: (None, name) for name in Settings.model_fields if name not in GROUPS}
    for group, model in GROUPS.items():
        for name in model.model_fields:
            names[env_name(name, group).removeprefix("BATCHOPS_").lower()] = (group, name)
    return names


@lru_cache(maxsize=1)
def _flat_settings() -> type[BaseSettings]:
    """A settings class with one field per flat name, of the field's type (with its decoding
    rules): what the environment and ``.env`` sources read from."""
    annotations: dict[str, Any] = {}
    for flat, (group, name) in _flat_names().items():
        info = (Settings if group is None else GROUPS[group]).model_fields[name]
        annotations[flat] = Annotated[(info.annotation, *info.metadata)] if info.metadata \
            else info.annotation
    # every default None, "unset" (defaults are not validated)
    namespace: dict[str, Any] = {"__annotations__": annotations, **dict.fromkeys(annotations)}
    return type("FlatSettings", (BaseSettings,), namespace)


class _Grouped(PydanticBaseSettingsSource):
    """A source whose flat names (``api_port``) are moved into their groups
    (``{"api": {"port": …}}``); tables already grouped (``[api]`` in TOML) stay as they are,
    a flat name given beside one wins."""

    def __init__(self, settings_cls: type[BaseSettings], source: PydanticBaseSettingsSource):
        super().__init__(settings_cls)
        self._source = source

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads the wrapped source

    def __call__(self) -> dict[str, Any]:
        names = _flat_names()
        grouped: dict[str, Any] = {}
        flat_values: list[tuple[str, Any]] = []
        for key, value in self._source().items():
            if key in GROUPS and isinstance(value, dict):
                grouped.setdefault(key, {}).update(value)
            else:
                flat_values.append((key, value))
        for key, value in flat_values:
            group, name = names.get(key.lower(), (None, key))
            if group is None:
                grouped[key] = value
            else:
                grouped.setdefault(group, {})[name] = value
        return grouped


def _where(loc: tuple[int | str, ...]) -> str:
    """An error's location as the user wrote it: the environment variable, then the path
    inside its value."""
    head, rest = str(loc[0]), loc[1:]
    if head in GROUPS and rest and str(rest[0]) in GROUPS[head].model_fields:
        head, rest = env_name(str(rest[0]), head), rest[1:]
    elif head in GROUPS and rest:  # not a field of the group: a key of a TOML table
        head, rest = f"[{head}] {rest[0]}", rest[1:]
    else:
        head = env_name(head)
    return head + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest)


def _describe(exc: ValidationError) -> str:
    """Every problem on one line, named by its environment variable (values not shown: some
    are secrets)."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = error["loc"]
        if not loc:  # a rule across settings
            problems.append(f"invalid settings: {error['msg']}")
            continue
        if len(loc) == 1 and str(loc[0]) in GROUPS:  # a rule across a group's settings
            problems.append(f"invalid {loc[0]} settings: {error['msg']}")
            continue
        problems.append(f"invalid setting {_where(loc)}: {error['msg']}")
    return "; ".join(problems)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once. Tests call ``get_settings.cache_clear()``.

    Raises:
        ConfigurationError: a setting is invalid (one line naming each bad setting).
    """
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc)) from None
    except SettingsError as exc:  # a value the environment source could not decode
        field = re.search(r'field "([^"]+)"', str(exc))
        name = env_name(field.group(1)) if field else "a setting"
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise ConfigurationError(f"invalid setting {name}: cannot decode its value{cause}"
                                 ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"the settings file is not valid TOML: {exc}") from None
