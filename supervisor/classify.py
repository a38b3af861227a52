"""What a worker exit means: a pure function from observations to exactly one failure kind.

A SIGKILL nobody in trainctl sent is weighed on evidence first: the system's own record of an OOM kill
(the kernel's oom_kill counters, a macOS jetsam report; `oomkill.py` reads them into `Exit.oom_evidence`).
Memory near the limit in the last seconds makes it `oom` only as a guess, and the crash record says which.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass, field
from enum import Enum

from trainctl.contract.lifecycle import Kill
from trainctl.contract.protocol import ExitCode

from .memory_watch import pressure_words
from .text import gib

NATIVE_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE}
NEAR_LIMIT_SHARE = 0.90        # worker memory at 90% of the soft limit counts as "near the limit"
LOW_AVAILABLE_SHARE = 0.05     # or the system down to its last 5% of memory
MEMORY_LOOKBACK_SECONDS = 10.0
# faulthandler's first line names the fatal signal it caught (CPython's Modules/faulthandler.c)
FAULTHANDLER_NAMES = {"Segmentation fault": "SIGSEGV", "Bus error": "SIGBUS", "Aborted": "SIGABRT",
                      "Illegal instruction": "SIGILL", "Floating point exception": "SIGFPE"}


class Kind(str, Enum):
    DONE = "done"
    STOPPED = "stopped"
    CONFIG_ERROR = "config_error"
    DISK_FULL = "disk_full"
    OOM = "oom"
    MEMORY_LIMIT = "memory_limit"
    NATIVE_CRASH = "native_crash"
    KILLED = "killed"
    HANG = "hang"
    EXCEPTION = "exception"
    BOOT_FAILURE = "boot_failure"
    # The worker's own verdicts (ExitCode.CANNOT_CONTINUE, protocol.CannotContinue): a person must look.
    DIVERGED = "diverged"              # the loss stopped being a number
    DATA_ERROR = "data_error"          # the data went away or changed under the run
    NO_CHECKPOINT = "no_checkpoint"    # checkpoints exist but none verifies: never silently start over
    # Planned ends, neither failures nor stops: the policy starts the next worker at once, on the same rung
    # (recycled: its memory grew past [supervisor] recycle_growth) or the rung above (step_up_after).
    RECYCLED = "recycled"
    STEPPED_UP = "stepped_up"


CANNOT_CONTINUE_KINDS = {Kind.DIVERGED.value, Kind.DATA_ERROR.value, Kind.NO_CHECKPOINT.value}


@dataclass(frozen=True)
class MemorySample:
    """One look at memory (bytes); `at` is the supervisor's monotonic clock."""
    at: float
    worker: int              # RSS of the whole worker tree + MPS driver memory it reports
    available: int           # system memory available
    total: int
    swap_used: int = 0
    pressure: dict | None = None   # the system's memory pressure (pressure.Reading.to_json()); None: no signal here


@dataclass(frozen=True)
class OomEvidence:
    """What the system's own records say about a SIGKILL: was the worker OOM-killed, and how that is known."""
    oom_killed: bool
    said: str                # "cgroup memory.events oom_kill +1 (...)", "no oom_kill increment (/proc/vmstat)",
                             # "jetsam report JetsamEvent-2026-12-01-031522.ips (per-process-limit)"


@dataclass(frozen=True)
class Exit:
    """What the supervisor saw of one finished attempt."""
    returncode: int
    heartbeat_seen: bool = True          # the attempt wrote at least one heartbeat
    we_killed: Kill | None = None        # why the supervisor ended it, if it did (a stop request is not a failure)
    error: dict | None = None            # the worker's error JSON, if it wrote one
    fault_log: str = ""                  # faulthandler output (native crash / hang stacks)
    output_tail: str = ""                # the last lines of the worker's console
    oom_evidence: OomEvidence | None = None   # after a SIGKILL we did not send; None: no record could tell


@dataclass(frozen=True)
class Failure:
    kind: Kind
    detail: str                          # one line for people
    signal: str | None = None
    exit_code: int | None = None
    evidence: str = ""                   # traceback or faulthandler text
    memory: dict = field(default_factory=dict)
    decided_by: str = ""                 # how a SIGKILL's kind was decided: the kernel's counter, jetsam, or a guess


def classify(ended: Exit, memory_history: list[MemorySample], soft_limit: int | None) -> Failure:
    """Map one worker exit to one Failure; `memory_history` is the recent past, oldest first.
    A SIGKILL we did not send is `oom` when `ended.oom_evidence` says so (certain), `killed` when it says not and
    memory was calm, and `oom` as a stated guess when memory was near the limit without such a record."""
    rc = ended.returncode
    sig = signal.Signals(-rc).name if rc < 0 and -rc in signal.valid_signals() else None
    code = rc if rc >= 0 else None
    memory = _memory_at_end(memory_history)
    base = {"signal": sig, "exit_code": code, "memory": memory}
    message = (ended.error or {}).get("message", "")
    if ended.we_killed is Kill.HANG:
        return Failure(Kind.HANG, "no progress within the hang timeout: stacks dumped (SIGABRT), then killed",
                       evidence=ended.fault_log, **base)
    if ended.we_killed is Kill.STOP and sig in ("SIGTERM", "SIGKILL"):
        # Our own stop: its SIGTERM came before the worker could handle it (still booting), or it did not exit
        # within the stop timeout and we killed its group. A stop, not a crash (its work since the last commit is lost).
        how = ("killed at the end of the stop timeout" if sig == "SIGKILL"
               else "ended by the stop's SIGTERM before it could checkpoint (still booting)")
        return Failure(Kind.STOPPED, f"stopped on request: {how}", **base)
    if ended.we_killed in (Kill.MEMORY_SOFT, Kill.MEMORY_HARD):
        how = ("checkpointed and stopped at the soft memory limit" if ended.we_killed is Kill.MEMORY_SOFT
               else "killed at the hard memory limit")
        return Failure(Kind.MEMORY_LIMIT, f"{how} (worker used {gib(memory.get('worker'))})", **base)
    if ended.we_killed is Kill.MEMORY_PRESSURE:
        said = _pressure_words(memory_history)
        return Failure(Kind.MEMORY_LIMIT, f"checkpointed and stopped under memory pressure ({said}; worker used "
                                          f"{gib(memory.get('worker'))})", decided_by=said, **base)
    if rc == ExitCode.OK:
        return Failure(Kind.DONE, "training finished", **base)
    planned = PLANNED.get(ended.we_killed)
    if planned is not None and (rc == ExitCode.STOPPED or sig in ("SIGTERM", "SIGKILL")):
        kind, what = planned
        how = "checkpointed and stopped" if rc == ExitCode.STOPPED else f"ended by {sig} before it could checkpoint"
        return Failure(kind, f"{how} for {what}", **base)
    if rc == ExitCode.STOPPED:
        return Failure(Kind.STOPPED, "stopped after a checkpoint", **base)
    if rc == ExitCode.CONFIG_ERROR:
        return Failure(Kind.CONFIG_ERROR, message or "configuration or data error", **base)
    if rc == ExitCode.CANNOT_CONTINUE:
        kind = (ended.error or {}).get("kind")
        if kind in CANNOT_CONTINUE_KINDS:
            return Failure(Kind(kind), message or kind, **base)
    if rc == ExitCode.DISK_FULL:
        return Failure(Kind.DISK_FULL, message or "no space left for a checkpoint", **base)
    if rc == ExitCode.OUT_OF_MEMORY:
        return Failure(Kind.OOM, f"out of memory: {message}" if message else "out of memory",
                       evidence=(ended.error or {}).get("traceback", ""), **base)
    if rc == ExitCode.LOCKED:
        return Failure(Kind.BOOT_FAILURE, "another worker still holds this run (an orphan finishing up?)", **base)
    if not ended.heartbeat_seen and sig is None:
        # An exit before the first heartbeat, not by a signal: the environment is broken (an import error...).
        # A signal during boot is classified as a signal below: someone or something killed a healthy boot.
        said = _last_line(ended.output_tail)
        return Failure(Kind.BOOT_FAILURE, f"the worker died before it came up (exit code {rc})"
                       + (f": {said}" if said else ""), evidence=ended.fault_log or ended.output_tail, **base)
    if sig == "SIGKILL":
        return _sigkill(ended.oom_evidence, _pressure(memory_history, soft_limit), base)
    if sig is not None and signal.Signals[sig] in NATIVE_SIGNALS:
        first = first_fatal_signal(ended.fault_log) or sig
        if first != sig:   # faulthandler's stack dump can itself fault while another thread runs (a writer)
            base["signal"] = first
            return Failure(Kind.NATIVE_CRASH, f"native crash ({first}; the stack dump then died of {sig})",
                           evidence=ended.fault_log, **base)
        return Failure(Kind.NATIVE_CRASH, f"native crash ({sig})", evidence=ended.fault_log, **base)
    if sig is not None:
        return Failure(Kind.KILLED, f"killed by {sig} (not sent by trainctl)", **base)
    if ended.error:
        return Failure(Kind.EXCEPTION, f"{ended.error.get('type', 'Exception')}: {message}",
                       evidence=ended.error.get("traceback", ""), **base)
    return Failure(Kind.EXCEPTION, f"exit code {rc} without an error report",
                   evidence=ended.output_tail, **base)


# The supervisor's planned ends of a worker: the kind, and what for.
PLANNED = {Kill.RECYCLE: (Kind.RECYCLED, "a fresh worker on the same rung (its memory grew)"),
           Kill.STEP_UP: (Kind.STEPPED_UP, "a try of the rung above (stable long enough on this one)")}


def _pressure_words(history: list[MemorySample]) -> str:
    """The last pressure reading before the exit, in words."""
    reading = next((s.pressure for s in reversed(history) if s.pressure), None)
    return f"{reading.get('level')}, {pressure_words(reading)}" if reading else "the system's memory pressure"


def _last_line(output: str) -> str:
    """The worker's last console line (an ImportError's message, say), shortened for one line."""
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith("=== attempt")]
    return lines[-1][:300] if lines else ""


def _memory_at_end(history: list[MemorySample]) -> dict:
    if not history:
        return {}
    last = history[-1]
    return {"worker": last.worker, "available": last.available, "total": last.total,
            "swap_used": last.swap_used, "worker_peak": max(s.worker for s in history)}


def _sigkill(oom: OomEvidence | None, pressure: str | None, base: dict) -> Failure:
    """A SIGKILL trainctl did not send: the system's record decides; memory near the limit is only a guess."""
    if oom is not None and oom.oom_killed:
        return Failure(Kind.OOM, f"killed for memory: {oom.said}", decided_by=oom.said, **base)
    if pressure is None:
        said = oom.said if oom is not None else "no sign of memory pressure"
        detail = "SIGKILL with no sign of memory pressure" + (f" and {said}" if oom is not None else "")
        return Failure(Kind.KILLED, detail, decided_by=said, **base)
    if oom is None:
        said = f"{pressure} (a guess: no kernel evidence on this system)"
    else:
        # The kernel killed nothing, yet memory was high: a userspace OOM killer acting on pressure is likely,
        # and stepping down is the answer that does not get killed again.
        said = f"{pressure}, {oom.said} (a guess: a userspace OOM killer such as systemd-oomd or earlyoom?)"
    return Failure(Kind.OOM, f"SIGKILL while memory was near the limit: {said}", decided_by=said, **base)


def _pressure(history: list[MemorySample], soft_limit: int | None) -> str | None:
    """Memory pressure in the last few seconds before the exit, in words: ours near the limit, or the system's."""
    if not history:
        return None
    recent = [s for s in history if s.at >= history[-1].at - MEMORY_LOOKBACK_SECONDS]
    peak = max(s.worker for s in recent)
    if soft_limit and peak >= NEAR_LIMIT_SHARE * soft_limit:
        return f"memory at {peak / soft_limit:.0%} of the soft limit ({gib(peak)})"
    low = min((s for s in recent if s.total), key=lambda s: s.available / s.total, default=None)
    if low is not None and low.available <= LOW_AVAILABLE_SHARE * low.total:
        return f"system memory down to {low.available / low.total:.0%} available ({gib(low.available)})"
    return None


def first_fatal_signal(fault_log: str) -> str | None:
    """The signal faulthandler caught first, from its "Fatal Python error: Bus error" line; None if it wrote none."""
    for line in fault_log.splitlines():
        if line.startswith("Fatal Python error: "):
            return FAULTHANDLER_NAMES.get(line.removeprefix("Fatal Python error: ").strip())
    return None
