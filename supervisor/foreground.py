"""Supervising in the foreground: the supervisor loop in this process, and beside it a live panel on a
terminal, or plain timestamped lines anywhere else (a pipe, a file, nohup, a service's log).

Output that goes away does not end the run. When the pipe is closed (`| head`) or the terminal hangs
up (a closed window, a dropped SSH session: SIGHUP, then EIO on every write), the output is muted, the
supervisor's messages go on in logs/supervisor.log, training goes on to its end, and the final state,
the report and the exit code are recorded as they would have been.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from trainctl.contract.lifecycle import State
from trainctl.contract.protocol import read_heartbeat
from trainctl.contract.runfolder import LOG_DIR, METRICS_FILE, SUPERVISOR_LOG, is_finite_number

from . import runstate
from .status import gather
from .supervise import serve
from .terminal import GuardedStream, guard
from .text import duration
from .view import number, render_status

PROGRESS_POLL_SECONDS = 1.0
PLAIN_WIDTH = 10_000    # the final panel without a terminal: as wide as its content, never wrapped


def run_foreground(run_dir: Path, rung_index: int | None, console: Console, fresh_budget: bool = False,
                   headline: str | None = None) -> int:
    """Supervise `run_dir` here; lines go above a live status panel on a terminal, plain lines otherwise."""
    run_dir = Path(run_dir)
    out = guard(console)
    if headline and out.isatty():
        console.print(f"[green]{escape(headline)}[/]", highlight=False, soft_wrap=True)
    elif headline:
        out.write(f"{_stamp()} {headline}\n")
    if out.isatty():
        return _with_panel(run_dir, rung_index, fresh_budget, console, out)
    return _with_lines(run_dir, rung_index, fresh_budget, out)


def _with_panel(run_dir: Path, rung_index: int | None, fresh_budget: bool, console: Console,
                out: GuardedStream) -> int:
    say = Messages(run_dir, out, lambda m: console.print(f"[dim]{_stamp()}[/] {escape(m)}", highlight=False))

    def frame():
        if out.gone:
            return Text("")   # nobody to show it to: skip the work
        try:
            return render_status(_live_status(run_dir))
        except Exception as e:   # noqa: BLE001 — an error here would end rich's refresh thread, and the display with it
            return Text(f"(status not shown: {type(e).__name__}: {e}; the run goes on — see trainctl status)")
    with Live(get_renderable=frame, console=console, refresh_per_second=1, transient=True) as live:
        live.refresh()   # the first frame now, not a second later (rich draws none at start with get_renderable)
        code = serve(run_dir, rung_index, fresh_budget, echo=say)
    if not out.gone:
        console.print(render_status(gather(run_dir)))
    return code


def _with_lines(run_dir: Path, rung_index: int | None, fresh_budget: bool, out: GuardedStream) -> int:
    """No terminal: one unwrapped line per message and per logging interval, then the final panel."""
    def write(message: str) -> None:
        out.write(f"{_stamp()} {message}\n")
        out.flush()

    lock = threading.Lock()     # the progress thread and the supervisor's messages share the output
    progress = ProgressLines(run_dir)
    say = Messages(run_dir, out, write)

    def show_progress() -> None:
        with lock:
            if out.gone:
                return   # the steps are in logs/worker.log and metrics.jsonl too
            for line in progress.new_lines():
                write(line)

    def echo(message: str) -> None:
        show_progress()         # the steps logged before this event come before it
        with lock:
            say(message)

    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(PROGRESS_POLL_SECONDS):
            show_progress()
    follower = threading.Thread(target=follow, name="progress lines", daemon=True)
    follower.start()
    try:
        code = serve(run_dir, rung_index, fresh_budget, echo=echo)
    finally:
        stop.set()
        follower.join()
    show_progress()
    if not out.gone:
        panel = render_status(gather(run_dir))
        panel.expand = False
        Console(file=out, width=PLAIN_WIDTH).print(panel)
        out.flush()
    return code


class Messages:
    """The supervisor's messages: on the output while it is there, in logs/supervisor.log once it is gone."""

    def __init__(self, run_dir: Path, out: GuardedStream, show: Callable[[str], None]):
        self.log, self.out, self.show, self.moved = run_dir / LOG_DIR / SUPERVISOR_LOG, out, show, False

    def __call__(self, message: str) -> None:
        if not self.out.gone:
            self.show(message)
        if self.out.gone:       # gone before, or found gone by this very message
            self._keep(message)

    def _keep(self, message: str) -> None:
        lines = [] if self.moved else [f"{_stamp()} the foreground output went away (a closed pipe or terminal); "
                                       f"supervising on, messages continue here (pid {os.getpid()})"]
        self.moved = True
        try:
            with open(self.log, "a", encoding="utf-8") as f:
                f.write("".join(f"{line}\n" for line in [*lines, f"{_stamp()} {message}"]))
        except OSError:
            pass   # the journal and state.json still have the record


class ProgressLines:
    """Progress lines from metrics.jsonl (one per `[train] log_every_steps`, one per validation), as they come."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = run_dir, run_dir / METRICS_FILE
        try:
            self.offset = self.path.stat().st_size    # what earlier attempts logged is not news
        except OSError:
            self.offset = 0

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        end = chunk.rfind(b"\n") + 1          # a line being written is read next time
        self.offset += end
        records = []
        for line in chunk[:end].splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        if not records:
            return []
        hb, saved = read_heartbeat(self.run_dir), runstate.read_state(self.run_dir)
        lines = []
        for rec in records:
            try:
                line = progress_line(rec, hb, saved)
            except (KeyError, TypeError, ValueError, ArithmeticError):
                continue   # a record this version does not know how to read
            if line:
                lines.append(line)
        return lines


def progress_line(rec: dict, hb, saved) -> str | None:
    """'epoch 1.50/3 step 9/18 loss 1.2034 acc 0.438 151.2 images/s ETA 1s rung 1/2' (None: not a metrics line)."""
    epochs = hb.epochs if hb and hb.epochs else "?"
    if rec.get("kind") == "val":
        top5 = f", top-5 {number(rec['val_top5'], '.3f')}" if rec.get("val_top5") is not None else ""
        return f"epoch {rec['epoch']}/{epochs} validation: top-1 {number(rec.get('val_acc'), '.3f')}{top5}"
    if rec.get("kind") != "train":
        return None
    total = hb.total_steps if hb else None
    speed, batch = rec.get("images_per_sec"), hb.effective_batch_size if hb else None
    speed = speed if is_finite_number(speed) else None   # NaN, inf or null: no speed, no ETA (and no ValueError)
    eta = (total - rec["step"]) * batch / speed if total and batch and speed else None
    rung = rec.get("rung")
    return (f"epoch {rec['epoch']:.2f}/{epochs} step {rec['step']}/{total or '?'} "
            f"loss {number(rec.get('loss'), '.4f')} acc {number(rec.get('acc'), '.3f')} "
            f"{speed or 0:.1f} images/s ETA {duration(eta)}"
            + (f" rung {rung}/{saved.ladder_size if saved and saved.ladder_size else '?'}" if rung else ""))


def _live_status(run_dir: Path):
    """The run's status once this process's supervisor has taken it; 'starting' until then (what the folder
    says before is the previous supervisor's: 'not running', an old report)."""
    st = gather(run_dir)
    saved = runstate.read_state(run_dir)
    if saved is not None and saved.supervisor_pid == os.getpid():   # alive or, at the very end, just gone
        return st
    return dataclasses.replace(st, state=State.STARTING.value, reason="starting the supervisor",
                               recorded_state=None, report=None, summary=None, final_model=None, memory={},
                               eta_seconds=None)


def _stamp() -> str:
    return time.strftime("%H:%M:%S")
