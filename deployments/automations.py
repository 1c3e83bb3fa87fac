"""Prefect automations that re-run deployment flow runs whose process died.

A worker (or the machine under it) that dies with ``kill -9`` leaves its flow runs
``Running`` in Prefect: nothing is left to report their end. Prefect's own answer, used here:

1. **Heartbeats.** With ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` set (the scaled system sets
   30 s, Prefect's minimum), every flow run emits a ``prefect.flow-run.heartbeat`` event.
2. **Zombie → Crashed.** A proactive automation expects another heartbeat (or a final state)
   within ``zombie_seconds`` of the last one; when none comes, it sets the run ``Crashed``.
3. **Crashed → re-run.** A reactive automation puts a crashed run of a batchops deployment
   back to ``Scheduled`` (``AwaitingRetry``), so a live worker of the pool picks it up. The
   re-run resumes the batch from its completed chunks (the store's checkpoints and the
   chunk cache); items already done are not executed again.

A run that crashes for good (a bug that kills the process every time) is retried again and
again; cancel it in the UI. Subflow runs (``process-batch`` inside ``bulk-sync``) have no
deployment, so they are not rescheduled themselves: their parent is.
"""

from __future__ import annotations

from datetime import timedelta

from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

__all__ = [
    "RERUN_AUTOMATION",
    "ZOMBIE_AUTOMATION",
    "ensure_rerun_automations",
    "rerun_automations",
]

ZOMBIE_AUTOMATION = "batchops: flow run without heartbeat is crashed"
RERUN_AUTOMATION = "batchops: crashed deployment run is scheduled again"
_FINAL = ["prefect.flow-run.Completed", "prefect.flow-run.Failed",
          "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"]


def rerun_automations(deployments: list[str], zombie_seconds: int) -> list[AutomationCore]:
    """The two automations, for flow runs of the named deployments."""
    of_deployments = {"prefect.resource.role": "deployment",
                      "prefect.resource.name": deployments}
    zombie = AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="No heartbeat (or final state) from a pending or running flow run for "
                    f"{zombie_seconds} s: its process is gone.",
        trigger=EventTrigger(
            # Pending and Running too: a process killed before its first heartbeat.
            after={"prefect.flow-run.Pending", "prefect.flow-run.Running",
                   "prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.Running", "prefect.flow-run.heartbeat", *_FINAL},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=of_deployments,
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=zombie_seconds),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {zombie_seconds} s: the process running it is gone")],
    )
    rerun = AutomationCore(
        name=RERUN_AUTOMATION,
        description="A crashed run of a batchops deployment goes back to its work pool.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=of_deployments,
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[ChangeFlowRunState(
            state=StateType.SCHEDULED, name="AwaitingRetry", force=True,
            message="crashed: scheduled again, resumes from its completed chunks")],
    )
    return [zombie, rerun]


def ensure_rerun_automations(deployments: list[str], zombie_seconds: int) -> None:
    """Create (or replace) the two automations on the Prefect server of ``PREFECT_API_URL``."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for automation in rerun_automations(deployments, zombie_seconds):
            for existing in client.read_automations_by_name(automation.name):
                client.delete_automation(existing.id)
            client.create_automation(automation)
