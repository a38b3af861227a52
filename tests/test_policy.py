"""Table tests for the two pure functions: classify (every kind) and decide (every branch)."""
from __future__ import annotations

import signal

import pytest

from trainctl.supervisor.classify import Exit, Kind, MemorySample, classify
from trainctl.supervisor.policy import Attempt, Do, Settings, decide
from trainctl.worker.protocol import (EXIT_CONFIG, EXIT_DISK_FULL, EXIT_EXCEPTION, EXIT_LOCKED, EXIT_OOM,
                                      EXIT_STOPPED)

GiB = 2**30
CALM = [MemorySample(at=t, worker=1 * GiB, available=20 * GiB, total=24 * GiB) for t in range(5)]
NEAR_SOFT = CALM + [MemorySample(at=5, worker=19 * GiB, available=4 * GiB, total=24 * GiB)]
SYSTEM_LOW = CALM + [MemorySample(at=5, worker=3 * GiB, available=GiB // 2, total=24 * GiB)]
LONG_AGO = [MemorySample(at=0, worker=19 * GiB, available=GiB // 2, total=24 * GiB),
            MemorySample(at=60, worker=GiB, available=20 * GiB, total=24 * GiB)]
SOFT = 20 * GiB

CLASSIFY = [
    # (exit, memory history, expected kind, words in the detail)
    (Exit(0), CALM, Kind.DONE, "finished"),
    (Exit(EXIT_STOPPED), CALM, Kind.STOPPED, "stopped"),
    (Exit(EXIT_CONFIG, error={"message": "[model] name = 'x' is not a timm model"}), CALM, Kind.CONFIG_ERROR, "timm model"),
    (Exit(EXIT_DISK_FULL, error={"message": "only 0.1 GiB free"}), CALM, Kind.DISK_FULL, "GiB free"),
    (Exit(EXIT_OOM, error={"message": "MPS backend out of memory (MPS allocated: 17 GB"}), CALM, Kind.OOM, "MPS backend"),
    (Exit(-signal.SIGKILL), NEAR_SOFT, Kind.OOM, "near the limit"),
    (Exit(-signal.SIGKILL), SYSTEM_LOW, Kind.OOM, "OOM killer"),
    (Exit(-signal.SIGKILL), CALM, Kind.KILLED, "no sign of memory pressure"),
    (Exit(-signal.SIGKILL), LONG_AGO, Kind.KILLED, "no sign"),          # pressure a minute ago does not count
    (Exit(-signal.SIGKILL), [], Kind.KILLED, "no sign"),
    (Exit(-signal.SIGKILL, we_killed="memory_hard"), NEAR_SOFT, Kind.MEMORY_LIMIT, "hard memory limit"),
    (Exit(EXIT_STOPPED, we_killed="memory_soft"), NEAR_SOFT, Kind.MEMORY_LIMIT, "soft memory limit"),
    (Exit(-signal.SIGSEGV, fault_log="Fatal Python error: Segmentation fault"), CALM, Kind.NATIVE_CRASH, "SIGSEGV"),
    (Exit(-signal.SIGBUS), CALM, Kind.NATIVE_CRASH, "SIGBUS"),
    (Exit(-signal.SIGABRT), CALM, Kind.NATIVE_CRASH, "SIGABRT"),
    (Exit(-signal.SIGILL), CALM, Kind.NATIVE_CRASH, "SIGILL"),
    (Exit(-signal.SIGFPE), CALM, Kind.NATIVE_CRASH, "SIGFPE"),
    (Exit(-signal.SIGKILL, we_killed="hang"), CALM, Kind.HANG, "no progress"),
    (Exit(-signal.SIGABRT, we_killed="hang"), CALM, Kind.HANG, "no progress"),
    (Exit(-signal.SIGTERM), CALM, Kind.KILLED, "not sent by trainctl"),
    (Exit(EXIT_EXCEPTION, error={"type": "KeyError", "message": "'x'", "traceback": "tb"}), CALM, Kind.EXCEPTION, "KeyError"),
    (Exit(1), CALM, Kind.EXCEPTION, "without an error report"),
    (Exit(1, heartbeat_seen=False, output_tail="ModuleNotFoundError: torch"), CALM, Kind.BOOT_FAILURE, "before it came up"),
    (Exit(-signal.SIGSEGV, heartbeat_seen=False), CALM, Kind.BOOT_FAILURE, "SIGSEGV"),
    (Exit(EXIT_LOCKED), CALM, Kind.BOOT_FAILURE, "another worker"),
]


@pytest.mark.parametrize("ended,history,kind,words", CLASSIFY, ids=[f"{c[2].value}-{i}" for i, c in enumerate(CLASSIFY)])
def test_classify(ended, history, kind, words):
    failure = classify(ended, history, SOFT)
    assert failure.kind is kind
    assert words in failure.detail


def test_classify_covers_every_kind():
    assert {c[2] for c in CLASSIFY} == set(Kind)


def test_classify_keeps_the_evidence():
    f = classify(Exit(-signal.SIGSEGV, fault_log="Fatal Python error: Segmentation fault\n  File x"), CALM, SOFT)
    assert f.signal == "SIGSEGV" and f.exit_code is None and "Segmentation fault" in f.evidence
    assert f.memory["worker"] == GiB
    f = classify(Exit(EXIT_EXCEPTION, error={"type": "E", "message": "m", "traceback": "Traceback..."}), CALM, SOFT)
    assert f.exit_code == EXIT_EXCEPTION and f.evidence == "Traceback..."


S = Settings(max_restarts_per_profile=2, backoff_seconds=(2.0, 10.0, 60.0), same_step_limit=2)


def A(kind, rung=0, step=None, progressed=False, epoch=0):
    return Attempt(rung, kind, "detail", step, epoch if step is not None else None, 0, progressed)


DECIDE = [
    # (history, ladder size, expected action, expected rung, expected delay, words in the reason)
    ([A(Kind.DONE)], 3, Do.FINISH, 0, 0, "finished"),
    ([A(Kind.STOPPED)], 3, Do.STOP, 0, 0, "stopped"),
    ([A(Kind.CONFIG_ERROR)], 3, Do.GIVE_UP, 0, 0, "config_error"),
    ([A(Kind.DISK_FULL)], 3, Do.GIVE_UP, 0, 0, "disk_full"),
    ([A(Kind.BOOT_FAILURE)], 3, Do.RESTART, 0, 2.0, "boot_failure"),
    ([A(Kind.BOOT_FAILURE), A(Kind.BOOT_FAILURE)], 3, Do.GIVE_UP, 0, 0, "failed to start twice"),
    ([A(Kind.OOM, step=5)], 3, Do.STEP_DOWN, 1, 2.0, "oom"),
    ([A(Kind.MEMORY_LIMIT, step=5)], 3, Do.STEP_DOWN, 1, 2.0, "memory_limit"),
    ([A(Kind.OOM, rung=2, step=5)], 3, Do.RESTART, 2, 2.0, "oom"),          # last rung: nowhere lower to go
    ([A(Kind.NATIVE_CRASH, step=5)], 3, Do.RESTART, 0, 2.0, "native_crash"),
    ([A(Kind.KILLED, step=5), A(Kind.HANG, step=9)], 3, Do.RESTART, 0, 10.0, "hang"),
    ([A(Kind.KILLED, step=1), A(Kind.HANG, step=2), A(Kind.EXCEPTION, step=3)], 3, Do.STEP_DOWN, 1, 2.0,
     "3 failures on rung 0 without progress"),
    ([A(Kind.KILLED, step=1), A(Kind.HANG, step=2), A(Kind.EXCEPTION, step=3, progressed=True)], 3,
     Do.RESTART, 0, 2.0, "exception"),                                      # progress resets the budget
    ([A(Kind.KILLED, step=1), A(Kind.KILLED, step=2, progressed=True), A(Kind.EXCEPTION, step=3)], 3,
     Do.RESTART, 0, 10.0, "exception"),                                     # counted from the progress on
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
]


@pytest.mark.parametrize("history,ladder,do,rung,delay,words", DECIDE, ids=[f"{d[2].value}-{i}" for i, d in enumerate(DECIDE)])
def test_decide(history, ladder, do, rung, delay, words):
    action = decide(history, ladder, S)
    assert (action.do, action.profile_index, action.delay) == (do, rung, delay)
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
            rung = action.profile_index
        assert action.do is Do.GIVE_UP and n <= 3 * (S.max_restarts_per_profile + 1), (kind, n)
