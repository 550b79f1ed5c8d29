"""`python -m dataflow.tools.resync` without services: which processes it waits for, how it
reads their status fields, when it is done (tests/integration/test_store_repair.py runs it
against a real pipeline)."""

from __future__ import annotations

from dataflow.sinks.marker import REPAIRING, WHOLE, Status
from dataflow.tools.resync import Follow, running

NOW_MS = 1_800_000_000_000


def status(
    run: str, *, generation: int = 1, state: str = WHOLE, left: int = 0, age_s: float = 1.0
) -> Status:
    return Status(
        run=run,
        host="h",
        pid=7,
        generation=generation,
        state=state,
        keys_left=left,
        written_ms=int(NOW_MS - 1000 * age_s),
        every_s=2.0,
    )


def test_only_processes_that_refreshed_their_status_recently_are_waited_for() -> None:
    found = {
        "status:0": status("a"),
        "status:1": status("a", age_s=0.5),  # the same process's second worker
        "status:2": status("b", age_s=11.0),  # within five check intervals (and 15 s)
        "status:3": status("gone", age_s=600.0),  # a process that stopped long ago
    }
    processes = running(found, NOW_MS)
    assert sorted(processes) == ["a", "b"]
    assert processes["a"].where == "h:7" and processes["a"].generation_before == 1


def test_a_process_is_done_once_its_new_repair_is_queued_and_written() -> None:
    clock = [NOW_MS / 1000]
    processes = running({"status:0": status("a"), "status:1": status("b")}, NOW_MS)
    follow = Follow(processes, lambda: clock[0])
    assert [p.state for p in processes.values()] == ["waiting", "waiting"]
    follow.update({"status:0": status("a", generation=2, state=REPAIRING, age_s=0)})
    assert processes["a"].state == "queuing"
    follow.update(
        {
            "status:0": status("a", generation=2, left=500, age_s=-1),
            "status:1": status("b", generation=1, age_s=0),  # not noticed yet: still waiting
        }
    )
    assert processes["a"].state == "re-writing" and processes["b"].state == "waiting"
    assert follow.keys_left() == 500 and not follow.finished()
    line = follow.line("feat", 100.0)
    assert line == "resync feat: 2 processes (1 re-writing, 1 waiting); 500 keys left"
    follow.update(
        {
            "status:0": status("a", generation=2, left=100, age_s=-2),
            "status:1": status("b", generation=2, age_s=-2),
        }
    )
    assert follow.line("feat", 102.0).endswith("100 keys left, 200 keys/s, about 0s to go")
    follow.update({"status:0": status("a", generation=2, left=0, age_s=-3)})
    assert follow.finished() and not follow.stopped


def test_a_process_that_stops_reporting_is_not_waited_for_forever() -> None:
    clock = [NOW_MS / 1000]
    processes = running({"status:0": status("a")}, NOW_MS)
    follow = Follow(processes, lambda: clock[0])
    follow.update({})
    assert not follow.finished()
    clock[0] += 60
    follow.update({})
    assert follow.stopped == {"a"} and follow.finished()
