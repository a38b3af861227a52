"""What to do after an attempt ends: a pure function of the attempt history and the ladder.

- done → finish; stopped → stop; config_error, disk_full and the worker's own
  verdicts (diverged, data_error, no_checkpoint) → give up (restarting cannot help).
- boot_failure twice in a row → give up (the worker cannot start).
- oom / memory_limit → step down at once (the same rung would run out again).
- The same step failing `same_step_limit` times on a rung → step down; on the last rung, give up
  naming the step (its images are looked up by the supervisor).
- Other crashes → restart on the same rung, while the rung's failures since its last real progress
  (a newer committed checkpoint) stay within `max_restarts_per_profile`; then step down; past the last
  rung → give up. At once when the failed attempt itself made progress, else after backoff[n], n the
  failures since then: the wait grows only while the rung fails without progress.
- Planned ends (the supervisor's own, after a checkpoint): recycled → a fresh worker on the same rung,
  stepped_up → the rung above, both at once and outside the budget. A failure on a rung climbed to
  → back down at once, and no more climbing in this run (the supervisor reads that from the journal).

The history outlives the supervisor: `recall` rebuilds it from the journal, so a supervisor that
died and was started again (a service restart, a reboot) gets the same answer as one that did not.
Only a person's `trainctl resume` starts a fresh budget, journaled as `budget_reset`. Attempts that
ended cleanly (stopped on request) are neither failures nor progress.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from trainctl.contract.lifecycle import Event

from .classify import Kind

CLEAN = (Kind.DONE, Kind.STOPPED, Kind.RECYCLED, Kind.STEPPED_UP)   # not failures: no budget, no backoff
# Restarting cannot help: a person must change something first.
GIVE_UP_AT_ONCE = (Kind.CONFIG_ERROR, Kind.DISK_FULL, Kind.DIVERGED, Kind.DATA_ERROR, Kind.NO_CHECKPOINT)


@dataclass(frozen=True)
class Attempt:
    """One finished worker attempt, as the policy sees it."""
    rung_index: int
    kind: Kind
    detail: str = ""
    step: int | None = None        # the step it was working on (None if it never got there)
    epoch: int | None = None
    cursor: int | None = None
    progressed: bool = False       # it committed a checkpoint newer than the one it started from


@dataclass(frozen=True)
class Settings:
    max_restarts_per_profile: int = 3
    backoff_seconds: tuple[float, ...] = (2.0, 10.0, 60.0)
    same_step_limit: int = 2


class Do(str, Enum):
    FINISH = "finish"
    STOP = "stop"
    RESTART = "restart"
    RECYCLE = "recycle"
    STEP_DOWN = "step_down"
    STEP_UP = "step_up"
    GIVE_UP = "give_up"


@dataclass(frozen=True)
class Action:
    do: Do
    rung_index: int
    delay: float = 0.0
    reason: str = ""
    same_step: int | None = None   # set when the reason is "crashes again and again at this step"
    after_step_up: bool = False    # down again from a rung climbed to: no more climbing in this run


def decide(history: list[Attempt], ladder_size: int, s: Settings) -> Action:
    """The action after `history[-1]` ended."""
    cur = history[-1]
    rung = cur.rung_index
    if cur.kind is Kind.DONE:
        return Action(Do.FINISH, rung, reason="training finished")
    if cur.kind is Kind.STOPPED:
        return Action(Do.STOP, rung, reason="stopped on request")
    if cur.kind is Kind.RECYCLED:
        return Action(Do.RECYCLE, rung, reason=cur.detail)
    if cur.kind is Kind.STEPPED_UP:
        return Action(Do.STEP_UP, max(rung - 1, 0), reason=cur.detail)
    if cur.kind in GIVE_UP_AT_ONCE:
        return Action(Do.GIVE_UP, rung, reason=f"{cur.kind.value}: {cur.detail}")
    failed = [a for a in history if a.kind not in CLEAN]
    if cur.kind is Kind.BOOT_FAILURE and len(failed) >= 2 and failed[-2].kind is Kind.BOOT_FAILURE:
        return Action(Do.GIVE_UP, rung, reason=f"the worker failed to start twice in a row: {cur.detail}")
    if _climbed_to(history, rung) and rung + 1 < ladder_size:
        return Action(Do.STEP_DOWN, rung + 1, s.backoff_seconds[0],
                      f"rung {rung + 1} failed again after the step up ({cur.kind.value}: {cur.detail}); "
                      f"staying on rung {rung + 2} for the rest of the run", after_step_up=True)
    failures = _failures_since_progress(history, rung)
    # A crash after real progress restarts at once; the wait counts only the failures without progress since.
    fruitless = failures - 1 if failed[-failures].progressed else failures   # the counted ones are failed[-failures:]
    delay = 0.0 if cur.progressed else s.backoff_seconds[min(fruitless - 1, len(s.backoff_seconds) - 1)]
    same = _same_step_failures(failed, rung)
    if cur.step is not None and same >= s.same_step_limit:
        why = f"failed {same} times at step {cur.step} on rung {rung + 1} ({cur.kind.value}: {cur.detail})"
        return _step_down_or_give_up(rung, ladder_size, s, why, same_step=cur.step)
    if cur.kind in (Kind.OOM, Kind.MEMORY_LIMIT) and rung + 1 < ladder_size:
        return Action(Do.STEP_DOWN, rung + 1, s.backoff_seconds[0], f"{cur.kind.value}: {cur.detail}")
    if failures > s.max_restarts_per_profile:
        why = f"{failures} failures on rung {rung + 1} without progress (last: {cur.kind.value}: {cur.detail})"
        return _step_down_or_give_up(rung, ladder_size, s, why)
    return Action(Do.RESTART, rung, delay, f"{cur.kind.value}: {cur.detail}")


def _step_down_or_give_up(rung: int, ladder_size: int, s: Settings, why: str,
                          same_step: int | None = None) -> Action:
    if rung + 1 < ladder_size:
        return Action(Do.STEP_DOWN, rung + 1, s.backoff_seconds[0], why, same_step)
    return Action(Do.GIVE_UP, rung, reason=f"ladder exhausted: {why}", same_step=same_step)


def _failures_since_progress(history: list[Attempt], rung: int) -> int:
    """Failed attempts on `rung` since (and including) its last attempt that made real progress."""
    count = 0
    for a in reversed(history):
        if a.rung_index != rung:
            break
        if a.kind in CLEAN:
            if a.progressed:
                break
            continue
        count += 1
        if a.progressed:
            break
    return count


def _climbed_to(history: list[Attempt], rung: int) -> bool:
    """The run came to `rung` by a step up (the attempts on it since then are the latest ones)."""
    for a in reversed(history[:-1]):
        if a.rung_index != rung:
            return a.kind is Kind.STEPPED_UP and a.rung_index == rung + 1
    return False


def _same_step_failures(failed: list[Attempt], rung: int) -> int:
    """How many of the latest failed attempts on `rung` failed at the step the last one failed at."""
    last = failed[-1]
    count = 0
    for a in reversed(failed):
        if a.rung_index != rung or a.step != last.step or a.epoch != last.epoch:
            break
        count += 1
    return count


@dataclass(frozen=True)
class Past:
    """What a supervisor taking over a run knows from its journal."""
    attempt: int = 0                   # the last attempt number used
    restarts: int = 0                  # restarts and step-downs so far
    rung_index: int | None = None      # the rung the run is on (None: no attempt yet)
    history: list[Attempt] = field(default_factory=list)   # since the last budget reset
    forgotten: int = 0                 # attempts before that reset
    may_step_up: bool = True           # no rung climbed to has failed yet in this run


def recall(events: list[dict]) -> Past:
    """The attempt count, restarts, current rung and policy history, from the journal's events (oldest first)."""
    attempt = restarts = 0
    rung = None
    history: list[Attempt] = []
    forgotten = 0
    may_step_up = True
    for e in events:
        kind, d = e["kind"], e["data"]
        if kind == Event.SPAWN:
            attempt, rung = max(attempt, e["attempt"] or 0), e["rung"]
        elif kind == Event.STEP_DOWN:
            restarts, rung = restarts + 1, d["to"]
            may_step_up = may_step_up and not d.get("after_step_up")
        elif kind == Event.STEP_UP:
            rung = d["to"]
        elif kind == Event.RESTART:
            restarts += 1
        elif kind == Event.BUDGET_RESET:
            forgotten, history = forgotten + len(history), []
        elif kind == Event.EXIT:
            history.append(Attempt(e["rung"], Kind(d["failure"]), d.get("detail") or "", e["step"],
                                   d.get("epoch"), d.get("cursor"), bool(d.get("progressed"))))
    return Past(attempt, restarts, rung, history, forgotten, may_step_up)
