"""The benchmark's data set: N user rows, every 100th reusing an earlier row's email.

``near``: row ``i`` (``i % 100 == 99``) reuses the email of row ``i - 50``, always in the same
500-row chunk, so chunks stay independent. ``far``: it reuses the email of a row about half
way back in the batch (``i // 2``), in an earlier chunk, so the planner makes chunks depend
on earlier ones (the harder case for batchops' scheduling).
"""

from __future__ import annotations

from dataclasses import dataclass

DUP_EVERY = 100
DUP_MODES = ("near", "far")


def is_dup(i: int) -> bool:
    return i % DUP_EVERY == DUP_EVERY - 1


def source_row(i: int, mode: str) -> int:
    """The earlier row whose email row ``i`` (a duplicate) reuses; never a duplicate itself."""
    if mode == "near":
        return i - 50
    if mode == "far":
        s = i // 2
        return s - 1 if is_dup(s) else s
    raise ValueError(f"unknown dup mode {mode!r}")


@dataclass(frozen=True)
class Dataset:
    size: int
    mode: str
    rows: list[tuple[int, str, str]]  # (id, email, name)

    @property
    def duplicates(self) -> int:
        return sum(1 for i in range(self.size) if is_dup(i))

    @property
    def successes(self) -> int:
        return self.size - self.duplicates

    @property
    def dup_indexes(self) -> list[int]:
        return [i for i in range(self.size) if is_dup(i)]

    def unique_rows(self) -> list[tuple[int, str, str]]:
        return [r for i, r in enumerate(self.rows) if not is_dup(i)]

    def operations(self) -> list[dict[str, object]]:
        return [{"method": "POST", "path": "/users",
                 "body": {"id": rid, "email": email, "name": name}}
                for rid, email, name in self.rows]


def make_dataset(size: int, mode: str = "near") -> Dataset:
    rows: list[tuple[int, str, str]] = []
    for i in range(size):
        src = source_row(i, mode) if is_dup(i) else i
        rows.append((i + 1, f"user{src}@example.com", f"User {i}"))
    return Dataset(size, mode, rows)
