"""The run's figure (`trainctl plot`, the morning report's picture): the run over its optimizer steps, with its crashes.

`plot_data` reads metrics.jsonl and the journal into what the figure shows, with no plotting library;
`drawing.render` draws it with matplotlib (the optional extra `trainctl[plot]`), imported there and only there:
the supervisor loads it when a run ends, never at start-up.

Re-done work is drawn once. After a crash the next attempt resumes from a checkpoint and trains the steps past
it again: the curve is, for each step, the line of the attempt that trained it last (the weights that went on
into the model); the lines an attempt logged past the step a later attempt resumed from are *discarded*, drawn
faint over a shaded span.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainctl.contract import fsio
from trainctl.contract.lifecycle import Event, is_final
from trainctl.contract.protocol import read_heartbeat
from trainctl.contract.runfolder import is_whole, read_metrics

from . import runstate
from .journal import read_events
from .policy import CLEAN
from .text import plural

FIGURE_FILE = "report.png"                 # in the run folder, beside report.md which embeds it
INSTALL = 'pip install "trainctl[plot]"'
GAP_SECONDS = 5.0                          # a pause of supervision shorter than this is not marked


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed (the optional extra `trainctl[plot]`)."""


@dataclass(frozen=True)
class Crash:
    step: int          # the step the attempt had reached when it ended
    kind: str          # its failure kind: killed, oom, native_crash, ...
    attempt: int
    rung: int          # 1 = first
    at: float          # supervised seconds since the run began


@dataclass(frozen=True)
class Redone:
    first: int         # steps after `first` up to `last` were trained by `attempt`, lost, and trained again
    last: int
    attempt: int


@dataclass(frozen=True)
class RungChange:
    step: int          # the step the first attempt on the new rung resumed from
    attempt: int
    from_rung: int     # 1 = first
    to_rung: int
    rung: str          # the new rung, e.g. "cpu batch 4"
    reason: str


@dataclass(frozen=True)
class Span:
    start: float       # supervised seconds since the run began
    end: float
    kind: str          # start-up, training, re-done (training lost to a crash) or restart


@dataclass(frozen=True)
class Gap:
    at: float          # supervised seconds when no supervisor ran for `seconds` of wall time
    seconds: float


@dataclass(frozen=True)
class PlotData:
    run_name: str
    state: str
    train: list        # the run's curve: one train metrics line (a dict) per step, steps ascending
    val: list          # one validation line per step
    discarded: list    # train lines of steps a later attempt trained again
    discarded_val: list
    crashes: list      # Crash, oldest first
    redone: list       # Redone
    rung_changes: list  # RungChange
    timeline: list     # Span
    gaps: list         # Gap
    total_steps: int | None
    step: int | None = None   # the steps done, from the heartbeat: metrics lines come only every log_every_steps


def headline(data: PlotData) -> str:
    """'step 192/192, 1 crash (killed), 0 rung changes': the figure's title and `trainctl plot`'s line."""
    last = max(data.step or 0, data.train[-1]["step"] if data.train else 0)
    kinds = ", ".join(c.kind for c in data.crashes)
    crashes = f"{len(data.crashes)} crash{'' if len(data.crashes) == 1 else 'es'}" + (f" ({kinds})" if kinds else "")
    return f"step {last}/{data.total_steps or '?'}, {crashes}, {plural(len(data.rung_changes), 'rung change')}"


def plot_data(run_dir: Path, state: str | None = None) -> PlotData:
    """What the figure shows, from the run folder alone (`state`: the run's, when the caller knows it)."""
    run_dir = Path(run_dir)
    events = read_events(run_dir)
    lines = steps_of(read_metrics(run_dir))
    attempts = attempts_of(events, lines)
    resumed = {n: a["resumed"] for n, a in attempts.items()}
    train, discarded = split_redone([m for m in lines if m.get("kind") == "train"], resumed)
    val, discarded_val = split_redone([m for m in lines if m.get("kind") == "val"], resumed)
    clock = Clock(lifetimes(events, lines))
    hb = read_heartbeat(run_dir)
    saved = runstate.read_state(run_dir)
    return PlotData(run_name=saved.run_name if saved and saved.run_name else run_dir.name,
                    state=state or run_state(run_dir, saved), train=train, val=val, discarded=discarded,
                    discarded_val=discarded_val, crashes=crashes_of(attempts, clock), redone=redone_of(attempts),
                    rung_changes=rung_changes_of(attempts, events), timeline=timeline(attempts, clock),
                    gaps=clock.gaps(), total_steps=hb.total_steps if hb else None,
                    step=hb.step if hb and is_whole(hb.step) else None)


def steps_of(lines: list[dict]) -> list[dict]:
    """The metrics lines with a whole step, their attempt a whole number or None (hand-edited or hostile lines
    are left out rather than failing the figure)."""
    return [{**line, "attempt": line.get("attempt") if is_whole(line.get("attempt")) else None}
            for line in lines if is_whole(line.get("step"))]


def attempts_of(events: list[dict], lines: list[dict]) -> dict[int, dict]:
    """Per attempt (one worker process): when it spawned, was ready and ended, the step it resumed from and the
    step it reached, its rung, how it ended, when its checkpoints were taken."""
    out: dict[int, dict] = {}
    for e in events:
        n, kind = e["attempt"], e["kind"]
        if kind == Event.SPAWN:
            profile = e["data"].get("rung") or {}
            out[n] = {"spawn": e["time"], "ready": None, "end": None, "kind": None, "reached": e["step"] or 0,
                      "resumed": e["step"] or 0, "rung": (e["rung"] or 0) + 1,
                      "rung_text": f"{profile.get('device', '?')} batch {profile.get('batch_size', '?')}",
                      "saved": [], "last_line": None}
        a = out.get(n)
        if a is None:
            continue
        if kind == Event.WORKER_READY:
            a["ready"] = e["time"]
            # The first step seen once it booted: below the spawn's step only when the worker skipped a checkpoint
            # that failed verification and resumed from an older one (above it, it had already trained a little).
            if e["step"] is not None and e["step"] < a["resumed"]:
                a["resumed"] = e["step"]
        elif kind == Event.CHECKPOINT:
            a["saved"].append(e["data"].get("taken") or e["time"])   # when training stood at that step
        elif kind == Event.EXIT:
            a["end"], a["kind"] = e["time"], e["data"].get("failure")
            if e["step"] is not None:
                a["reached"] = max(a["reached"], e["step"])
    for line in lines:
        a = out.get(line.get("attempt"))
        if a is not None:
            a["reached"] = max(a["reached"], line["step"])
            if isinstance(line.get("time"), (int, float)):
                a["last_line"] = max(a["last_line"] or 0.0, line["time"])
    return out


def split_redone(lines: list[dict], resumed: dict[int, int]) -> tuple[list[dict], list[dict]]:
    """(the curve, the discarded lines): a line is discarded when a later attempt resumed from a step before it,
    or logged its step again; the curve has one line per step, steps ascending."""
    kept: dict[int, dict] = {}
    discarded = []
    for line in lines:
        attempt = line.get("attempt")
        later = [step for n, step in resumed.items() if isinstance(attempt, int) and n > attempt]
        if later and line["step"] > min(later):
            discarded.append(line)
            continue
        if line["step"] in kept:
            discarded.append(kept[line["step"]])
        kept[line["step"]] = line
    return [kept[s] for s in sorted(kept)], discarded


def crashed(a: dict) -> bool:
    return a["kind"] is not None and a["kind"] not in CLEAN


def crashes_of(attempts: dict[int, dict], clock: Clock) -> list[Crash]:
    return [Crash(a["reached"], a["kind"], n, a["rung"], clock(a["end"]))
            for n, a in sorted(attempts.items()) if crashed(a)]


def redone_of(attempts: dict[int, dict]) -> list[Redone]:
    """The steps each attempt trained past where the next one resumed: lost, then trained again."""
    ordered = sorted(attempts)
    return [Redone(attempts[b]["resumed"], attempts[a]["reached"], a) for a, b in zip(ordered, ordered[1:])
            if attempts[a]["reached"] > attempts[b]["resumed"]]


def rung_changes_of(attempts: dict[int, dict], events: list[dict]) -> list[RungChange]:
    """Each attempt on another rung than the one before: a step-down (with its reason) or a resume on another rung."""
    reasons = {e["attempt"]: e["data"].get("reason", "") for e in events if e["kind"] == Event.STEP_DOWN}
    ordered = sorted(attempts)
    return [RungChange(attempts[b]["resumed"], b, attempts[a]["rung"], attempts[b]["rung"], attempts[b]["rung_text"],
                       reasons.get(a) or f"resumed on rung {attempts[b]['rung']}")
            for a, b in zip(ordered, ordered[1:]) if attempts[a]["rung"] != attempts[b]["rung"]]


def lifetimes(events: list[dict], lines: list[dict]) -> list[list[float]]:
    """[first, last] wall times of each supervisor's life in the journal (the last one reaching its newest line)."""
    spans: list[list[float]] = []
    for e in events:
        if e["kind"] == Event.SUPERVISOR_START:
            spans.append([e["time"], e["time"]])
        elif spans:
            spans[-1][1] = max(spans[-1][1], e["time"])
    times = [m["time"] for m in lines if isinstance(m.get("time"), (int, float))]
    if spans and times and max(times) > spans[-1][0]:   # a live attempt logs between the journal's events
        spans[-1][1] = max(spans[-1][1], max(times))
    return spans


class Clock:
    """Wall time → supervised seconds since the run began: the hours no supervisor ran are left out."""

    def __init__(self, lives: list[list[float]]):
        self.lives = lives

    def __call__(self, t: float) -> float:
        return sum(max(0.0, min(t, last) - first) for first, last in self.lives if t > first)

    def gaps(self) -> list[Gap]:
        return [Gap(self(b[0]), b[0] - a[1]) for a, b in zip(self.lives, self.lives[1:]) if b[0] - a[1] >= GAP_SECONDS]


def timeline(attempts: dict[int, dict], clock: Clock) -> list[Span]:
    """The supervised time as spans of start-up, training, training lost to a crash, and restarts (the
    morning report's accounting: report.summarize)."""
    spans, ordered, previous_crashed = [], sorted(attempts), False
    for i, n in enumerate(ordered):
        a = attempts[n]
        end = a["end"] or max([a["ready"] or a["spawn"], a["last_line"] or 0.0, *a["saved"]])
        ready = a["ready"] or end
        spans.append(Span(clock(a["spawn"]), clock(ready), "restart" if previous_crashed else "start-up"))
        following = attempts[ordered[i + 1]] if i + 1 < len(ordered) else None
        lost = crashed(a) and (following is None or following["resumed"] < a["reached"])   # as report.lost_nothing
        saved = max([t for t in a["saved"] if ready <= t <= end] or [ready]) if lost else end
        spans += [Span(clock(ready), clock(saved), "training"), Span(clock(saved), clock(end), "re-done")]
        if crashed(a) and i + 1 < len(ordered):
            spans.append(Span(clock(end), clock(attempts[ordered[i + 1]]["spawn"]), "restart"))
        previous_crashed = crashed(a)
    return [s for s in spans if s.end > s.start]


def run_state(run_dir: Path, saved) -> str:
    """The state `trainctl status` would say: a recorded live state whose supervisor is gone is 'stopped'."""
    if saved is None:
        return "starting"
    recorded = saved.state.value
    return recorded if is_final(recorded) or runstate.supervisor_alive(run_dir) else "stopped"


def save_figure(data: PlotData, out: Path) -> None:
    """Draw `data` into `out` (a PNG, replaced atomically); PlotUnavailable when matplotlib is not installed."""
    from .drawing import render
    fsio.atomic_write(Path(out), render(data), durable=False)


