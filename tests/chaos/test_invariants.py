"""The invariant checker catches each fault it names; a chaos run that passes means something."""

from __future__ import annotations

import signal

from .invariants import Exit, JobRow, check
from .ledger import Event

MS = 1_000_000


def s(job: int, attempt: int, pid: int, at: int) -> Event:
    return Event("S", job, attempt, pid, f"n{pid}", at * MS, at * MS)


def f(job: int, attempt: int, pid: int, at: int, outcome: str = "ok") -> Event:
    return Event("F", job, attempt, pid, f"n{pid}", at * MS, at * MS, outcome)


def error(attempt: int) -> dict[str, object]:
    return {
        "attempt": attempt,
        "at": "2030-01-01T00:00:00+00:00",
        "type": "chaos.chaos_app.ChaosFailure",
        "message": f"planned failure of job 1 attempt {attempt}",
        "traceback": "...",
    }


CLEAN = {
    1: Exit(1, "n1", signal.SIGTERM, 0, 10_000 * MS),
    2: Exit(2, "n2", signal.SIGTERM, 0, 10_000 * MS),
}
KILLED_1 = {**CLEAN, 1: Exit(1, "n1", signal.SIGKILL, -9, 50 * MS)}


def test_a_clean_history_passes() -> None:
    jobs = [JobRow(1, "completed", 2, 5, [error(1)])]
    events = [s(1, 1, 1, 0), f(1, 1, 1, 10, "fail"), s(1, 2, 2, 20), f(1, 2, 2, 30)]
    assert check(jobs, events, CLEAN, expected_jobs=1) == []


def rescued(attempt: int) -> dict[str, object]:
    return {**error(attempt), "type": "koban.Rescued", "message": "node n1 stopped; rescued"}


def test_a_rerun_after_sigkill_passes() -> None:
    """Killed after running to the end but before recording it: at-least-once, not a fault."""
    jobs = [JobRow(1, "completed", 2, 5, [rescued(1)])]
    events = [s(1, 1, 1, 0), f(1, 1, 1, 10), s(1, 2, 2, 100), f(1, 2, 2, 110)]
    assert check(jobs, events, KILLED_1, expected_jobs=1) == []


def test_an_attempt_without_error_or_rescue_is_reported() -> None:
    jobs = [JobRow(1, "discarded", 2, 2, [rescued(1)])]
    problems = check(jobs, [s(1, 1, 1, 0)], KILLED_1, expected_jobs=1)
    assert any("no error or rescue recorded for attempt(s) [2]" in p for p in problems)


def test_unfinished_and_missing_jobs_are_reported() -> None:
    problems = check([JobRow(1, "executing", 1, 5)], [], CLEAN, expected_jobs=2)
    assert any("expected 2 jobs" in p for p in problems)
    assert any("ended executing" in p for p in problems)


def test_attempts_beyond_max_are_reported() -> None:
    problems = check([JobRow(1, "discarded", 6, 5)], [], CLEAN, expected_jobs=1)
    assert any("attempt 6 > max 5" in p for p in problems)


def test_one_attempt_started_twice_is_reported() -> None:
    jobs = [JobRow(1, "completed", 1, 5)]
    events = [s(1, 1, 1, 0), f(1, 1, 1, 10), s(1, 1, 2, 20), f(1, 1, 2, 30)]
    problems = check(jobs, events, CLEAN, expected_jobs=1)
    assert any("started 2 times" in p for p in problems)


def test_completing_twice_on_live_nodes_is_reported() -> None:
    jobs = [JobRow(1, "completed", 2, 5)]
    events = [s(1, 1, 1, 0), f(1, 1, 1, 10), s(1, 2, 2, 20), f(1, 2, 2, 30)]
    problems = check(jobs, events, CLEAN, expected_jobs=1)
    assert any("attempt 1 ended ok" in p and "outcome was lost" in p for p in problems)


def test_a_result_recorded_for_a_rescued_attempt_is_reported() -> None:
    """A node cut off, rescued, then back: its late result for attempt 1 must be ignored."""
    jobs = [JobRow(1, "completed", 1, 5, [rescued(1)])]
    events = [s(1, 1, 1, 0), f(1, 1, 1, 10)]
    problems = check(jobs, events, CLEAN, expected_jobs=1, isolated={1})
    assert any("both rescued and recorded" in p for p in problems)


def test_a_completion_stamped_before_the_attempt_succeeded_is_reported() -> None:
    """Attempt 2's success was recorded at 35 ms, but its code only returned at 60 ms."""
    jobs = [JobRow(1, "completed", 2, 5, [rescued(1)], completed_at_ns=35 * MS)]
    events = [s(1, 1, 1, 0), s(1, 2, 2, 20), f(1, 1, 1, 30), f(1, 2, 2, 60)]
    problems = check(jobs, events, CLEAN, expected_jobs=1, isolated={1})
    assert any("25.0 ms before attempt 2 succeeded" in p for p in problems)


def test_a_cut_off_node_may_overlap_only_with_rescued_attempts() -> None:
    jobs = [JobRow(1, "completed", 2, 5, [rescued(1)])]
    events = [s(1, 1, 1, 0), s(1, 2, 2, 40), f(1, 2, 2, 60), f(1, 1, 1, 100)]
    assert check(jobs, events, CLEAN, expected_jobs=1, isolated={1}) == []
    problems = check(jobs, events, CLEAN, expected_jobs=1)
    assert any("before attempt 1 (process 1) ended" in p for p in problems)


def test_a_failure_without_its_error_is_reported() -> None:
    jobs = [JobRow(1, "completed", 2, 5)]
    events = [s(1, 1, 1, 0), f(1, 1, 1, 10, "fail"), s(1, 2, 2, 20), f(1, 2, 2, 30)]
    problems = check(jobs, events, CLEAN, expected_jobs=1)
    assert any("attempt 1 ended fail" in p and "outcome was lost" in p for p in problems)


def test_another_attempts_error_is_reported() -> None:
    jobs = [JobRow(1, "completed", 2, 5, [{**error(1), "message": "planned failure attempt 9"}])]
    events = [s(1, 1, 1, 0), f(1, 1, 1, 10, "fail"), s(1, 2, 2, 20), f(1, 2, 2, 30)]
    problems = check(jobs, events, CLEAN, expected_jobs=1)
    assert any("not this attempt's" in p for p in problems)


def test_completed_without_a_successful_run_is_reported() -> None:
    jobs = [JobRow(1, "completed", 1, 5)]
    problems = check(jobs, [s(1, 1, 1, 0), f(1, 1, 1, 5, "fail")], KILLED_1, expected_jobs=1)
    assert any("no process ran that attempt to a successful end" in p for p in problems)


def test_overlapping_attempts_on_live_nodes_are_reported() -> None:
    jobs = [JobRow(1, "completed", 2, 5)]
    events = [s(1, 1, 1, 0), s(1, 2, 2, 5), f(1, 2, 2, 8), f(1, 1, 1, 10)]
    problems = check(jobs, events, KILLED_1, expected_jobs=1)
    assert any("before attempt 1 (process 1) ended" in p for p in problems)


def test_a_rescue_before_the_killed_node_died_is_reported() -> None:
    """Attempt 1 never finished; its process died at 50 ms, so attempt 2 at 40 ms overlaps."""
    jobs = [JobRow(1, "completed", 2, 5)]
    events = [s(1, 1, 1, 0), s(1, 2, 2, 40), f(1, 2, 2, 60)]
    problems = check(jobs, events, KILLED_1, expected_jobs=1)
    assert any("10.0 ms before attempt 1" in p for p in problems)


def test_an_attempt_abandoned_by_a_clean_stop_is_reported() -> None:
    jobs = [JobRow(1, "completed", 2, 5)]
    events = [s(1, 1, 1, 0), s(1, 2, 2, 20_000), f(1, 2, 2, 20_010)]
    problems = check(jobs, events, CLEAN, expected_jobs=1)
    assert any("stopped cleanly, but never finished there" in p for p in problems)


def test_a_finish_without_a_start_is_reported() -> None:
    jobs = [JobRow(1, "completed", 1, 5)]
    problems = check(jobs, [f(1, 1, 1, 10)], CLEAN, expected_jobs=1)
    assert any("unstarted" in p for p in problems)
