"""The morning report's time accounting, from a hand-made journal."""
from __future__ import annotations

from trainctl.supervisor.report import summarize


def ev(t, kind, attempt=None, profile=0, **data):
    return {"time": float(t), "kind": kind, "attempt": attempt, "rung": profile, "step": None, "data": data}


NIGHT = [
    ev(0, "supervisor_start"),
    ev(0, "spawn", 1), ev(10, "worker_ready", 1), ev(40, "checkpoint", 1), ev(70, "checkpoint", 1),
    ev(100, "exit", 1, failure="native_crash", checkpoints_written=2),
    ev(100, "step_down", 1, **{"from": 0, "to": 1, "reason": "oom"}),
    ev(105, "spawn", 2, profile=1), ev(115, "worker_ready", 2, profile=1), ev(200, "checkpoint", 2, profile=1),
    ev(210, "exit", 2, profile=1, failure="done", checkpoints_written=3),
    ev(211, "state", 2, **{"from": "running", "to": "succeeded"}),
]


def test_time_is_split_into_training_redone_work_restarts_and_startup():
    s = summarize(NIGHT)
    assert s["startup_seconds"] == 10                    # the first boot
    assert s["training_seconds"] == (70 - 10) + (210 - 115)
    assert s["redone_seconds"] == 100 - 70               # after the last checkpoint before the crash
    assert s["restart_seconds"] == (105 - 100) + (115 - 105)   # backoff + the boot after the crash
    assert s["supervised_seconds"] == 211 and s["goodput"] == round((211 - 30 - 15) / 211, 4)
    assert s["crashes"] == 1 and s["crashes_by_kind_and_rung"] == {"native_crash on rung 1": 1}
    assert s["step_downs"][0]["from"] == 1 and s["step_downs"][0]["to"] == 2
    assert s["checkpoints_written"] == 5 and s["supervisor_deaths"] == 0


def test_a_restart_ends_when_the_worker_was_ready_not_when_the_supervisor_polled():
    """worker_ready carries the worker's own moment (ready_at); the poll that saw it may come up to a second later,
    while the worker already trains. An implausible ready_at (before the spawn, after the poll) is clamped."""
    night = [ev(0, "supervisor_start"), ev(0, "spawn", 1), ev(10.9, "worker_ready", 1, ready_at=10.2),
             ev(100, "exit", 1, failure="killed"), ev(100, "spawn", 2), ev(100.9, "worker_ready", 2, ready_at=100.1),
             ev(150, "exit", 2, failure="done"), ev(151, "state", 2, to="succeeded")]
    s = summarize(night)
    assert s["startup_seconds"] == 10.2 and s["restart_seconds"] == 0.1
    assert s["training_seconds"] == 49.9 and s["redone_seconds"] == 89.8   # 150 - 100.1; no checkpoint: 100 - 10.2
    odd = [dict(e, data={**e["data"], "ready_at": {1: -5.0, 2: 200.0}[e["attempt"]]}) if e["kind"] == "worker_ready"
           else e for e in night]
    s = summarize(odd)
    assert s["startup_seconds"] == 0 and s["restart_seconds"] == 0.9   # clamped to the spawn, to the poll


def test_a_supervisor_that_died_is_counted():
    night = NIGHT[:5] + [ev(300, "supervisor_start"), ev(300, "spawn", 2), ev(310, "worker_ready", 2),
                         ev(400, "exit", 2, failure="done"), ev(401, "state", 2, to="succeeded")]
    s = summarize(night)
    assert s["supervisor_deaths"] == 1
    assert s["supervised_seconds"] == 70 + 101 and s["wall_seconds"] == 401


def test_work_is_redone_from_when_the_checkpoint_was_taken_not_when_the_supervisor_saw_it():
    # The supervisor noticed the last commit only when it read the crashed worker's last heartbeat
    # (t=100), but training stood at that step at t=92: 8 s of work are done again.
    night = [ev(0, "supervisor_start"), ev(0, "spawn", 1), ev(10, "worker_ready", 1),
             ev(40, "checkpoint", 1, taken=39.5), ev(100, "checkpoint", 1, taken=92.0),
             ev(100, "exit", 1, failure="killed"), ev(101, "spawn", 2), ev(102, "worker_ready", 2),
             ev(150, "exit", 2, failure="done"), ev(151, "state", 2, to="succeeded")]
    s = summarize(night)
    assert s["redone_seconds"] == 100 - 92
    assert s["training_seconds"] == (92 - 10) + (150 - 102)


def test_a_supervisor_error_is_counted_and_its_stop_is_not_a_death():
    night = NIGHT[:5] + [ev(150, "supervisor_error", 1, error="RuntimeError: x"),
                         ev(151, "state", 1, to="stopped"), ev(300, "supervisor_start"), ev(300, "spawn", 2),
                         ev(310, "worker_ready", 2), ev(400, "exit", 2, failure="done"),
                         ev(401, "state", 2, to="succeeded")]
    s = summarize(night)
    assert s["supervisor_errors"] == 1 and s["supervisor_deaths"] == 0


def test_a_run_that_never_trained_has_no_goodput():
    """A worker that failed on a config error before training: nothing was lost, but nothing trained either."""
    night = [ev(0, "supervisor_start"), ev(0, "spawn", 1), ev(13, "exit", 1, failure="config_error"),
             ev(13, "state", 1, to="failed")]
    s = summarize(night)
    assert s["training_seconds"] == 0 and s["goodput"] is None and s["crashes"] == 1


def test_time_waiting_for_a_person_after_a_failure_is_not_supervised_and_goodput_stays_in_range():
    """A run failed at t=100 and was resumed by hand eleven hours later: the wait was nobody's restart."""
    night = [ev(0, "supervisor_start"), ev(0, "spawn", 1), ev(10, "worker_ready", 1), ev(70, "checkpoint", 1),
             ev(100, "exit", 1, failure="diverged"), ev(101, "state", 1, to="failed"),
             ev(40_000, "supervisor_start"), ev(40_000, "budget_reset", 1), ev(40_002, "spawn", 2),
             ev(40_012, "worker_ready", 2), ev(40_100, "exit", 2, failure="done"), ev(40_101, "state", 2, to="succeeded")]
    s = summarize(night)
    assert s["supervised_seconds"] == 101 + 101 and s["wall_seconds"] == 40_101
    assert s["restart_seconds"] == (101 - 100) + (40_002 - 40_000) + (40_012 - 40_002)   # only supervised time
    assert s["training_seconds"] == (70 - 10) + (40_100 - 40_012) and s["redone_seconds"] == 100 - 70
    assert s["goodput"] == round((202 - 30 - 13) / 202, 4) and 0 <= s["goodput"] <= 1


def test_a_dead_supervisor_s_absence_is_not_restart_time():
    night = NIGHT[:5] + [ev(300, "supervisor_start"), ev(300, "spawn", 2), ev(310, "worker_ready", 2),
                         ev(400, "exit", 2, failure="done"), ev(401, "state", 2, to="succeeded")]
    s = summarize(night)
    assert s["restart_seconds"] == 310 - 300 and 0 <= s["goodput"] <= 1
