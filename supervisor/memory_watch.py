"""The memory verdicts of `watch.assess`, pure like it: our limits, the system's pressure, a worker that leaks.

In order of force: past the hard limit the worker is killed at once; past the soft limit it checkpoints,
stops and the run continues one rung down. The operating system's memory pressure (`pressure.py`) is
acted on before either is reached: warning → a checkpoint now (the worker empties the device cache
before it snapshots); critical, or warning for `memory_pressure_sustained_seconds` → the soft limit's
path (checkpoint, stop, next rung; on the last rung, where there is nowhere to go, a checkpoint only).
A worker whose memory keeps growing is recycled before any of that: once it has grown
`recycle_growth` past the footprint of its first steps, it checkpoints and stops, and a fresh worker
continues on the same rung — planned, nothing lost, no restart budget used.
"""
from __future__ import annotations

import dataclasses
import signal
from typing import TYPE_CHECKING

from trainctl.contract.lifecycle import Event, Kill
from trainctl.contract.protocol import Phase

from .commands import KillGroup, Record, Say, Send
from .text import gib

if TYPE_CHECKING:
    from .watch import Limits, Watch

# The footprint a leak is measured against: the most memory seen over an attempt's first steps (the loader
# started, the allocator's caches and the optimizer state in place).
BASELINE_STEPS = 10
NORMAL, WARNING, CRITICAL = "normal", "warning", "critical"


def judge_limits(w: Watch, used: int, now: float, limits: Limits, out: list) -> Watch:
    """Our own limits on the worker's memory (tree RSS + the device memory it reports)."""
    if limits.hard_limit and used >= limits.hard_limit:
        out += [Record(Event.MEMORY_HARD_LIMIT, data={"worker": used, "limit": limits.hard_limit}),
                Say(f"worker memory {used / 2**30:.2f} GiB is past the hard limit: killing it"), KillGroup()]
        return dataclasses.replace(w, kill=Kill.MEMORY_HARD)
    if limits.soft_limit and used >= limits.soft_limit and w.kill is None:
        out += [Record(Event.MEMORY_SOFT_LIMIT, data={"worker": used, "limit": limits.soft_limit}),
                Say(f"worker memory {used / 2**30:.2f} GiB is past the soft limit: checkpoint and stop, "
                    f"then continue on the next rung"), Send(signal.SIGTERM)]
        return dataclasses.replace(w, kill=Kill.MEMORY_SOFT, kill_deadline=now + limits.stop_timeout)
    return w


def judge_pressure(w: Watch, reading: dict | None, now: float, limits: Limits, out: list) -> Watch:
    """Act on a change of the system's pressure level (each level once), and on a warning that lasts."""
    if not limits.pressure or reading is None or not w.ready or w.kill is not None:
        return w
    level = reading.get("level", NORMAL)
    if level == NORMAL:
        if w.pressure_level != NORMAL:
            out += [Record(Event.MEMORY_PRESSURE, data={**reading, "action": "none"}),
                    Say(f"memory pressure back to normal ({reading.get('source')})")]
        return dataclasses.replace(w, pressure_level=NORMAL, pressure_since=None)
    since = w.pressure_since if w.pressure_since is not None else now
    lasted = now - since
    if level == WARNING and limits.pressure_sustained and lasted >= limits.pressure_sustained:
        level, why = CRITICAL, f"warning for {lasted:.0f} s"
    else:
        why = level
    if level == w.pressure_level or (level == WARNING and w.pressure_level == CRITICAL):
        return dataclasses.replace(w, pressure_since=since)   # acted on already (critical eased to warning: as well)
    w = dataclasses.replace(w, pressure_level=level, pressure_since=since)
    where = f"memory pressure {why} ({pressure_words(reading)})"
    if level == WARNING:
        out += [Record(Event.MEMORY_PRESSURE, data={**reading, "action": "checkpoint"}),
                Say(f"{where}: asking the worker for a checkpoint and to empty its device cache"),
                Send(signal.SIGUSR1)]
        return w
    if w.rung_index + 1 >= limits.ladder_size:
        out += [Record(Event.MEMORY_PRESSURE, data={**reading, "action": "checkpoint", "why": why}),
                Say(f"{where}: a checkpoint now; this is the last rung, so training goes on here"),
                Send(signal.SIGUSR1)]
        return w
    out += [Record(Event.MEMORY_PRESSURE, data={**reading, "action": "step_down", "why": why}),
            Say(f"{where}: checkpoint and stop, then continue on the next rung"), Send(signal.SIGTERM)]
    return dataclasses.replace(w, kill=Kill.MEMORY_PRESSURE, kill_deadline=now + limits.stop_timeout)


def pressure_words(reading: dict) -> str:
    """'/proc/pressure/memory: some avg10 12%, full avg10 3%': a pressure reading for people."""
    figures = [f"{k.replace('_avg10', '')} avg10 {reading[k]:g}%" for k in ("some_avg10", "full_avg10")
               if isinstance(reading.get(k), (int, float))]
    return f"{reading.get('source')}" + (f": {', '.join(figures)}" if figures else "")


def judge_growth(w: Watch, used: int, now: float, limits: Limits, out: list) -> Watch:
    """Learn the footprint of the attempt's first steps; recycle the worker once it has grown past the allowance."""
    hb = w.heartbeat
    if (not (limits.recycle_bytes or limits.recycle_share) or not w.ready or w.kill is not None or hb is None
            or hb.phase is not Phase.TRAINING):
        return w
    if hb.step - w.start_step <= BASELINE_STEPS:
        return dataclasses.replace(w, baseline=max(w.baseline, used))
    allowed = limits.recycle_bytes or int((limits.recycle_share or 0) * w.baseline)
    grown = used - w.baseline
    if not w.baseline or grown < allowed:
        return w
    out += [Record(Event.RECYCLE, hb.step, {"worker": used, "baseline": w.baseline, "growth": grown,
                                            "allowed": allowed}),
            Say(f"worker memory grew {gib(grown)} since its first steps ({gib(w.baseline)} → {gib(used)}; "
                f"recycle_growth allows {gib(allowed)}): checkpoint, stop, and a fresh worker on the same rung"),
            Send(signal.SIGTERM)]
    return dataclasses.replace(w, kill=Kill.RECYCLE, kill_deadline=now + limits.stop_timeout)
