"""Sync runs in the API send their Prefect writes one at a time (``api.runs._OneWriteAtATime``).

The transport is tested on its own, in front of a stand-in server that records how many
requests it is answering at once: what it must guarantee is about overlap, not about Prefect.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from api.runs import _OneWriteAtATime


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
    gate = threading.Lock()

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
    gate = threading.Lock()
    transport = _OneWriteAtATime(httpx.MockTransport(server), gate)
    with httpx.Client(transport=transport, base_url="http://prefect.test") as client, \
            ThreadPoolExecutor(max_workers=2) as pool:
        gate.acquire()  # a write of another thread is under way
        try:
            read = pool.submit(client.get, "/flow_runs/x")
            write = pool.submit(client.post, "/flow_runs/", content=b"w")
            assert read.result(timeout=10).status_code == 201
            time.sleep(0.2)
            assert not write.done() and server.bodies == []
        finally:
            gate.release()
        assert write.result(timeout=10).json() == {"echo": "w"}
