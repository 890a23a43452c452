"""The parked prefixes hashed ahead (L{dragonfly.supernode.prehash}): used only for the very bytes hashed."""

from __future__ import annotations

import os
import threading
from typing import Any

from dragonfly.core.bodywriter import rehash_prefix
from dragonfly.supernode.prehash import Plan, Prehash, parked_plans

PIECE = 1024


def write(path: Any, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return str(path)


def test_the_point_is_the_one_a_rehash_gives(tmp_path: Any) -> None:
    path = write(tmp_path / "t.data", 5 * PIECE + 100)
    plan = Plan(path, 5 * PIECE + 50, PIECE)
    point = Prehash([("t", plan)]).take("t", plan)
    again = rehash_prefix(path, plan.offset, PIECE)
    assert point is not None and point.offset == again.offset and point.digests == again.digests
    assert point.file_hash.hexdigest() == again.file_hash.hexdigest()
    assert point.chunk_hash.hexdigest() == again.chunk_hash.hexdigest()


def test_taken_once_and_only_for_the_same_plan(tmp_path: Any) -> None:
    path = write(tmp_path / "t.data", 4 * PIECE)
    plan = Plan(path, 3 * PIECE, PIECE)
    ahead = Prehash([("t", plan), ("u", plan)])
    assert ahead.take("t", Plan(path, 2 * PIECE, PIECE)) is None  # another offset
    assert ahead.take("t", plan) is None  # gone with the first take
    assert ahead.take("u", Plan(path, 3 * PIECE, 2 * PIECE)) is None  # another piece size
    assert ahead.take("nobody", plan) is None


def test_a_file_changed_since_is_hashed_again(tmp_path: Any) -> None:
    path = write(tmp_path / "t.data", 4 * PIECE)
    plan = Plan(path, 3 * PIECE, PIECE)
    ahead = Prehash([("t", plan)])
    ahead._futures["t"].result()  # hashed
    with open(path, "r+b") as f:
        f.write(b"x" * 10)
    os.utime(path, ns=(0, 0))
    assert ahead.take("t", plan) is None


def test_a_hash_not_started_is_left_to_the_fetch(tmp_path: Any) -> None:
    path = write(tmp_path / "t.data", 2 * PIECE)
    gate = threading.Event()

    def slow(plan: Plan) -> Any:
        gate.wait(10)
        return None

    plan = Plan(path, PIECE, PIECE)
    ahead = Prehash([("first", plan), ("second", plan)], hash_one=slow)
    assert ahead.take("second", plan) is None  # queued behind the first: cancelled
    gate.set()


def test_parked_plans_lists_the_headers_it_can_plan(tmp_path: Any) -> None:
    for name in ("a.part", "a.data", "b.part", "c.data", "d.part"):
        (tmp_path / name).write_bytes(b"")

    def plan_for(task_id: str) -> Plan | None:
        if task_id == "d":
            raise ValueError("bad header")
        return Plan(task_id, 1, 1) if task_id == "a" else None

    assert parked_plans(str(tmp_path), plan_for) == [("a", Plan("a", 1, 1))]
    assert parked_plans(str(tmp_path / "missing"), plan_for) == []
