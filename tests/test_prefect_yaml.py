"""``prefect.yaml``: generated from the code's deployments, and deployable with Prefect's own
commands (``prefect work-pool create`` once, then ``prefect --no-prompt deploy --all``)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_prefect_yaml_is_the_code_s_deployments() -> None:
    check = subprocess.run([sys.executable, "scripts/prefect_yaml.py", "--check"], cwd=REPO,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.usefixtures("prefect_server")
def test_prefect_deploy_all_registers_every_deployment_on_a_batchops_pool(
        tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    pool = f"batchops-yaml-{uuid.uuid4().hex[:6]}"
    (tmp_path / "prefect.yaml").write_text(
        (REPO / "prefect.yaml").read_text().replace("name: batchops\n    work_queue",
                                                    f"name: {pool}\n    work_queue"))
    for flows in (REPO / "flows").glob("*.py"):  # prefect deploy reads the entrypoints' files
        (tmp_path / "flows").mkdir(exist_ok=True)
        (tmp_path / "flows" / flows.name).write_text(flows.read_text())
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "PYTHONPATH": str(REPO)}

    def prefect(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=180)

    created = prefect("work-pool", "create", pool, "--type", "batchops")
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = prefect("--no-prompt", "deploy", "--all")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    with get_client(sync_client=True) as client:
        try:
            assert client.read_work_pool(pool).type == "batchops"
            deployments = {d.name: d for d in client.read_deployments()
                           if d.work_pool_name == pool}
            assert sorted(deployments) == ["bulk-sync", "process-batch", "reap-stale-batches",
                                           "replay-dead-letters", "retry-failed"]
            assert all(d.tags == ["batchops"] and d.enforce_parameter_schema
                       for d in deployments.values())
            [reaper_schedule] = deployments["reap-stale-batches"].schedules
            assert reaper_schedule.active
            # its trigger became an automation that runs it when a batch run crashes
            [automation] = client.read_resource_related_automations(
                f"prefect.deployment.{deployments['reap-stale-batches'].id}")
            assert automation.name == "process-batch run crashed"
            assert automation.trigger.expect == {"prefect.flow-run.Crashed"}
        finally:
            for deployment in client.read_deployments():
                if deployment.work_pool_name == pool:
                    client.delete_deployment(deployment.id)
            client.delete_work_pool(pool)
