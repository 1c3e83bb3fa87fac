"""Write ``prefect.yaml`` from the deployments of ``deployments/serve.py`` (``--check``: fail if
it is stale), so that the deployments are declared once.

    python scripts/prefect_yaml.py          # rewrite prefect.yaml
    python scripts/prefect_yaml.py --check  # exit 1 when the file differs from the code
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batchops.settings import Settings  # noqa: E402
from deployments.serve import build_deployments  # noqa: E402
from deployments.worker import WORKER_TYPE  # noqa: E402

TARGET = REPO / "prefect.yaml"

HEADER = f"""\
# Deployments of batchops, generated from deployments/serve.py by scripts/prefect_yaml.py
# (edit the code, then run the script; a test fails when they differ).
#
#   prefect work-pool create batchops --type {WORKER_TYPE}   # once (or: batchops deploy)
#   prefect --no-prompt deploy --all
#   prefect worker start --pool batchops --type {WORKER_TYPE}
name: batchops
prefect-version: {{version}}

pull:
  - prefect.deployments.steps.set_working_directory:
      directory: "{{{{ $PWD }}}}"

definitions:
  work_pool: &batchops_pool
    name: batchops
    work_queue_name: default

deployments:
"""


def _scalar(value: Any) -> str:
    """A YAML scalar (JSON's string quoting is valid YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _concurrency(deployment: Any) -> int | None:
    limit = deployment.concurrency_limit
    return getattr(limit, "limit", limit)


def _trigger(trigger: Any) -> str:
    """A deployment trigger as one JSON mapping (valid YAML), the keys as Prefect reads them."""
    data = trigger.model_dump(mode="json", exclude={"job_variables", "schedule_after"})
    data["within"] = int(trigger.within.total_seconds())
    for key in ("after", "expect", "for_each"):
        data[key] = sorted(data[key])
    return json.dumps(data, ensure_ascii=False)


def render() -> str:
    import prefect

    # the defaults, not this machine's environment
    settings = Settings.model_construct(**{
        name: field.get_default(call_default_factory=True)
        for name, field in Settings.model_fields.items()})
    lines = [HEADER.replace("{version}", prefect.__version__)]
    for deployment in build_deployments(settings):
        lines.append(f"  - name: {deployment.name}\n"
                     f"    description: {_scalar(deployment.description)}\n"
                     f"    entrypoint: {deployment.entrypoint}\n"
                     f"    tags: [{', '.join(deployment.tags)}]\n"
                     f"    enforce_parameter_schema: "
                     f"{_scalar(deployment.enforce_parameter_schema)}\n"
                     f"    parameters: {{}}\n")
        if (limit := _concurrency(deployment)) is not None:
            lines.append(f"    concurrency_limit: {limit}\n")
        if deployment.schedules:
            lines.append("    schedules:\n")
            for schedule in deployment.schedules:
                lines.append(f"      - cron: {_scalar(schedule.schedule.cron)}\n"
                             f"        timezone: {schedule.schedule.timezone}\n"
                             f"        active: {_scalar(schedule.active)}\n")
        if deployment.triggers:
            lines.append("    triggers:\n")
            for trigger in deployment.triggers:
                lines.append(f"      - {_trigger(trigger)}\n")
        lines.append("    work_pool: *batchops_pool\n\n")
    return "".join(lines).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if TARGET.read_text() != text:
            print("prefect.yaml is stale: run python scripts/prefect_yaml.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
