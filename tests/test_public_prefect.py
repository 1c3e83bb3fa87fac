"""The package uses Prefect's public surface only: no private module, attribute or keyword
argument of Prefect's, no context-variable internals, no replaced server dependencies."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "batchops", "cli", "deployments", "flows", "tasks")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")
                                         and name != "__var__")


def _prefect_names(tree: ast.AST) -> set[str]:
    """Names bound to Prefect modules or objects in this file (``import prefect.x as y``,
    ``from prefect.x import y``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("prefect", "prefect_redis"):
                    names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                "prefect", "prefect_redis"):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    prefect_names = _prefect_names(tree)
    found = []
    for node in ast.walk(tree):
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
        where = f"{shown}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prefect"):
            parts = (node.module or "").split(".")
            if any(_private(p) for p in parts):
                found.append(f"{where}: private module {node.module}")
            found += [f"{where}: private name {a.name} from {node.module}"
                      for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Import):
            found += [f"{where}: private module {a.name}" for a in node.names
                      if a.name.startswith("prefect") and any(
                          _private(p) for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if node.attr == "__var__" or (isinstance(root, ast.Name)
                                          and root.id in prefect_names):
                found.append(f"{where}: private attribute .{node.attr}")
        elif isinstance(node, ast.Call):
            found += [f"{where}: private keyword argument {k.arg}=" for k in node.keywords
                      if k.arg is not None and k.arg.startswith("_")]
        elif "MODELS_DEPENDENCIES" in (getattr(node, "id", None), getattr(node, "attr", None)):
            found.append(f"{where}: Prefect's server dependencies replaced")
    return found


def test_the_package_uses_no_private_prefect_name() -> None:
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    assert len(files) > 50
    assert [v for path in files for v in _violations(path)] == []


def test_the_check_sees_each_kind_of_private_use(tmp_path: Path) -> None:
    sample = tmp_path / "private_prefect_sample.py"
    sample.write_text(
        "from prefect._internal.compatibility import async_dispatch\n"
        "from prefect.context import SyncClientContext\n"
        "from prefect.server.database import dependencies\n"
        "import prefect\n"
        "SyncClientContext.__var__.set(None)\n"
        "dependencies.MODELS_DEPENDENCIES['x'] = 1\n"
        "state.result(_sync=True)\n"
        "prefect.flows._private_helper()\n")
    kinds = [v.split(": ", 1)[1].split(" ")[0] for v in _violations(sample)]
    assert sorted(set(kinds)) == ["Prefect's", "private"]
    assert len(kinds) == 5


# What only batchops.orchestration may use: Prefect's client, and the calls made through it
# (flow runs of deployments, artifacts).
_CLIENT_MODULES = ("prefect.client.orchestration", "prefect.client.schemas",
                   "prefect.deployments.flow_runs", "prefect.artifacts")
_CLIENT_NAMES = {"get_client", "run_deployment", "arun_deployment", "PrefectClient",
                 "SyncPrefectClient"}
ORCHESTRATION = REPO / "batchops" / "orchestration.py"


def _client_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if not module.startswith("prefect"):
                continue
            names = {a.name for a in node.names}
            if module.startswith(("prefect.client", *_CLIENT_MODULES)) or names & _CLIENT_NAMES:
                found.append(f"{shown}:{node.lineno}: from {module} import "
                             f"{', '.join(sorted(names))}")
        elif isinstance(node, ast.Import):
            found += [f"{shown}:{node.lineno}: import {a.name}" for a in node.names
                      if a.name.startswith(("prefect.client", *_CLIENT_MODULES))]
        elif isinstance(node, ast.Attribute) and node.attr in _CLIENT_NAMES:
            found.append(f"{shown}:{node.lineno}: .{node.attr}")
    return found


def test_only_the_orchestration_module_talks_to_prefects_client() -> None:
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")
             if p != ORCHESTRATION]
    assert [use for path in files for use in _client_uses(path)] == []
    assert _client_uses(ORCHESTRATION)  # the check sees the uses where they are


def test_the_client_check_sees_each_kind_of_use(tmp_path: Path) -> None:
    sample = tmp_path / "client_sample.py"
    sample.write_text(
        "import prefect\n"
        "import prefect.client.orchestration\n"
        "from prefect import get_client, flow\n"
        "from prefect.client.schemas.objects import FlowRun\n"
        "from prefect.deployments import run_deployment\n"
        "from prefect.artifacts import create_markdown_artifact\n"
        "from prefect import task\n"
        "prefect.get_client()\n")
    assert len(_client_uses(sample)) == 6
