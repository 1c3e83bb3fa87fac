"""Write ``docs/configuration.md`` from the settings classes (``--check``: fail if it is stale).

    python scripts/config_reference.py          # rewrite docs/configuration.md
    python scripts/config_reference.py --check  # exit 1 when the file differs from the settings
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batchops.settings import (  # noqa: E402
    GROUPS,
    ColumnSpec,
    ResourceSpec,
    Settings,
    SyncSpec,
    UpstreamSpec,
    env_name,
)

TARGET = REPO / "docs" / "configuration.md"

DEMO = """The production defaults expose no tables and load no handlers: `BATCHOPS_DEMO=true` adds
the demo tables (`users`, `orders`, `products`, `outbox`) and the demo handlers
(`batchops.demo.handlers`). `make up` sets it, and so does the checkout's `batchops.toml`, which
the README's first batches use.
"""

HEADER = """# Configuration

The settings are grouped by concern (in Python, `settings.api.port`), and every setting has one
`BATCHOPS_` environment variable (`BATCHOPS_API_PORT`). The same names, lower case and without
the prefix, may be set in `batchops.toml` in the working directory (or the file named by
`BATCHOPS_CONFIG_FILE`), either flat (`api_port = 8001`) or in the group's table (`[api]`,
`port = 8001`). The environment wins over `.env`, which wins over the TOML file.
Lists and tables are JSON in the environment (`BATCHOPS_CALLBACK_ALLOWED_HOSTS='["a.example"]'`)
and TOML tables in the file. Prefect's own settings (`PREFECT_API_URL`, …) configure the
Prefect client and server.

This file is generated from `batchops/settings.py` by `python scripts/config_reference.py`;
a test fails when it is out of date.
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " \\| ".join(_type_name(a) for a in args) + " (optional)"
    if origin in (list, dict):
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    if annotation is SecretStr:
        return "secret"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo, name: str) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "none"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return f"`{value!r}`" if not isinstance(value, str) else f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(model: type[BaseModel], *, group: str | None = None, env: bool = True) -> list[str]:
    """One row per field: its environment variable and its name in Python (or, for the specs
    inside a setting, its key), type, default and description."""
    first = "environment variable | setting" if env else "field"
    lines = [f"| {first} | type | default | description |",
             "|---|---|---|---|---|" if env else "|---|---|---|---|"]
    hints = typing.get_type_hints(model)
    for name, field in model.model_fields.items():
        if env and group is None and name in GROUPS:
            continue  # a group: a table of its own
        label = (f"`{env_name(name, group)}` | `{f'{group}.' if group else ''}{name}`" if env
                 else f"`{name}`")
        lines.append(f"| {label} | {_cell(_type_name(hints[name]))} | "
                     f"{_cell(_default(field, name))} | {_cell(field.description or '')} |")
    return lines


def _doc(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").strip().split("\n\n")[0].split())


def render() -> str:
    parts = [HEADER, "## Stores, targets and the demo", "", DEMO]
    parts += _table(Settings)
    for group, model in GROUPS.items():
        parts += ["", f"## `{group}`", "", _doc(model), ""]
        parts += _table(model, group=group)
    for title, model in (("A resource (`resources.<name>`)", ResourceSpec),
                         ("A column (`resources.<name>.columns.<column>`)", ColumnSpec),
                         ("An upstream (`upstreams.<name>`)", UpstreamSpec),
                         ("A bulk sync (`bulk_sync.syncs.<name>`)", SyncSpec)):
        parts += ["", f"## {title}", "", _doc(model), ""]
        parts += _table(model, env=False)
    return "\n".join(parts) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(REPO)} is out of date: run "
                  "python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
