"""The timeline of one finished trainctl run, read back from what its run folder records.

Each fixed cost of a run (two processes starting, imports, the sanity check, the epoch-end checkpoint, the
export) gets a number only if some file holds the moment it began or ended: the journal (supervisor side),
the worker's heartbeat `timings`, metrics.jsonl, the checkpoint markers, the final heartbeat, and the mtimes of
state.json and the report (the supervisor's last writes). logs/worker.log has no timestamps, so it gives none.
A moment a run folder does not record (an older run, no validation) is listed without a time, not guessed.

    python bench/timeline.py RUN_DIR [--started EPOCH_SECONDS] [--ended EPOCH_SECONDS]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from trainctl.contract.protocol import Phase, read_heartbeat
from trainctl.contract.runfolder import (CHECKPOINT_DIR, MARKER_NAME, REPORT_JSON, STATE_FILE, read_json,
                                         read_metrics)
from trainctl.supervisor.journal import read_events
from trainctl.supervisor.plot import FIGURE_FILE


@dataclass(frozen=True)
class Moment:
    """One moment of a run: epoch seconds, or None when no file records it (then `source` says what would).
    `stage`: False for a moment the supervisor only observed later (its poll), which splits no cost."""
    name: str
    time: float | None
    source: str
    stage: bool = True


def first(events: list[dict], kind: str, attempt: int | None = None) -> float | None:
    """The time of the earliest journal event of `kind` (of `attempt`, when given)."""
    times = [e["time"] for e in events if e["kind"] == kind and (attempt is None or e["attempt"] == attempt)]
    return min(times) if times else None


def mtime(path: Path) -> float | None:
    """When a file was last written (the run's last write of state.json, of the report), or None."""
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def newest_marker(run_dir: Path) -> dict | None:
    """The commit marker of the highest-step checkpoint (its `taken` and `created` times)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    names = sorted((int(m.group(1)), p) for p in folder.glob("step-*.json") if (m := MARKER_NAME.match(p.name)))
    return read_json(names[-1][1]) if names else None


def moments(run_dir: Path, started: float | None = None, ended: float | None = None) -> list[Moment]:
    """The run's moments in the order they happen; `started`/`ended`: the caller's clock around the supervisor."""
    run_dir = Path(run_dir)
    events = read_events(run_dir)
    hb = read_heartbeat(run_dir)
    timings = dict(hb.timings) if hb and hb.timings else {}
    metrics = read_metrics(run_dir)
    train = [m["time"] for m in metrics if m.get("kind") == "train"]
    val = [m["time"] for m in metrics if m.get("kind") == "val"]
    marker = newest_marker(run_dir) or {}
    done = hb.time if hb and hb.phase == Phase.DONE else None
    out = [
        Moment("supervisor process start", started, "the caller's clock before starting it (--started)"),
        Moment("supervisor up", first(events, "supervisor_start"), "journal: supervisor_start"),
        Moment("worker spawned", first(events, "spawn", 1), "journal: spawn"),
        Moment("worker main() starts", timings.get("process_start"), "heartbeat timings.process_start"),
        Moment("imports done (torch, timm, trainer)", timings.get("imported"), "heartbeat timings.imported"),
        Moment("data scanned, checkpoints searched", timings.get("checkpoint_loaded"),
               "heartbeat timings.checkpoint_loaded"),
        Moment("model built", timings.get("model_built"), "heartbeat timings.model_built"),
        Moment("loader started", timings.get("fit_start"), "heartbeat timings.fit_start"),
        Moment("sanity check done", timings.get("sanity_done"), "heartbeat timings.sanity_done"),
        Moment("worker ready (seen by the supervisor)", first(events, "worker_ready", 1),
               "journal: worker_ready (the supervisor's next poll after the sanity check)", stage=False),
        Moment("first optimizer step", timings.get("first_step"), "heartbeat timings.first_step"),
        Moment("last optimizer step", train[-1] if train else None, "metrics.jsonl: last train line"),
    ]
    if val:
        out.append(Moment("validation done", val[-1], "metrics.jsonl: val line"))
    out += [
        Moment("epoch-end checkpoint taken", marker.get("taken"), "checkpoint marker: taken"),
        Moment("epoch-end checkpoint committed", marker.get("created"), "checkpoint marker: created"),
        Moment("export begins", timings.get("export_start"), "heartbeat timings.export_start"),
        Moment("export done", timings.get("exported", done), "heartbeat timings.exported"),
        Moment("worker main() returns", timings.get("returned"), "heartbeat timings.returned"),
        Moment("worker exit (seen by the supervisor)", first(events, "exit", 1), "journal: exit"),
        Moment("run finished", first(events, "finish"), "journal: finish"),
        Moment("final state written", mtime(run_dir / STATE_FILE), "state.json mtime"),
        Moment("report drawn", mtime(run_dir / FIGURE_FILE), "report.png mtime (supervisor/plot.py)"),
        Moment("report written", mtime(run_dir / REPORT_JSON), "report.json mtime"),
        Moment("supervisor exit", ended, "the caller's clock when it exited (--ended)"),
    ]
    return out


def by_time(items: list[Moment]) -> list[Moment]:
    """The recorded moments sorted by time; within 10 ms (files round times to 1 ms) in the order they happen."""
    order = {id(m): i for i, m in enumerate(items)}
    return sorted((m for m in items if m.time is not None), key=lambda m: (round(m.time, 2), order[id(m)]))


def render(items: list[Moment]) -> str:
    """A Markdown table: each moment's time since the first, and since the moment before it (sorted by time)."""
    known = by_time(items)
    origin = known[0].time if known else 0.0
    lines = ["| moment | t (s) | Δ since previous (s) | recorded by |", "|---|---:|---:|---|"]
    previous = origin
    for m in known:
        step = round(m.time - previous, 2) + 0.0   # + 0.0: a tie within the files' rounding shows as 0.00, not -0.00
        lines.append(f"| {m.name} | {m.time - origin:.2f} | {step:.2f} | {m.source} |")
        previous = m.time
    for m in items:
        if m.time is None:
            lines.append(f"| {m.name} | — | — | not recorded ({m.source}) |")
    return "\n".join(lines)


def segments(items: list[Moment], training: tuple[str, str] = ("first optimizer step", "last optimizer step")
             ) -> list[tuple[str, float]]:
    """The gaps between consecutive recorded stages (in the order they happen), largest first, the training span
    itself left out: where a run's fixed costs are."""
    known = [m for m in items if m.time is not None and m.stage]
    gaps = [(f"{a.name} → {b.name}", b.time - a.time) for a, b in zip(known, known[1:])
            if (a.name, b.name) != training]
    return sorted(gaps, key=lambda g: -g[1])


def main(argv=None) -> list[Moment]:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--started", type=float, help="when the supervisor process was started (epoch seconds)")
    p.add_argument("--ended", type=float, help="when it exited (epoch seconds)")
    args = p.parse_args(argv)
    items = moments(args.run_dir, args.started, args.ended)
    print(render(items))
    print("\nlargest gaps outside training:")
    for what, seconds in segments(items):
        print(f"  {seconds:6.2f} s  {what}")
    return items


if __name__ == "__main__":
    main()
