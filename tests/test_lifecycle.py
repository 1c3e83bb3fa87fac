"""A batch's status moves only as the lifecycle's transition table says, and only the lifecycle
writes it.

The state machine applies random transitions (and transitions the table refuses) to a few
batches in the real PostgreSQL store and, after every step, compares each batch's row with a
pure model of the table: its status, whether it has finished, its flow run and its recoveries.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from batchops.errors import BatchFinished, BatchInProgress, BatchNotFound
from batchops.lifecycle import TRANSITIONS, BatchEvent, next_state
from batchops.registration import register_batch
from batchops.runtime import Runtime
from batchops.schemas import BatchState, ItemResult, ItemState
from batchops.tables import batches

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "batchops", "cli", "deployments", "flows", "tasks")
LIFECYCLE = REPO / "batchops" / "lifecycle.py"

Q, P, C, F, X = (BatchState.QUEUED, BatchState.PROCESSING, BatchState.COMPLETED,
                 BatchState.FAILED, BatchState.CANCELLED)

# -- the table ------------------------------------------------------------------------------


def test_the_table_keeps_a_cancelled_batch_cancelled_until_it_is_retried() -> None:
    assert {e: t for e, t in TRANSITIONS[X].items() if t is not X} == {BatchEvent.RETRY: Q}


def test_only_final_batches_are_retried_and_only_active_ones_cancelled() -> None:
    assert {s for s in BatchState if next_state(s, BatchEvent.RETRY)} == {C, F, X}
    assert {s for s in BatchState if next_state(s, BatchEvent.RETRY)} == {
        s for s in BatchState if s.is_final}
    assert {s for s in BatchState if next_state(s, BatchEvent.CANCEL)} == {Q, P}


def test_every_state_is_reached_from_registration_and_leads_back_to_queued() -> None:
    reached, frontier = set(), {next_state(None, BatchEvent.REGISTER)}
    while frontier:
        state = frontier.pop()
        reached.add(state)
        frontier |= set(TRANSITIONS[state].values()) - reached
    assert reached == set(BatchState)
    assert next_state(None, BatchEvent.REGISTER) is Q
    assert all(next_state(None, e) is None for e in BatchEvent if e is not BatchEvent.REGISTER)
    # Only registering writes a batch that is not there; nothing goes back to "not stored".
    assert all(None not in moves.values() for moves in TRANSITIONS.values())


# -- the state machine, against PostgreSQL --------------------------------------------------

RUNS = st.sampled_from([None, "run-a", "run-b"])
STATUSES = st.sampled_from(list(BatchState))
MOSTLY = st.sampled_from([True, True, True, False])  # a reaper's view is mostly right
STALE = timedelta(seconds=-60)  # every heartbeat is older than "now + 60 s": stale
FRESH = timedelta(hours=1)  # no heartbeat written during the test is that old


@dataclass
class Model:
    """What the table says a batch looks like."""

    status: BatchState
    to_run: int  # items a retry runs again (0: every item succeeded)
    finished: bool = False  # finished_at is set
    flow_run_id: str | None = None
    recoveries: int = 0


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self, runtime: Runtime, finished: list[str]) -> None:
        super().__init__()
        self.runtime = runtime
        self.lifecycle = runtime.lifecycle
        self.finished = finished  # batch ids the lifecycle's finish listener heard of
        self.ids: list[str] = []
        self.model: dict[str, Model] = {}
        for items in (2, 3):
            batch_id, _ = register_batch(runtime, _ops(items))
            self._add(batch_id, Model(Q, to_run=items))
        self._add(self._all_succeeded(), Model(Q, to_run=0))

    def _add(self, batch_id: str, model: Model) -> None:
        self.ids.append(batch_id)
        self.model[batch_id] = model

    def _all_succeeded(self) -> str:
        """A batch whose one item has its recorded success: a retry has nothing to run."""
        store = self.runtime.store
        batch_id, _ = register_batch(self.runtime, _ops(1))
        [(ref, _)] = store.chunks.plan(batch_id)
        [op] = store.chunks.operations(batch_id, ref.chunk_index)
        done = ItemResult(id=op.id, index=op.index, status=200, state=ItemState.SUCCEEDED)
        with store.engine.begin() as conn:
            store.chunks.record(conn, ref, [done], [done])
        return batch_id

    def _pick(self, index: int) -> tuple[str, Model]:
        batch_id = self.ids[index % len(self.ids)]
        return batch_id, self.model[batch_id]

    def _heard(self, batch_id: str) -> None:
        assert self.finished[-1:] == [batch_id]
        self.finished.clear()

    @rule(index=st.integers(0, 2), run=RUNS)
    def start(self, index: int, run: str | None) -> None:
        batch_id, m = self._pick(index)
        to = next_state(m.status, BatchEvent.START)
        assert self.lifecycle.start(batch_id, run) is (to is not None)
        if to is not None:
            m.status, m.finished, m.flow_run_id = to, False, run

    @rule(index=st.integers(0, 2), state=st.sampled_from([C, F]))
    def finish(self, index: int, state: BatchState) -> None:
        batch_id, m = self._pick(index)
        event = BatchEvent.COMPLETE if state is C else BatchEvent.FAIL
        to = next_state(m.status, event)
        assert self.lifecycle.finish(batch_id, state, "why") is (to is not None)
        self._heard(batch_id)
        if to is not None:
            m.status, m.finished = to, True
        elif next_state(m.status, BatchEvent.SETTLE) is not None:
            m.finished = True  # a cancelled batch stays cancelled, settled

    @rule(index=st.integers(0, 2))
    def settle(self, index: int) -> None:
        batch_id, m = self._pick(index)
        to = next_state(m.status, BatchEvent.SETTLE)
        assert self.lifecycle.settle(batch_id) is (to is not None and not m.finished)
        self._heard(batch_id)
        if to is not None:
            m.finished = True

    @rule(index=st.integers(0, 2))
    def cancel(self, index: int) -> None:
        batch_id, m = self._pick(index)
        to = next_state(m.status, BatchEvent.CANCEL)
        if to is None and m.status is not X:
            with pytest.raises(BatchFinished):
                self.lifecycle.cancel(batch_id)
            return
        assert self.lifecycle.cancel(batch_id) is m.status
        m.status = to or m.status

    @rule(index=st.integers(0, 2))
    def retry(self, index: int) -> None:
        batch_id, m = self._pick(index)
        to = next_state(m.status, BatchEvent.RETRY)
        if to is None:
            with pytest.raises(BatchInProgress):
                self.lifecycle.retry(batch_id)
            return
        assert self.lifecycle.retry(batch_id) == m.to_run
        if m.to_run:
            m.status, m.finished = to, False

    @rule(index=st.integers(0, 2))
    def take(self, index: int) -> None:
        batch_id, m = self._pick(index)
        allowed = (next_state(m.status, BatchEvent.TAKE) is not None and m.flow_run_id is None
                   and m.recoveries == 0)
        assert self.lifecycle.take(batch_id) is allowed

    @rule(index=st.integers(0, 2), as_seen=MOSTLY, status=STATUSES, run=RUNS, stale=MOSTLY,
          detach=st.booleans())
    def recover(self, index: int, as_seen: bool, status: BatchState, run: str | None,
                stale: bool, detach: bool) -> None:
        """Recover the batch as the reaper saw it (``as_seen``: as it is now) or from a view
        that may be out of date."""
        batch_id, m = self._pick(index)
        if as_seen:
            status, run = m.status, m.flow_run_id
        allowed = (next_state(m.status, BatchEvent.RECOVER) is not None and stale
                   and status is m.status and run == m.flow_run_id)
        assert self.lifecycle.recover(batch_id, status.value, STALE if stale else FRESH, run,
                                      detach=detach) is allowed
        if allowed:
            m.recoveries += 1
            m.flow_run_id = None if detach else m.flow_run_id

    @rule(index=st.integers(0, 2), run=st.sampled_from(["run-a", "run-b"]))
    def attach_run(self, index: int, run: str) -> None:
        batch_id, m = self._pick(index)
        self.lifecycle.attach_run(batch_id, run)
        m.flow_run_id = run

    @rule(event=st.sampled_from(["cancel", "retry"]))
    def unknown_batch(self, event: str) -> None:
        with pytest.raises(BatchNotFound):
            getattr(self.lifecycle, event)("no-such-batch")

    @invariant()
    def the_store_has_what_the_table_says(self) -> None:
        b = batches.c
        with self.runtime.store.read() as conn:
            rows = {r.id: r for r in conn.execute(
                sa.select(b.id, b.status, b.finished_at, b.flow_run_id, b.recoveries)
                .where(b.id.in_(self.ids)))}
        assert {i: (rows[i].status, rows[i].finished_at is not None, rows[i].flow_run_id,
                    rows[i].recoveries) for i in self.ids} == {
            i: (m.status.value, m.finished, m.flow_run_id, m.recoveries)
            for i, m in self.model.items()}


def _ops(n: int) -> list[dict[str, object]]:
    return [{"method": "GET", "path": f"/users/{i}"} for i in range(1, n + 1)]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_random_transitions_leave_every_batch_as_the_table_says(runtime: Runtime) -> None:
    finished: list[str] = []
    runtime.lifecycle.on_finished(finished.append)
    run_state_machine_as_test(
        lambda: LifecycleMachine(runtime, finished),
        settings=settings(max_examples=60, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                 HealthCheck.too_slow]))


# -- nothing else writes the status ---------------------------------------------------------

_RAW_STATUS_WRITE = re.compile(
    r"\bupdate\s+batches\b.*\bset\b.*\bstatus\b|\binsert\s+into\s+batches\b",
    re.IGNORECASE | re.DOTALL)


def _is_status_key(node: ast.expr | None) -> bool:
    return (isinstance(node, ast.Constant) and node.value == "status") or (
        isinstance(node, ast.Attribute) and node.attr == "status")


def _writes_status(call: ast.Call) -> bool:
    """``.values(status=…)``, ``.values({"status": …})``, ``.values(**{"status": …})``, or
    parameters ``[{"status": …}]`` given to ``execute``."""
    if any(k.arg == "status" for k in call.keywords):
        return True
    given = [*call.args, *(k.value for k in call.keywords if k.arg is None)]
    return any(isinstance(d, ast.Dict) and any(_is_status_key(k) for k in d.keys)
               for a in given for d in ast.walk(a))


def _table_aliases(tree: ast.AST) -> set[str]:
    """Names bound to the ``batches`` table in the file (``t = batches``, ``a, t = x, batches``)."""
    names = {"batches"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = (zip(target.elts, node.value.elts, strict=False)
                         if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                         else [(target, node.value)])
                for name, value in pairs:
                    if isinstance(name, ast.Name) and _is_table(value, names):
                        names.add(name.id)
    return names


def _is_table(node: ast.expr, aliases: set[str]) -> bool:
    return ((isinstance(node, ast.Name) and node.id in aliases)
            or (isinstance(node, ast.Attribute) and node.attr == "batches"))


def _on_batches(node: ast.expr, aliases: set[str]) -> bool:
    """Whether a statement chain (``batches.update().where(…)``, ``sa.update(batches)``,
    ``insert(batches).values``) is on the batches table."""
    while True:
        if _is_table(node, aliases):
            return True
        if isinstance(node, ast.Call):
            if any(_is_table(a, aliases) for a in node.args):
                return True
            node = node.func
        elif isinstance(node, ast.Attribute):
            node = node.value
        else:
            return False


def status_writes(source: str, name: str = "<source>") -> list[str]:
    """Where ``source`` writes ``batches.status``, as ``name:line``."""
    tree = ast.parse(source, filename=name)
    aliases = _table_aliases(tree)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            values = node.func.attr == "values" and _on_batches(node.func.value, aliases)
            # conn.execute(batches.update(), [{...}]): the parameters after the statement
            params = ast.Call(func=node.func, args=node.args[1:], keywords=[])
            executed = (node.func.attr in ("execute", "executemany") and bool(node.args)
                        and _on_batches(node.args[0], aliases))
            if (values and _writes_status(node)) or (executed and _writes_status(params)):
                found.add(node.lineno)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and _RAW_STATUS_WRITE.search(node.value)):
            found.add(node.lineno)
    return [f"{name}:{line}" for line in sorted(found)]


def test_only_the_lifecycle_writes_a_batch_status() -> None:
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    assert len(files) > 50
    writes = [w for path in files if path != LIFECYCLE
              for w in status_writes(path.read_text(), str(path.relative_to(REPO)))]
    assert writes == []
    # The lifecycle's own two statements (its conditional update, its insert) are seen.
    assert len(status_writes(LIFECYCLE.read_text())) == 2


def test_the_check_sees_each_way_of_writing_the_status() -> None:
    sample = (
        "conn.execute(batches.update().where(batches.c.id == i).values(status='failed'))\n"
        "conn.execute(sa.update(batches).values({batches.c.status: 'failed'}))\n"
        "conn.execute(insert(batches).values(**{'status': 'queued'}))\n"
        "t, c = item_claims, batches\n"
        "conn.execute(t.update().values(batch_id=x))\n"  # another table: not a write
        "conn.execute(c.update().where(c.c.id == i)\n"
        "             .values(status=BatchState.COMPLETED.value))\n"
        "conn.execute(store.batches.update(), [{'id': i, 'status': 'queued'}])\n"
        "conn.exec_driver_sql(\"UPDATE batches SET status = 'failed' WHERE id = %s\")\n"
        "conn.execute(sa.text('insert into batches (id, status) values (:i, :s)'))\n"
        "conn.execute(callbacks.update().values(status='delivered'))\n"  # not batches
        "conn.execute(batches.update().values(error='x'))\n"  # not the status
    )
    assert status_writes(sample) == [f"<source>:{n}" for n in (1, 2, 3, 6, 8, 9, 10)]
