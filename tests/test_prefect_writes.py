"""Sync runs in the API send their Prefect writes one at a time (``api.runs._OneWriteAtATime``).

The transport is tested on its own, in front of a stand-in server that records how many
requests it is answering at once: what it must guarantee is about overlap, not about Prefect.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from api.runs import WriteGate, _OneWriteAtATime


class _Recorder:
    """Answers every request after a short pause; the most requests of a kind at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = {"GET": 0, "POST": 0}
        self.most = {"GET": 0, "POST": 0}
        self.bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        kind = "GET" if request.method == "GET" else "POST"
        with self.lock:
            self.now[kind] += 1
            self.most[kind] = max(self.most[kind], self.now[kind])
            if kind == "POST":
                self.bodies.append(request.content)
        time.sleep(0.02)
        with self.lock:
            self.now[kind] -= 1
        return httpx.Response(201, json={"echo": request.content.decode() or None})


def test_writes_from_several_threads_never_overlap_and_each_gets_its_own_answer() -> None:
    server = _Recorder()
    gate = WriteGate()

    def client_work(n: int) -> list[tuple[int, object]]:
        # One client per thread, as BatchRunner makes them; one gate for the process.
        transport = _OneWriteAtATime(httpx.MockTransport(server), gate)
        with httpx.Client(transport=transport, base_url="http://prefect.test") as client:
            answers: list[tuple[int, object]] = []
            for i in range(5):
                answers.append((client.get("/flow_runs/x").status_code, None))
                r = client.post("/flow_runs/", content=f"{n}-{i}".encode())
                answers.append((r.status_code, r.json()["echo"]))
            return answers

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(client_work, range(4)))

    assert server.most["POST"] == 1
    assert sorted(server.bodies) == sorted(f"{n}-{i}".encode() for n in range(4) for i in range(5))
    for n, answers in enumerate(results):
        assert [echo for code, echo in answers if echo is not None] == [
            f"{n}-{i}" for i in range(5)]
        assert all(code in (200, 201) for code, _ in answers)


def test_reads_go_at_once_while_a_write_waits_its_turn() -> None:
    server = _Recorder()
    gate = WriteGate()
    transport = _OneWriteAtATime(httpx.MockTransport(server), gate)
    with httpx.Client(transport=transport, base_url="http://prefect.test") as client, \
            ThreadPoolExecutor(max_workers=2) as pool:
        with gate.turn():  # a write of another thread is under way
            read = pool.submit(client.get, "/flow_runs/x")
            write = pool.submit(client.post, "/flow_runs/", content=b"w")
            assert read.result(timeout=10).status_code == 201
            time.sleep(0.2)
            assert not write.done() and server.bodies == []
        assert write.result(timeout=10).json() == {"echo": "w"}


def test_a_write_that_can_wait_lets_an_urgent_one_go_first() -> None:
    gate = WriteGate(max_defer=5)
    order: list[str] = []

    def write(name: str, urgent: bool) -> None:
        with gate.turn(urgent):
            order.append(name)

    with ThreadPoolExecutor(max_workers=2) as pool, gate.turn():  # a write under way
        later = pool.submit(write, "answered run's artifact", False)
        time.sleep(0.1)
        first = pool.submit(write, "next run's create", True)
        time.sleep(0.1)
        assert order == []  # both wait for the write under way
    first.result(timeout=10)
    later.result(timeout=10)
    assert order == ["next run's create", "answered run's artifact"]


def test_a_write_that_can_wait_goes_after_max_defer_even_if_urgent_ones_keep_coming() -> None:
    gate = WriteGate(max_defer=0.3)
    stop = threading.Event()

    def urgent_stream() -> None:
        while not stop.is_set():
            with gate.turn(True):
                time.sleep(0.01)

    with ThreadPoolExecutor(max_workers=3) as pool:
        streams = [pool.submit(urgent_stream) for _ in range(2)]
        time.sleep(0.05)
        started = time.monotonic()
        try:
            with gate.turn(False):
                waited = time.monotonic() - started
        finally:
            stop.set()
        for s in streams:
            s.result(timeout=10)
    assert waited < 5


def test_a_write_that_can_wait_waits_while_a_run_has_not_answered() -> None:
    gate = WriteGate(max_defer=5)
    done = threading.Event()

    def bookkeeping() -> None:
        with gate.turn(False):
            done.set()

    gate.begin_urgent()  # the next caller's run has started
    with ThreadPoolExecutor(max_workers=1) as pool:
        later = pool.submit(bookkeeping)
        time.sleep(0.2)
        assert not done.is_set()
        with gate.turn(True):  # that run's own writes go meanwhile
            pass
        assert not done.is_set()
        gate.end_urgent()  # it has answered
        later.result(timeout=10)
    assert done.is_set()
