"""The morning report: where the night went, computed from the journal alone.

Time accounting per attempt (one worker process): *startup* is the first boot of each supervisor;
*training* runs from the worker being ready to the moment its last committed checkpoint was taken
(to its end when it finished or stopped cleanly); *re-done work* is a crashed attempt's training
after that moment; *restarts* are the backoff and the boot of the attempts that follow a crash.
Time the training thread spent blocked on checkpoints is not training. Goodput = (supervised time
− re-done work − restarts − checkpoint blocking) / supervised time: the share of the time under
supervision that was not lost to faults or checkpoints. Time no supervisor ran (a failed run waiting
for a person to resume it, a dead supervisor waiting for its service manager) is not supervised time,
and so is not counted as restart time either: only the part of a gap between two attempts that a
supervisor spent (its backoff, its start) is.

report.md embeds the run's figure (plot.py, report.png beside it) when matplotlib is installed; without it,
or when drawing fails, the report says so in one line and how to get the picture.
"""
from __future__ import annotations

import collections
import os
import subprocess
import time
from pathlib import Path

from trainctl.contract import fsio
from trainctl.contract.lifecycle import Event, State, is_final
from trainctl.contract.names import shell_run
from trainctl.contract.runfolder import (BAD_IMAGES_FILE, MODEL_FILE, REPORT_FILE, REPORT_JSON, read_json, read_metrics)

from . import plot
from .journal import read_events
from .policy import CLEAN
from .text import duration, finite, percent


def summarize(events: list[dict]) -> dict:
    """Figures for the report from journal events (oldest first)."""
    lifetimes, attempts, at_failure = [], {}, []
    for e in events:
        if e["kind"] == Event.SUPERVISOR_START:
            lifetimes.append([e["time"], e["time"], False])
        elif lifetimes:
            lifetimes[-1][1] = e["time"]
            if e["kind"] == Event.STATE and is_final(e["data"]["to"]):
                lifetimes[-1][2] = True   # this supervisor reached a final state (it did not die)
        if e["kind"] == Event.SPAWN:
            attempts[e["attempt"]] = {"spawn": e["time"], "ready": None, "end": None, "kind": None, "checkpoints": [],
                                      "from": e["step"], "reached": None, "last": e["step"] or 0}
        a = attempts.get(e["attempt"])
        if a is None:
            continue
        if e["kind"] == Event.WORKER_READY:
            a["ready"] = ready_time(e, a["spawn"])
        elif e["kind"] == Event.CHECKPOINT:
            # When training stood at that step, not when the supervisor noticed the commit (it may notice
            # only after the crash, and the work between the two is re-done).
            a["checkpoints"].append(e["data"].get("taken") or e["time"])
            if e["data"].get("failure"):   # written on the way out of a caught failure: the steps it saved
                at_failure.append(max(0, (e["step"] or 0) - a["last"]))
            a["last"] = e["step"] if e["step"] is not None else a["last"]
        elif e["kind"] == Event.EXIT:
            a["end"], a["kind"], a["reached"] = e["time"], e["data"]["failure"], e["step"]
    training = redone = restarts = startup = 0.0
    previous_end, previous_crashed = None, False
    ordered = sorted(attempts)
    for i, number in enumerate(ordered):
        a = attempts[number]
        end = a["end"] or (a["checkpoints"][-1] if a["checkpoints"] else a["ready"] or a["spawn"])
        ready = a["ready"] if a["ready"] is not None else end
        boot = ready - a["spawn"]
        if previous_crashed:
            restarts += boot + supervised_between(lifetimes, previous_end or a["spawn"], a["spawn"])
        else:
            startup += boot
        crashed = a["kind"] not in CLEAN
        if crashed:
            following = attempts[ordered[i + 1]] if i + 1 < len(ordered) else None
            saved = end if lost_nothing(a, following) else max([t for t in a["checkpoints"] if t >= ready] or [ready])
            training += saved - ready
            redone += end - saved
        else:
            training += end - ready
        previous_end, previous_crashed = end, crashed
    supervised = sum(b - a for a, b, _ in lifetimes)
    exits = [e for e in events if e["kind"] == Event.EXIT]
    blocked = sum(e["data"].get("checkpoint_blocked_seconds") or 0.0 for e in exits)
    training = max(0.0, training - blocked)
    crashes = [e for e in exits if e["data"]["failure"] not in CLEAN]
    return {
        "wall_seconds": round(events[-1]["time"] - events[0]["time"], 1) if events else 0.0,
        "supervised_seconds": round(supervised, 1),
        "training_seconds": round(training, 1), "redone_seconds": round(redone, 1),
        "restart_seconds": round(restarts, 1), "startup_seconds": round(startup, 1),
        "checkpoint_blocked_seconds": round(blocked, 1),
        # A run that never trained (a config error at boot) has no goodput, not 100%.
        "goodput": (round(min(1.0, max(0.0, (supervised - redone - restarts - blocked) / supervised)), 4)
                    if supervised > 0 and training > 0 else None),
        "crashes": len(crashes),
        "supervisor_deaths": sum(1 for *_, ended in lifetimes[:-1] if not ended),
        "supervisor_errors": sum(1 for e in events if e["kind"] == Event.SUPERVISOR_ERROR),
        "crashes_by_kind_and_rung": dict(collections.Counter(
            f"{e['data']['failure']} on rung {e['rung'] + 1}" for e in crashes)),
        "step_downs": [{"from": e["data"]["from"] + 1, "to": e["data"]["to"] + 1, "reason": e["data"]["reason"],
                        "at": e["time"]} for e in events if e["kind"] == Event.STEP_DOWN],
        "step_ups": [{"from": e["data"]["from"] + 1, "to": e["data"]["to"] + 1, "reason": e["data"]["reason"],
                      "at": e["time"]} for e in events if e["kind"] == Event.STEP_UP],
        "recycles": sum(1 for e in events if e["kind"] == Event.RECYCLE),
        "memory_pressure": dict(collections.Counter(
            f"{e['data'].get('level')}: {e['data'].get('action')}" for e in events
            if e["kind"] == Event.MEMORY_PRESSURE and e["data"].get("action") != "none")),
        "checkpoints_written": sum(e["data"].get("checkpoints_written") or 0 for e in exits),
        "checkpoints_at_failure": len(at_failure), "steps_saved_at_failure": sum(at_failure),
    }


def lost_nothing(a: dict, following: dict | None) -> bool:
    """The next attempt resumed from the very step this one reached (it checkpointed on its way out, as a caught
    out-of-memory error does): none of its training is done again."""
    return (following is not None and a["reached"] is not None and following["from"] is not None
            and following["from"] >= a["reached"])


def ready_time(e: dict, spawned: float) -> float:
    """When an attempt was ready to train: the worker's own moment (`ready_at`, journaled since issue 22), else
    when the supervisor saw it; never before its spawn nor after the observation."""
    said = (e.get("data") or {}).get("ready_at")
    return e["time"] if not isinstance(said, (int, float)) else min(e["time"], max(spawned, said))


def supervised_between(lifetimes: list, start: float, end: float) -> float:
    """How much of [start, end] some supervisor was running (lifetimes: [first event, last event, ended])."""
    return sum(max(0.0, min(end, last) - max(start, first)) for first, last, _ in lifetimes)


def write(run_dir: Path, state: str, reason: str | None, val_acc: float | None) -> dict:
    """Write report.md (and return the summary) for a run that just finished, failed or stopped."""
    run_dir = Path(run_dir)
    s = summarize(read_events(run_dir))
    s.update(state=state, reason=reason, val_acc=val_acc,
             bad_images=(read_json(run_dir / BAD_IMAGES_FILE) or {}).get("count", 0))
    last = last_validation(run_dir)   # one read of metrics.jsonl for both
    top5, ema = finite(last.get("val_top5")), finite(last.get("ema_val_acc"))
    if top5 is not None:   # measured only past 5 classes: otherwise absent, never shown as 100%
        s["val_top5"] = top5
    if ema is not None:    # [ema] enabled
        s["ema_val_acc"] = ema
    lines = [f"# trainctl report: {run_dir.name} — {state.upper()}", "",
             f"- ended: {time.strftime('%Y-%m-%d %H:%M:%S')}" + (f" — {reason}" if reason else ""),
             f"- wall time: {duration(s['wall_seconds'])} (supervised: {duration(s['supervised_seconds'])})",
             f"- goodput: {percent(s['goodput'])} — training {duration(s['training_seconds'])}, re-done after crashes "
             f"{duration(s['redone_seconds'])}, restarts {duration(s['restart_seconds'])}, "
             f"start-up {duration(s['startup_seconds'])}, "
             f"blocked on checkpoints {s['checkpoint_blocked_seconds']:.1f}s",
             f"- crashes: {s['crashes']}" + (" (" + ", ".join(f"{k}: {v}" for k, v in
                                                          s["crashes_by_kind_and_rung"].items()) + ")" if s["crashes"] else ""),
             f"- step-downs: {len(s['step_downs'])}"]
    if s["supervisor_deaths"]:
        lines.insert(-1, f"- the supervisor itself died {s['supervisor_deaths']} time(s) and was started again")
    if s["supervisor_errors"]:
        lines.insert(-1, f"- the supervisor itself failed {s['supervisor_errors']} time(s) (an error in trainctl, "
                         f"not in the run: traceback in the journal's supervisor_error event); the run went on")
    lines += [f"  - rung {d['from']} → {d['to']} at {time.strftime('%H:%M:%S', time.localtime(d['at']))}: {d['reason']}"
              for d in s["step_downs"]]
    if s["step_ups"]:
        lines.append(f"- step-ups: {len(s['step_ups'])}")
        lines += [f"  - rung {d['from']} → {d['to']} at {time.strftime('%H:%M:%S', time.localtime(d['at']))}: "
                  f"{d['reason']}" for d in s["step_ups"]]
    if s["recycles"]:
        lines.append(f"- workers recycled: {s['recycles']} (memory grew past recycle_growth; planned, nothing lost)")
    if s["memory_pressure"]:
        lines.append("- memory pressure: " + ", ".join(f"{k} x{v}" for k, v in s["memory_pressure"].items()))
    lines += [f"- checkpoints written: {s['checkpoints_written']}" + (
                  f" ({s['checkpoints_at_failure']} at a failure, saving {s['steps_saved_at_failure']} steps from being "
                  f"done again)" if s["checkpoints_at_failure"] else ""),
              f"- bad images: {s['bad_images']}" + (f" (listed in {BAD_IMAGES_FILE})" if s["bad_images"] else ""),
              f"- final validation accuracy: {percent(val_acc)}" + (f" (top-5: {percent(top5)})" if top5 is not None else "")
              + (f"; EMA of the weights: {percent(ema)}" if ema is not None else "")]
    if state == State.SUCCEEDED:
        lines.append(f"- model: {run_dir / MODEL_FILE}")
    # Written before the figure is drawn, and again after: whatever drawing does, the report is there.
    s["figure"] = None
    save(run_dir, lines + [f"- figure: not drawn yet; draw it with: trainctl plot {shell_run(run_dir)}"], s)
    s["figure"], said = draw_figure(run_dir, state)
    save(run_dir, lines + [said], s)
    return s


def save(run_dir: Path, lines: list[str], summary: dict) -> None:
    fsio.atomic_write(run_dir / REPORT_FILE, "\n".join(lines) + "\n")
    fsio.atomic_write_json(run_dir / REPORT_JSON, summary)


def draw_figure(run_dir: Path, state: str) -> tuple[str | None, str]:
    """Draw the run's figure beside the report: (its file name, report.md's line embedding it), or (None, a line
    saying why there is none and how to get it)."""
    again = f"trainctl plot {shell_run(run_dir)}"
    try:
        data = plot.plot_data(run_dir, state)
        if not data.train:
            return None, "- figure: none, no training step was logged"
        plot.save_figure(data, run_dir / plot.FIGURE_FILE)
    except plot.PlotUnavailable:
        return None, f"- figure: not drawn, matplotlib is not installed. To get it: {plot.INSTALL}, then: {again}"
    except Exception as e:   # noqa: BLE001 — a picture must never cost the run its report
        return None, f"- figure: could not be drawn ({type(e).__name__}: {e}); try again with: {again}"
    return plot.FIGURE_FILE, (f"\n![{run_dir.name}: loss, accuracy, learning rate and images/s over the steps, "
                              f"crashes, re-done spans, rung changes and the supervised time]({plot.FIGURE_FILE})")


def run_hook(command: str, run_dir: Path, state: str, reason: str | None, timeout: float = 120) -> int | None:
    """Run an on_finish / on_failure command with the run's name, state and reason in its environment."""
    env = {**os.environ, "TRAINCTL_RUN": Path(run_dir).name, "TRAINCTL_RUN_DIR": str(run_dir),
           "TRAINCTL_STATE": state, "TRAINCTL_REASON": reason or "",
           "TRAINCTL_REPORT": str(Path(run_dir) / REPORT_FILE)}
    try:
        return subprocess.run(command, shell=True, env=env, timeout=timeout, cwd=run_dir,
                              stdin=subprocess.DEVNULL).returncode
    except (OSError, subprocess.TimeoutExpired):
        return None


def read_summary(run_dir: Path) -> dict | None:
    return read_json(Path(run_dir) / REPORT_JSON)


def last_validation(run_dir: Path) -> dict:
    """The last validated epoch's metrics line (its newest: an epoch re-done after a crash writes it again), or {}
    without validation. "val_top5" is in it past 5 classes only, "ema_val_acc" with [ema] on."""
    last: dict[int, dict] = {}
    for rec in read_metrics(run_dir):
        if rec.get("kind") == "val" and isinstance(rec.get("epoch"), int):
            last[rec["epoch"]] = rec
    return last[max(last)] if last else {}
