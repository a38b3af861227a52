"""Table tests for the two pure functions: classify (every kind) and decide (every branch)."""
from __future__ import annotations

import signal

import pytest

from trainctl.contract.lifecycle import Event, Kill
from trainctl.contract.protocol import ExitCode
from trainctl.supervisor.classify import Exit, Kind, MemorySample, OomEvidence, classify
from trainctl.supervisor.policy import Attempt, Do, Settings, decide, recall

GiB = 2**30
CALM = [MemorySample(at=t, worker=1 * GiB, available=20 * GiB, total=24 * GiB) for t in range(5)]
NEAR_SOFT = CALM + [MemorySample(at=5, worker=19 * GiB, available=4 * GiB, total=24 * GiB)]
SYSTEM_LOW = CALM + [MemorySample(at=5, worker=3 * GiB, available=GiB // 2, total=24 * GiB)]
LONG_AGO = [MemorySample(at=0, worker=19 * GiB, available=GiB // 2, total=24 * GiB),
            MemorySample(at=60, worker=GiB, available=20 * GiB, total=24 * GiB)]
SOFT = 20 * GiB
PRESSED = CALM + [MemorySample(at=5, worker=3 * GiB, available=2 * GiB, total=24 * GiB, pressure={
    "level": "critical", "source": "/proc/pressure/memory", "some_avg10": 55.0, "full_avg10": 31.0})]
OOM_KILLED = OomEvidence(True, "cgroup memory.events oom_kill +1 (/system.slice/trainctl.service)")
NOT_OOM = OomEvidence(False, "no oom_kill increment (/proc/vmstat)")
JETSAM = OomEvidence(True, "jetsam report JetsamEvent-2026-12-01-031522.ips (per-process-limit)")

CLASSIFY = [
    # (exit, memory history, expected kind, words in the detail)
    (Exit(0), CALM, Kind.DONE, "finished"),
    (Exit(ExitCode.STOPPED), CALM, Kind.STOPPED, "stopped"),
    (Exit(ExitCode.CONFIG_ERROR, error={"message": "[model] name = 'x' is not a timm model"}), CALM,
     Kind.CONFIG_ERROR, "timm model"),
    (Exit(ExitCode.DISK_FULL, error={"message": "only 0.1 GiB free"}), CALM, Kind.DISK_FULL, "GiB free"),
    (Exit(ExitCode.OUT_OF_MEMORY, error={"message": "MPS backend out of memory (MPS allocated: 17 GB"}), CALM,
     Kind.OOM, "MPS backend"),
    # a SIGKILL we did not send: the system's record decides (certain); memory near the limit alone is a guess
    (Exit(-signal.SIGKILL, oom_evidence=OOM_KILLED), CALM, Kind.OOM, "killed for memory: cgroup memory.events oom_kill +1"),
    (Exit(-signal.SIGKILL, oom_evidence=JETSAM), CALM, Kind.OOM, "jetsam report JetsamEvent-2026-12-01-031522.ips"),
    (Exit(-signal.SIGKILL, oom_evidence=NOT_OOM), CALM, Kind.KILLED, "no oom_kill increment (/proc/vmstat)"),
    (Exit(-signal.SIGKILL, oom_evidence=NOT_OOM), NEAR_SOFT, Kind.OOM, "userspace OOM killer"),
    (Exit(-signal.SIGKILL), NEAR_SOFT, Kind.OOM, "memory at 95% of the soft limit (19.00 GiB) (a guess: no kernel evidence"),
    (Exit(-signal.SIGKILL), SYSTEM_LOW, Kind.OOM, "system memory down to 2% available"),
    (Exit(-signal.SIGKILL, we_killed=Kill.MEMORY_HARD, oom_evidence=OOM_KILLED), NEAR_SOFT, Kind.MEMORY_LIMIT, "hard"),
    (Exit(-signal.SIGKILL), CALM, Kind.KILLED, "no sign of memory pressure"),
    (Exit(-signal.SIGKILL), LONG_AGO, Kind.KILLED, "no sign"),          # pressure a minute ago does not count
    (Exit(-signal.SIGKILL), [], Kind.KILLED, "no sign"),
    (Exit(-signal.SIGKILL, we_killed=Kill.MEMORY_HARD), NEAR_SOFT, Kind.MEMORY_LIMIT, "hard memory limit"),
    (Exit(ExitCode.STOPPED, we_killed=Kill.MEMORY_SOFT), NEAR_SOFT, Kind.MEMORY_LIMIT, "soft memory limit"),
    (Exit(-signal.SIGSEGV, fault_log="Fatal Python error: Segmentation fault"), CALM, Kind.NATIVE_CRASH, "SIGSEGV"),
    (Exit(-signal.SIGBUS), CALM, Kind.NATIVE_CRASH, "SIGBUS"),
    (Exit(-signal.SIGABRT), CALM, Kind.NATIVE_CRASH, "SIGABRT"),
    (Exit(-signal.SIGILL), CALM, Kind.NATIVE_CRASH, "SIGILL"),
    (Exit(-signal.SIGFPE), CALM, Kind.NATIVE_CRASH, "SIGFPE"),
    (Exit(-signal.SIGKILL, we_killed=Kill.HANG), CALM, Kind.HANG, "no progress"),
    (Exit(-signal.SIGABRT, we_killed=Kill.HANG), CALM, Kind.HANG, "no progress"),
    (Exit(-signal.SIGTERM), CALM, Kind.KILLED, "not sent by trainctl"),
    (Exit(ExitCode.INTERNAL_ERROR, error={"type": "KeyError", "message": "'x'", "traceback": "tb"}), CALM,
     Kind.EXCEPTION, "KeyError"),
    (Exit(1), CALM, Kind.EXCEPTION, "without an error report"),
    (Exit(1, heartbeat_seen=False, output_tail="ModuleNotFoundError: torch"), CALM, Kind.BOOT_FAILURE, "before it came up"),
    # the worker's own last line names what is broken (start prints it)
    (Exit(1, heartbeat_seen=False, output_tail="Traceback ...\nImportError: no torch here\n"), CALM, Kind.BOOT_FAILURE,
     "(exit code 1): ImportError: no torch here"),
    # signals during boot are signals, not a broken environment (issue 17, item 7)
    (Exit(-signal.SIGSEGV, heartbeat_seen=False), CALM, Kind.NATIVE_CRASH, "SIGSEGV"),
    (Exit(-signal.SIGKILL, heartbeat_seen=False), CALM, Kind.KILLED, "no sign of memory pressure"),
    # our own stop: its SIGTERM during boot, or its SIGKILL at the end of the stop timeout (item 8), is a stop
    (Exit(-signal.SIGTERM, heartbeat_seen=False, we_killed=Kill.STOP), CALM, Kind.STOPPED, "still booting"),
    (Exit(-signal.SIGKILL, we_killed=Kill.STOP), CALM, Kind.STOPPED, "end of the stop timeout"),
    (Exit(-signal.SIGSEGV, we_killed=Kill.STOP), CALM, Kind.NATIVE_CRASH, "SIGSEGV"),   # a crash while stopping is one
    (Exit(ExitCode.LOCKED), CALM, Kind.BOOT_FAILURE, "another worker"),
    (Exit(ExitCode.CANNOT_CONTINUE, error={"kind": "diverged", "message": "loss not finite since step 10"}), CALM,
     Kind.DIVERGED, "step 10"),
    (Exit(ExitCode.CANNOT_CONTINUE, error={"kind": "data_error", "message": "72% of step 8's images unreadable"}), CALM,
     Kind.DATA_ERROR, "unreadable"),
    (Exit(ExitCode.CANNOT_CONTINUE, error={"kind": "no_checkpoint", "message": "none of 3 checkpoints verifies"}), CALM,
     Kind.NO_CHECKPOINT, "verifies"),
    (Exit(ExitCode.CANNOT_CONTINUE, error={"kind": "martian", "message": "m"}), CALM, Kind.EXCEPTION, "m"),
    # the system's memory pressure: the soft limit's path, saying which signal and its figures
    (Exit(ExitCode.STOPPED, we_killed=Kill.MEMORY_PRESSURE), PRESSED, Kind.MEMORY_LIMIT,
     "under memory pressure (critical, /proc/pressure/memory: some avg10 55%, full avg10 31%"),
    # planned ends: a recycle and a step up, checkpointed, or ended by the stop's signals before they could
    (Exit(ExitCode.STOPPED, we_killed=Kill.RECYCLE), CALM, Kind.RECYCLED, "checkpointed and stopped for a fresh worker"),
    (Exit(-signal.SIGKILL, we_killed=Kill.RECYCLE), CALM, Kind.RECYCLED, "ended by SIGKILL before it could checkpoint"),
    (Exit(ExitCode.STOPPED, we_killed=Kill.STEP_UP), CALM, Kind.STEPPED_UP, "a try of the rung above"),
    (Exit(0, we_killed=Kill.STEP_UP), CALM, Kind.DONE, "finished"),      # it finished before it could stop
    (Exit(-signal.SIGSEGV, we_killed=Kill.RECYCLE), CALM, Kind.NATIVE_CRASH, "SIGSEGV"),   # a crash is a crash
]


@pytest.mark.parametrize("ended,history,kind,words", CLASSIFY, ids=[f"{c[2].value}-{i}" for i, c in enumerate(CLASSIFY)])
def test_classify(ended, history, kind, words):
    failure = classify(ended, history, SOFT)
    assert failure.kind is kind
    assert words in failure.detail


def test_classify_covers_every_kind():
    assert {c[2] for c in CLASSIFY} == set(Kind)


def test_classify_says_how_a_sigkill_was_decided():
    assert classify(Exit(-signal.SIGKILL, oom_evidence=OOM_KILLED), NEAR_SOFT, SOFT).decided_by == OOM_KILLED.said
    guess = classify(Exit(-signal.SIGKILL), NEAR_SOFT, SOFT).decided_by
    assert guess.startswith("memory at 95% of the soft limit") and "a guess" in guess
    assert "guess" not in classify(Exit(-signal.SIGKILL, oom_evidence=OOM_KILLED), NEAR_SOFT, SOFT).detail
    assert classify(Exit(ExitCode.OUT_OF_MEMORY), CALM, SOFT).decided_by == ""   # the worker's own word needs none


def test_classify_keeps_the_evidence():
    f = classify(Exit(-signal.SIGSEGV, fault_log="Fatal Python error: Segmentation fault\n  File x"), CALM, SOFT)
    assert f.signal == "SIGSEGV" and f.exit_code is None and "Segmentation fault" in f.evidence
    assert f.memory["worker"] == GiB
    f = classify(Exit(ExitCode.INTERNAL_ERROR, error={"type": "E", "message": "m", "traceback": "Traceback..."}), CALM, SOFT)
    assert f.exit_code == ExitCode.INTERNAL_ERROR and f.evidence == "Traceback..."


@pytest.mark.parametrize("caught", ["SIGBUS", "SIGABRT", "SIGILL", "SIGFPE"])
def test_classify_names_the_signal_faulthandler_caught_first(caught):
    """faulthandler's stack dump can itself fault while another thread runs (seen in CI: a SIGBUS whose dump died
    of SIGSEGV beside the checkpoint writer); the crash is the first signal, and the detail says both."""
    words = {"SIGBUS": "Bus error", "SIGABRT": "Aborted", "SIGILL": "Illegal instruction",
             "SIGFPE": "Floating point exception"}[caught]
    log = f"Fatal Python error: {words}\n\nThread 0x1 (most recent call first):\n  File x\nFatal Python error: Segm"
    f = classify(Exit(-signal.SIGSEGV, fault_log=log), CALM, SOFT)
    assert (f.kind, f.signal) == (Kind.NATIVE_CRASH, caught) and "then died of SIGSEGV" in f.detail
    assert classify(Exit(-signal.SIGSEGV, fault_log="garbage"), CALM, SOFT).signal == "SIGSEGV"


S = Settings(max_restarts_per_profile=2, backoff_seconds=(2.0, 10.0, 60.0), same_step_limit=2)


def A(kind, rung=0, step=None, progressed=False, epoch=0):
    return Attempt(rung, kind, "detail", step, epoch if step is not None else None, 0, progressed)


DECIDE = [
    # (history, ladder size, expected action, expected rung, expected delay, words in the reason)
    ([A(Kind.DONE)], 3, Do.FINISH, 0, 0, "finished"),
    ([A(Kind.STOPPED)], 3, Do.STOP, 0, 0, "stopped"),
    ([A(Kind.CONFIG_ERROR)], 3, Do.GIVE_UP, 0, 0, "config_error"),
    ([A(Kind.DISK_FULL)], 3, Do.GIVE_UP, 0, 0, "disk_full"),
    ([A(Kind.DIVERGED)], 3, Do.GIVE_UP, 0, 0, "diverged"),
    ([A(Kind.DATA_ERROR)], 3, Do.GIVE_UP, 0, 0, "data_error"),
    ([A(Kind.NO_CHECKPOINT)], 3, Do.GIVE_UP, 0, 0, "no_checkpoint"),
    ([A(Kind.BOOT_FAILURE)], 3, Do.RESTART, 0, 2.0, "boot_failure"),
    ([A(Kind.BOOT_FAILURE), A(Kind.BOOT_FAILURE)], 3, Do.GIVE_UP, 0, 0, "failed to start twice"),
    ([A(Kind.OOM, step=5)], 3, Do.STEP_DOWN, 1, 2.0, "oom"),
    ([A(Kind.MEMORY_LIMIT, step=5)], 3, Do.STEP_DOWN, 1, 2.0, "memory_limit"),
    ([A(Kind.OOM, rung=2, step=5)], 3, Do.RESTART, 2, 2.0, "oom"),          # last rung: nowhere lower to go
    ([A(Kind.NATIVE_CRASH, step=5)], 3, Do.RESTART, 0, 2.0, "native_crash"),
    ([A(Kind.KILLED, step=5), A(Kind.HANG, step=9)], 3, Do.RESTART, 0, 10.0, "hang"),
    ([A(Kind.KILLED, step=1), A(Kind.HANG, step=2), A(Kind.EXCEPTION, step=3)], 3, Do.STEP_DOWN, 1, 2.0,
     "3 failures on rung 1 without progress"),
    ([A(Kind.KILLED, step=1), A(Kind.HANG, step=2), A(Kind.EXCEPTION, step=3, progressed=True)], 3,
     Do.RESTART, 0, 0, "exception"),                                        # progress resets the budget, no wait
    ([A(Kind.KILLED, step=1), A(Kind.KILLED, step=2, progressed=True), A(Kind.EXCEPTION, step=3)], 3,
     Do.RESTART, 0, 2.0, "exception"),                                      # counted from the progress on
    ([A(Kind.KILLED, rung=2, step=1), A(Kind.HANG, rung=2, step=2), A(Kind.EXCEPTION, rung=2, step=3)], 3,
     Do.GIVE_UP, 2, 0, "ladder exhausted"),
    ([A(Kind.NATIVE_CRASH, step=7), A(Kind.NATIVE_CRASH, step=7)], 3, Do.STEP_DOWN, 1, 2.0, "failed 2 times at step 7"),
    ([A(Kind.NATIVE_CRASH, step=7, progressed=True), A(Kind.EXCEPTION, step=7)], 3, Do.STEP_DOWN, 1, 2.0,
     "at step 7"),
    ([A(Kind.NATIVE_CRASH, step=7), A(Kind.NATIVE_CRASH, step=7, epoch=1)], 3, Do.RESTART, 0, 10.0, "native"),
    ([A(Kind.NATIVE_CRASH, rung=0, step=7), A(Kind.NATIVE_CRASH, rung=1, step=7)], 3, Do.RESTART, 1, 2.0, "native"),
    ([A(Kind.NATIVE_CRASH, rung=2, step=7), A(Kind.NATIVE_CRASH, rung=2, step=7)], 3, Do.GIVE_UP, 2, 0,
     "ladder exhausted: failed 2 times at step 7"),
    ([A(Kind.KILLED, step=1)] * 5, 1, Do.GIVE_UP, 0, 0, "ladder exhausted"),
    # A clean stop (a person, or a service stopping) is neither a failure nor progress:
    ([A(Kind.KILLED, step=1), A(Kind.STOPPED, step=1), A(Kind.HANG, step=2), A(Kind.EXCEPTION, step=3)], 3,
     Do.STEP_DOWN, 1, 2.0, "3 failures on rung 1"),
    ([A(Kind.NATIVE_CRASH, step=7), A(Kind.STOPPED, step=7), A(Kind.NATIVE_CRASH, step=7)], 3, Do.STEP_DOWN, 1, 2.0,
     "failed 2 times at step 7"),
    ([A(Kind.BOOT_FAILURE), A(Kind.STOPPED), A(Kind.BOOT_FAILURE)], 3, Do.GIVE_UP, 0, 0, "failed to start twice"),
    ([A(Kind.KILLED, step=1), A(Kind.STOPPED, step=2, progressed=True), A(Kind.EXCEPTION, step=3)], 3,
     Do.RESTART, 0, 2.0, "exception"),                                      # ...but its checkpoint is progress
    # Planned ends: at once, outside the budget; a recycle stays on its rung, a step up climbs one
    ([A(Kind.KILLED, step=1), A(Kind.KILLED, step=2), A(Kind.RECYCLED, step=3)], 3, Do.RECYCLE, 0, 0, "detail"),
    ([A(Kind.KILLED, step=1), A(Kind.KILLED, step=2), A(Kind.RECYCLED, step=3), A(Kind.EXCEPTION, step=4)], 3,
     Do.STEP_DOWN, 1, 2.0, "3 failures on rung 1"),                        # a recycle is not progress either
    ([A(Kind.OOM, step=2), A(Kind.STEPPED_UP, rung=1, step=9)], 3, Do.STEP_UP, 0, 0, "detail"),
    # a rung climbed to fails again: back down at once, whatever the kind
    ([A(Kind.OOM, step=2), A(Kind.STEPPED_UP, rung=1, step=9), A(Kind.KILLED, step=12)], 3, Do.STEP_DOWN, 1, 2.0,
     "rung 1 failed again after the step up (killed: detail); staying on rung 2"),
    ([A(Kind.STEPPED_UP, rung=1, step=9), A(Kind.STOPPED, step=10), A(Kind.NATIVE_CRASH, step=12)], 3,
     Do.STEP_DOWN, 1, 2.0, "after the step up"),
    ([A(Kind.STEPPED_UP, rung=2, step=9), A(Kind.KILLED, rung=1, step=10)], 3, Do.STEP_DOWN, 2, 2.0, "staying on rung 3"),
    # Backoff: none after a crash that followed real progress; it grows only with the failures without progress
    ([A(Kind.KILLED, step=5, progressed=True)], 3, Do.RESTART, 0, 0, "killed"),
    ([A(Kind.KILLED, step=3, progressed=True), A(Kind.KILLED, step=6, progressed=True),
      A(Kind.HANG, step=9, progressed=True)], 3, Do.RESTART, 0, 0, "hang"),          # progress each time: never a wait
    ([A(Kind.KILLED, step=5, progressed=True), A(Kind.KILLED, step=6)], 3, Do.RESTART, 0, 2.0, "killed"),
    ([A(Kind.KILLED, step=5, progressed=True), A(Kind.STOPPED, step=5), A(Kind.KILLED, step=6)], 3,
     Do.RESTART, 0, 2.0, "killed"),                                         # a clean stop between counts for nothing
    ([A(Kind.KILLED, rung=0, step=5, progressed=True), A(Kind.KILLED, rung=1, step=6)], 3, Do.RESTART, 1, 2.0,
     "killed"),                                                             # progress on another rung: this one waits
    ([A(Kind.OOM, rung=2, step=5, progressed=True)], 3, Do.RESTART, 2, 0, "oom"),   # last rung: a restart, at once
    ([A(Kind.OOM, step=5, progressed=True)], 3, Do.STEP_DOWN, 1, 2.0, "oom"),          # a step-down keeps its wait
]


@pytest.mark.parametrize("history,ladder,do,rung,delay,words", DECIDE, ids=[f"{d[2].value}-{i}" for i, d in enumerate(DECIDE)])
def test_decide(history, ladder, do, rung, delay, words):
    action = decide(history, ladder, S)
    assert (action.do, action.rung_index, action.delay) == (do, rung, delay)
    assert words in action.reason


def test_decide_covers_every_action_and_kind():
    assert {d[2] for d in DECIDE} == set(Do)
    assert {a.kind for d in DECIDE for a in d[0]} == set(Kind)


def test_same_step_is_reported_with_the_step():
    action = decide([A(Kind.NATIVE_CRASH, rung=0, step=7)] * 2, 1, S)
    assert action.same_step == 7 and action.do is Do.GIVE_UP


def test_a_crash_loop_is_bounded():
    """Whatever keeps failing without progress, the ladder ends in GIVE_UP within a bounded number of attempts."""
    for kind in (Kind.NATIVE_CRASH, Kind.KILLED, Kind.HANG, Kind.EXCEPTION, Kind.OOM, Kind.MEMORY_LIMIT):
        history, rung = [], 0
        for n in range(1, 50):
            history.append(A(kind, rung, step=n))   # a different step each time: not the same-step rule
            action = decide(history, 3, S)
            if action.do is Do.GIVE_UP:
                break
            rung = action.rung_index
        assert action.do is Do.GIVE_UP and n <= 3 * (S.max_restarts_per_profile + 1), (kind, n)


def ev(kind, attempt=None, rung=0, step=None, **data):
    return {"kind": kind.value, "attempt": attempt, "rung": rung, "step": step, "time": 0.0, "data": data}


def exit_event(attempt, rung, failure, step=3, progressed=False):
    return ev(Event.EXIT, attempt, rung, step, failure=failure, detail="d", epoch=0, cursor=step * 16,
              progressed=progressed)


JOURNAL = [
    ev(Event.SUPERVISOR_START), ev(Event.SPAWN, 1, 0), exit_event(1, 0, "killed"), ev(Event.RESTART, 1, 0),
    ev(Event.SPAWN, 2, 0), exit_event(2, 0, "hang", progressed=True),
    ev(Event.STEP_DOWN, 2, 1, **{"from": 0, "to": 1}),
    ev(Event.SUPERVISOR_START),                     # the supervisor died in the backoff, and was started again
]


def test_recall_rebuilds_what_the_policy_knew_from_the_journal():
    past = recall(JOURNAL)
    assert (past.attempt, past.restarts, past.rung_index, past.forgotten) == (2, 2, 1, 0)
    assert [(a.rung_index, a.kind, a.step, a.cursor, a.progressed) for a in past.history] == [
        (0, Kind.KILLED, 3, 48, False), (0, Kind.HANG, 3, 48, True)]
    assert recall([]) == recall([ev(Event.SUPERVISOR_START)]) and recall([]).rung_index is None


def test_recall_follows_planned_climbs_and_remembers_a_failed_one():
    climbed = JOURNAL + [ev(Event.SPAWN, 3, 1), exit_event(3, 1, "stepped_up", 9),
                         ev(Event.STEP_UP, 3, 0, **{"from": 1, "to": 0})]
    past = recall(climbed)
    assert (past.rung_index, past.restarts, past.may_step_up) == (0, 2, True)   # a climb is not a restart
    fell = climbed + [ev(Event.SPAWN, 4, 0), exit_event(4, 0, "oom", 12),
                      ev(Event.STEP_DOWN, 4, 1, **{"from": 0, "to": 1, "after_step_up": True})]
    past = recall(fell)
    assert (past.rung_index, past.restarts, past.may_step_up) == (1, 3, False)
    action = decide(recall(climbed).history + [A(Kind.OOM, step=12)], 3, S)
    assert action.do is Do.STEP_DOWN and action.after_step_up


def test_recall_forgets_what_a_budget_reset_granted_and_keeps_counting_attempts():
    past = recall(JOURNAL + [ev(Event.BUDGET_RESET, 2, 1), ev(Event.SPAWN, 3, 1), exit_event(3, 1, "killed")])
    assert past.attempt == 3 and past.forgotten == 2 and [a.kind for a in past.history] == [Kind.KILLED]


def test_the_same_decision_whether_or_not_the_supervisor_died_in_between():
    """Three failures on a rung without progress, recorded by two supervisor lifetimes: the third one still
    exhausts max_restarts_per_profile = 2 (a fresh history would restart)."""
    journal = [ev(Event.SPAWN, 1, 0), exit_event(1, 0, "killed", 1), ev(Event.SPAWN, 2, 0),
               exit_event(2, 0, "hang", 2), ev(Event.SUPERVISOR_START), ev(Event.SPAWN, 3, 0)]
    history = recall(journal).history + [A(Kind.EXCEPTION, step=3)]
    assert decide(history, 2, S).do is Do.STEP_DOWN
    assert decide(history[-1:], 2, S).do is Do.RESTART
